"""The Gluon GEMMs before / after a kernel change, side by side in one run (experts step, µs per kernel
under the profiler and the CUDA-graph total), alternating the two so that clock drift hits both.

The "before" kernels are copies of the old sources placed beside the new ones as
``moekit/ops/_gluon/old_fp8_w2.py`` / ``old_fp8_w13.py`` (e.g. ``git show REV:src/moekit/ops/_gluon/fp8_w2.py``),
or with ``--family w4rega`` ``old_w4_rega.py`` (the register-operand 4-bit GEMMs, run by the shipped 4-bit
table's decode buckets, ``--formats mxfp4,int4``), or with ``--family fp8dec`` ``old_fp8_w2_dec.py`` (the fp8 decode
w2, run where the point's config asks for ``"gluon_dec"``; its w13 column is the Triton w13's);
the launchers import the kernels at call time, so each variant swaps the module attributes they read. The old
kernels must take the arguments the current launchers pass (an edit that adds a kernel argument, such as w2's
``NT``, needs the old source given that argument first).

    PYTHONPATH=src python benchmarks/gluon_ab.py --points deepseek-v3:16384,gpt-oss-120b:4096 --rounds 2
    PYTHONPATH=src python benchmarks/gluon_ab.py --family w4rega --formats mxfp4,int4 --points deepseek-v3:1
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from kernel_profile import kernel_times  # benchmarks/: the script's own folder
from quant_probe import experts_step, routing_sets, save_rows, step_config
from swap_probe import FORMATS

FAMILIES = {"fp8": (("fp8_w2", "fp8_w2_sum_kernel"), ("fp8_w13", "fp8_w13_kernel")),
            "fp8dec": (("fp8_w2_dec", "fp8_w2_dec_kernel"), ("", "w13_kernel")),
            "w4rega": (("w4_rega", "w4ra_w2_sum_kernel"), ("w4_rega", "w4ra_w13_kernel"))}


def kernels(which: str, family: str) -> dict:
    """{(module, name): kernel} of the ``new`` or ``old`` sources."""
    out = {}
    for mod, name in FAMILIES[family]:
        if not mod:  # a Triton kernel of the step (timed, not swapped)
            continue
        src = importlib.import_module(f"moekit.ops._gluon.{'old_' if which == 'old' else ''}{mod}")
        out[(mod, name)] = getattr(src, name)
    return out


def use(ks: dict) -> None:
    for (mod, name), k in ks.items():
        setattr(importlib.import_module(f"moekit.ops._gluon.{mod}"), name, k)
    from moekit.ops import gluon_w4
    gluon_w4._w4_kernels.cache_clear()  # the 4-bit launcher caches the kernels it imported


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="deepseek-v3:16384,deepseek-v3:4096,gpt-oss-120b:4096,mixtral-8x7b:16384,"
                                        "qwen3-30b-a3b:16384,qwen3-30b-a3b:1024")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="fp8")
    ap.add_argument("--patch", default=None, help="JSON merged into every point's config (e.g. the asked form)")
    ap.add_argument("--formats", default="fp8", help="comma-separated formats of the points (w4rega: mxfp4,int4)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev, rows = torch.device("cuda"), []
    variants = {"new": kernels("new", a.family), "old": kernels("old", a.family)}
    for fmt, point in ((f, p) for f in a.formats.split(",") for p in a.points.split(",")):
        name, t = point.split(":")
        t, m = int(t), MODELS[name]
        torch.cuda.empty_cache()
        call, spec = experts_step(m, FORMATS[fmt], dev)
        sets = routing_sets(m, t, 2, dev)
        cfg = step_config(m, t, spec, dev, json.loads(a.patch) if a.patch else None)

        fn = functools.partial(call, cfg=cfg)
        outs = {}
        for r in range(a.rounds):
            for v in (("old", "new") if r % 2 == 0 else ("new", "old")):
                use(variants[v])
                outs[v] = fn(*sets[0]).clone()
                per = kernel_times(fn, sets, 5)
                us = time_graph(fn, sets, target_ms=40.0, replays=5)
                k2, k13 = (sum(us_k for kn, us_k in per.items() if kn.startswith(n)) for _, n in FAMILIES[a.family])
                print(f"{name:14s} {fmt:6s} T={t:6d} {v} round {r}: graph {us:9.1f} us | w13 {k13:8.1f}  w2 {k2:8.1f}",
                      flush=True)
                rows.append(dict(model=name, quant=fmt, tokens=t, variant=v, round=r, us=round(us, 1), kernels=per))
        same = torch.equal(outs["old"], outs["new"])
        print(f"{name:14s} {fmt:6s} T={t:6d} old and new outputs bit-identical: {same}", flush=True)
        rows.append(dict(model=name, quant=fmt, tokens=t, identical=same))
        use(variants["new"])
        del fn, call, sets
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
