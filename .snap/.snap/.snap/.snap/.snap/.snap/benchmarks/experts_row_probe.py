"""Why one bench row is slower than the layer that contains it: DeepSeek-V3 fp8 at T = 4096, whose experts-step row
(``impl="moekit-experts"``, the experts on routing precomputed by the layer's router) measured 7.0-7.7 ms in rounds 9,
12 and 16 while the whole layer (the same router, then the same experts call) measured 5.8-5.9 ms.

Builds the bench's layer and inputs (``moekit.benchmarking.bench``: the same seed, router and fp8 weights) and
times, alternated, in CUDA graphs (the bench's timer) and under the profiler (µs per kernel):

- ``layer``: the bench's whole-layer function on (x, logits);
- ``experts``: the bench's experts-step function on the precomputed (x, weights, ids);
- ``experts-fresh``: the experts step on ids / weights copied into fresh contiguous int32 / fp32 tensors.

    PYTHONPATH=src python benchmarks/experts_row_probe.py --model deepseek-v3 --tokens 4096 --quant fp8
"""

from __future__ import annotations

import argparse

import torch

from kernel_profile import kernel_times  # benchmarks/: the script's own folder
from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.bench_quant import experts_fn, layer_fn, quantized_weights
from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--quant", default="fp8")
    ap.add_argument("--rotations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    m, t, dev, dtype = MODELS[a.model], a.tokens, "cuda", torch.bfloat16
    torch.manual_seed(0)
    layer = build_layer(m, dtype, dev)
    q = quantized_weights(layer, a.quant, {})
    sets = [(torch.randn(t, m.H, device=dev, dtype=dtype), torch.randn(t, m.E + m.Z, device=dev))
            for _ in range(a.rotations)]
    with torch.no_grad():
        r = layer.router
        esets = [(x, *r.select_experts(x, lg)) for x, lg in sets]
        fresh = [(x, w.float().contiguous().clone(), ids.to(torch.int32).contiguous().clone()) for x, w, ids in esets]
        w0, i0 = esets[0][1], esets[0][2]
        print(f"routing: weights {w0.dtype} {tuple(w0.shape)} stride {w0.stride()}, ids {i0.dtype} "
              f"{tuple(i0.shape)} stride {i0.stride()}; per-expert rows of set 0: max "
              f"{int(torch.bincount(i0.flatten().long(), minlength=m.E).max())}, min "
              f"{int(torch.bincount(i0.flatten().long(), minlength=m.E).min())}")
        fns = [("layer", layer_fn(layer, m, a.quant, q), sets), ("experts", experts_fn(layer, m, a.quant, q), esets),
               ("experts-fresh", experts_fn(layer, m, a.quant, q), fresh)]
        for rep in range(a.repeats):
            for name, fn, inp in fns:
                us = time_graph(fn, inp, target_ms=10.0, replays=5)
                ks = kernel_times(fn, inp, 5)
                top = "  ".join(f"{k} {v:.1f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1])[:6])
                print(f"{a.model} T={t} {a.quant} {name:14s} graph {us:9.1f} us  prof {sum(ks.values()):9.1f} us | "
                      f"{top}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
