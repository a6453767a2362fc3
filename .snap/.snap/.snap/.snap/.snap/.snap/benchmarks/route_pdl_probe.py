"""The fp8 layer's first launches as programmatic dependents (round 34): the routing kernel lets its dependent begin at
once (``route_kernel``'s ``TRIGGER``) and the experts' input quantiser, launched as that dependent, waits for it, then
lets the Gluon decode w13 begin (``WAIT_FIRST``; before the Triton w13 it stays a plain launch since round 34's first
run of this probe), against round 33's launches (the routing kernel without the trigger; the input
quantiser a plain launch, which let the Gluon decode w13 begin at its start and the Triton w13 only at its end).
Whole fp8 layers (routing, then the experts step) of buckets whose config asks for PDL, alternated, µs in a CUDA
graph; the outputs must be bit-identical (one GPU).

    PYTHONPATH=src:benchmarks python benchmarks/route_pdl_probe.py --points deepseek-v3:1,mixtral-8x7b:1 [--rounds 3]

The quantiser reads and writes nothing before its wait, so what it computes cannot change; what can change is when
the launches after the routing start.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernel_profile import each_point
from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.bench_quant import QUANT_FORMATS, layer_fn, quantized_weights
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts_quant as tq
from moekit.ops import triton_routing
from moekit.ops.triton_configs import get_config
from quant_probe import save_rows

FMT = "fp8"


def round33(state: dict):
    """Patches that give round 33's launches while ``state["old"]``: ``(apply, undo)``."""
    pdl_ok, quantise = triton_routing.pdl_ok, tq.QuantLaunch._quantise

    def no_trigger(device):
        return False if state["old"] else pdl_ok(device)

    def old_quantise(self, src, launch, interp, *, follow=False, **kw):
        if not (follow and state["old"]):
            return quantise(self, src, launch, interp, follow=follow, **kw)

        def plain(kern, grid, *args, **kwargs):  # a plain launch; before the decode w13 PDL (trigger, no-op wait)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("launch_pdl", "WAIT_FIRST")}
            if not state["dec13"]:
                kwargs.pop("PDL")
            return launch(kern, grid, *args, **kwargs)
        return quantise(self, src, plain, interp, follow=True, **kw)

    def apply():
        triton_routing.pdl_ok, tq.QuantLaunch._quantise = no_trigger, old_quantise

    def undo():
        triton_routing.pdl_ok, tq.QuantLaunch._quantise = pdl_ok, quantise
    return apply, undo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="MODEL:T[,MODEL:T...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    spec = tq.QuantSpec.of(QUANT_FORMATS[FMT])
    state = {"old": False, "dec13": False}
    apply, undo = round33(state)

    def make(m):
        torch.manual_seed(0)  # the bench's weights
        return build_layer(m, torch.bfloat16, dev), {}

    rows = []
    apply()
    try:
        for name, t, m, (layer, qcache) in each_point(a.points, make):
            cfg = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key)
            state["dec13"] = bool(cfg["w13"].get("gluon_dec"))
            sets = [(torch.randn(t, m.H, device=dev, dtype=torch.bfloat16),
                     torch.randn(t, m.E + m.Z, device=dev, dtype=torch.float32)) for _ in range(4)]
            with torch.no_grad():
                fn = layer_fn(layer, m, FMT, quantized_weights(layer, FMT, qcache))
                outs = {}
                for r in range(a.rounds):
                    for old in (True, False):
                        state["old"] = old
                        outs[old] = fn(*sets[0])
                        us = time_graph(fn, sets, target_ms=8.0, replays=5)
                        label = "round33" if old else "round34"
                        print(f"{name:14s} T={t:5d} {label:8s} graph {us:8.1f} us", flush=True)
                        rows.append(dict(model=name, tokens=t, variant=label, round=r, us=round(us, 2)))
            same = bool(torch.equal(outs[False], outs[True]))
            print(f"{name:14s} T={t:5d} bit-identical: {same}  pdl {cfg.get('pdl')} dec13 {state['dec13']}", flush=True)
            state["old"] = False
    finally:
        undo()
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
