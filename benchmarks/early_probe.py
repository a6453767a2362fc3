"""Does the input quantiser's early ``launch_dependents`` pay before the Triton w13 too? The experts step of fp8 buckets
whose config asks for PDL with the Triton w13 (``"pdl": true``, no ``"gluon_dec"`` on w13), with the quantiser a plain
launch that lets its programmatic dependent begin at once (``early``, as it does before the Gluon decode w13) or at
its end (shipped), alternated, µs in a CUDA graph; the outputs must be bit-identical (one GPU).

    PYTHONPATH=src:benchmarks python benchmarks/early_probe.py --points mixtral-8x7b:1,qwen3-30b-a3b:2 [--rounds 3]

The Triton w13 waits for its grid before anything else, so the early start can only hide its launch.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernel_profile import each_point, experts_step
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts_quant as tq
from moekit.ops.triton_configs import get_config
from quant_probe import routing_sets, save_rows, shape_weights
from swap_probe import FORMATS, quantise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="MODEL:T[,MODEL:T...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    fmt = FORMATS["fp8"]
    spec = tq.QuantSpec.of(fmt)
    shipped = tq.QuantLaunch.setup
    state = {"early": False}

    def setup(self, *args, early=False, **kw):  # the probe's switch: early for every plain quantiser launch
        return shipped(self, *args, early=early or state["early"], **kw)

    rows = []
    for name, t, m, weights in each_point(a.points, lambda m: shape_weights(m, dev)):
        q = quantise(weights[0], weights[1], fmt)
        sets = routing_sets(m, t, 4, dev)
        cfg = spec.fix_config(get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key),
                              torch.bfloat16)
        fn = experts_step(m, weights, q, spec, cfg)
        tq.QuantLaunch.setup = setup
        try:
            outs = {}
            for r in range(a.rounds):
                for early in (False, True):
                    state["early"] = early
                    outs[early] = fn(*sets[0])
                    us = time_graph(fn, sets, target_ms=8.0, replays=5)
                    print(f"{name:14s} T={t:5d} {'early' if early else 'shipped':8s} graph {us:8.1f} us", flush=True)
                    rows.append(dict(model=name, tokens=t, early=early, round=r, us=round(us, 2)))
            same = bool(torch.equal(outs[False], outs[True]))
            print(f"{name:14s} T={t:5d} bit-identical: {same}  config {cfg}", flush=True)
        finally:
            tq.QuantLaunch.setup = shipped
            state["early"] = False
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
