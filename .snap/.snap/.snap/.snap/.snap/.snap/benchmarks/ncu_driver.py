"""One shape's experts step, called a few times, for an outside profiler (Nsight Compute):

    ncu --clock-control none -k regex:"fp8_w13|fp8_w2" --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        python benchmarks/ncu_driver.py deepseek-v3:16384 --format fp8 --calls 2

Runs the shipped config (or ``--patch`` JSON merged into it) ``--calls`` times on one seeded routing, so
``--launch-skip`` = (kernels per call) skips the first (compiling) call.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from quant_probe import experts_step, routing_sets, step_config  # benchmarks/: the script's own folder
from swap_probe import FORMATS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("point", help="MODEL:T")
    ap.add_argument("--format", default="bf16", choices=sorted(FORMATS))
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--patch", default=None, help="JSON merged into the looked-up config")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    name, t = a.point.split(":")
    t, m = int(t), MODELS[name]
    call, spec = experts_step(m, FORMATS[a.format], dev)
    x, w, ids = routing_sets(m, t, 1, dev)[0]
    cfg = step_config(m, t, spec, dev, json.loads(a.patch) if a.patch else None)
    print(f"{name} T={t} {a.format} config {json.dumps(cfg, sort_keys=True)}", flush=True)
    for _ in range(a.calls):
        call(x, w, ids, cfg)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
