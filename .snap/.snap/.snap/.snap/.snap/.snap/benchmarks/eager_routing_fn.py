"""Eager host µs per layer call for layers on moekit's named routing functions (round 11: they are
graph-safe, so T <= 8 replays an exact-T graph), against the same layer without its graph.

Shapes: Llama 4 Scout (E = 16, K = 1, H = 5120, I = 8192, sigmoid weight on the input: ``llama4_routing``)
and a Gemma-4-like layer (E = 128, K = 8, H = 2816, I = 704: ``ExpertScaleRouting``). Host µs as
``moekit bench --eager`` measures it (100 calls back to back, median of 5); GPU µs by CUDA-graph replay.

    PYTHONPATH=src python benchmarks/eager_routing_fn.py
"""

from __future__ import annotations

import torch

import moekit
from moekit.benchmarking.eager import time_host
from moekit.benchmarking.timer import time_graph
from moekit.loading.routings import ExpertScaleRouting, llama4_routing

SHAPES = {
    "llama4-scout": dict(E=16, K=1, H=5120, I=8192, fn=lambda: llama4_routing, on_input=True),
    "gemma4-like": dict(E=128, K=8, H=2816, I=704, fn=lambda: ExpertScaleRouting(128, device="cuda"), on_input=False),
}


def main() -> int:
    torch.manual_seed(0)
    dt = torch.bfloat16
    for name, s in SHAPES.items():
        fn = s["fn"]()
        layers = {}
        for label, n in (("graph", None), ("nograph", 0)):
            kw = {} if n is None else {"eager_graph_tokens": n}
            layer = moekit.FusedMoE(s["E"], s["K"], s["H"], s["I"], params_dtype=dt, device="cuda", backend="triton",
                                    custom_routing_function=fn, apply_router_weight_on_input=s["on_input"], **kw)
            re = layer.routed_experts
            layer.load_expert_weights(torch.randn_like(re.w13_weight) * 0.02, torch.randn_like(re.w2_weight) * 0.02)
            layers[label] = layer
        for t in (1, 8):
            x = torch.randn(t, s["H"], device="cuda", dtype=dt)
            lg = torch.randn(t, s["E"], device="cuda")
            with torch.no_grad():
                gpu = time_graph(lambda: layers["nograph"](x, lg), [()])
                row = [f"{name:14s} T={t:2d} gpu {gpu:8.1f} us"]
                for label, layer in layers.items():
                    layer(x, lg)
                    layer(x, lg)
                    torch.cuda.synchronize()
                    row.append(f"{label} host {time_host(lambda a, b: layer(a, b), [(x, lg)]):7.1f} us")
            print("  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
