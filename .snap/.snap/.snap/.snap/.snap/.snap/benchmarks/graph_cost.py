"""What a model's internal graphs cost: capture time per (layer, bucket) and GPU memory (round 11).

``--layers`` Qwen3-30B-A3B-shaped layers (bf16) share one ``GraphPool`` with ``eager_graph_tokens=2048``, as
``patch`` / ``load_moe_layers`` build them. For each token count, the first call through all layers (each
layer captures its bucket's graph), then the median of 5 replay passes (wall ms, synchronised), and the
memory the caching allocator holds (allocated / reserved) after it, against before the first call.

    PYTHONPATH=src python benchmarks/graph_cost.py --layers 8 --tokens 1,100,300,1000,2000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moekit
from moekit.benchmarking import MODELS
from moekit.experts.graphed import GraphPool


def _pass(layers, x, lg) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for layer in layers:
        layer(x, lg)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", default="1,100,300,1000,2000")
    a = ap.parse_args(argv)
    m = MODELS["qwen3-30b-a3b"]
    pool = GraphPool()
    layers = []
    for _ in range(a.layers):
        layer = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=torch.bfloat16, device="cuda", backend="triton",
                                runner_args=dict(graph_pool=pool), **m.layer_kwargs())
        re = layer.routed_experts
        layer.load_expert_weights(torch.randn_like(re.w13_weight) * 0.02, torch.randn_like(re.w2_weight) * 0.02)
        layer.eager_graph_tokens = 2048
        layers.append(layer)
    plain = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=torch.bfloat16, device="cuda", backend="triton",
                             eager_graph_tokens=0, **m.layer_kwargs())]
    plain[0].routed_experts.adopt_weights(layers[0].routed_experts.w13_weight, layers[0].routed_experts.w2_weight)
    mib = 2**20
    with torch.no_grad():
        for t in (int(v) for v in a.tokens.split(",")):
            x = torch.randn(t, m.H, device="cuda", dtype=torch.bfloat16)
            lg = torch.randn(t, m.E, device="cuda")
            _pass(plain, x, lg)  # kernels compiled for this T before the first graphed pass
            alloc0, res0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            first = _pass(layers, x, lg)
            replay = statistics.median(_pass(layers, x, lg) for _ in range(5))
            eager = statistics.median(_pass(plain * a.layers, x, lg) for _ in range(5))
            print(f"T={t:5d}: first pass {first:8.2f} ms ({first / a.layers:6.2f} per layer), replay pass "
                  f"{replay:7.2f} ms, plain eager pass {eager:7.2f} ms; allocated +{(torch.cuda.memory_allocated() - alloc0) / mib:7.1f} "
                  f"MiB, reserved +{(torch.cuda.memory_reserved() - res0) / mib:7.1f} MiB", flush=True)
    print(f"total: allocated {torch.cuda.memory_allocated() / mib:.0f} MiB, reserved {torch.cuda.memory_reserved() / mib:.0f} "
          f"MiB ({a.layers} layers of {sum(p.numel() * p.element_size() for p in layers[0].parameters()) / mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
