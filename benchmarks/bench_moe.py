"""Benchmark whole MoE layers on a CUDA GPU (see ``moekit.bench``): ``python benchmarks/bench_moe.py --help``."""

import sys

from moekit.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
