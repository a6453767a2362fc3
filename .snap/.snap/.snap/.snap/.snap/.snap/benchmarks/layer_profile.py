"""Where a whole layer's step goes, kernel by kernel: ``moekit bench``'s ``moekit`` row (routing from the logits, then
the experts step; a quantised format's layer as :func:`moekit.benchmarking.bench_quant.layer_fn` runs it) under
``torch.profiler``, beside the experts step alone on the same routing (``moekit-experts``), with a CUDA-graph median
of each (one GPU).

    PYTHONPATH=src:benchmarks python benchmarks/layer_profile.py --points deepseek-v3:1,mixtral-8x7b:1 \
        --formats fp8 [--rounds 2] [--out FILE.json]

Per point and format it prints both rows' graph µs and each kernel's µs per call; the difference of the two graph
medians is what the layer adds to the experts step (routing, the zero-expert output).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernel_profile import each_point, kernel_times  # benchmarks/: the script's own folder
from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.bench_quant import experts_fn, layer_fn, quantized_weights
from moekit.benchmarking.timer import time_graph
from quant_probe import save_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="MODEL:T[,MODEL:T...]")
    ap.add_argument("--formats", default="fp8", help="bf16 and / or a quantised format of moekit bench --quant")
    ap.add_argument("--rounds", type=int, default=2, help="the two rows alternated this many times")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []

    def make(m):
        torch.manual_seed(0)  # the bench's weights
        return build_layer(m, torch.bfloat16, dev), {}

    for name, t, m, (layer, qcache) in each_point(a.points, make):
        sets = [(torch.randn(t, m.H, device=dev, dtype=torch.bfloat16),
                 torch.randn(t, m.E + m.Z, device=dev, dtype=torch.float32)) for _ in range(4)]
        with torch.no_grad():
            esets = [(x, *layer.router.select_experts(x, lg)) for x, lg in sets]
            for fmt in a.formats.split(","):
                q = None if fmt == "bf16" else quantized_weights(layer, fmt, qcache)
                fns = (("layer", layer_fn(layer, m, None if q is None else fmt, q), sets),
                       ("experts", experts_fn(layer, m, None if q is None else fmt, q), esets))
                for r in range(a.rounds):
                    for impl, fn, inputs in fns:
                        per = kernel_times(fn, inputs, a.calls)
                        us = time_graph(fn, inputs, target_ms=8.0, replays=5)
                        parts = "  ".join(f"{k.split('(')[0][:40]} {v:.1f}"
                                          for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
                        print(f"{name:14s} T={t:6d} {fmt:5s} {impl:8s} graph {us:8.1f} us | {parts}", flush=True)
                        rows.append(dict(model=name, tokens=t, fmt=fmt, impl=impl, round=r, us=round(us, 2),
                                         kernels=per))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
