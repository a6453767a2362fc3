"""The register-operand 4-bit GEMMs on SPEC-packed weights against the same GEMMs on weights re-laid for them
(:mod:`moekit.ops.w4_layout`, the kernels' ``RELAID``), side by side in one run: experts step in a CUDA graph, µs
per kernel under the profiler, and the two outputs compared bit for bit.

The lever of docs/kernels.md's round 44, measured before layers stored re-laid words (they now do on the Triton
backend: ``RoutedExperts.packed_layout``): the same launcher and config on SPEC-packed words (``QuantSpec.relaid``
False) and on re-laid ones (True). Round 45 added rows ending in a half chunk (gpt-oss's 2880) and points whose
config runs the Triton 4-bit kernels (which put re-laid words back in SPEC order in registers): ``w13`` / ``w2`` sum
every kernel of that GEMM. Points whose H or I cannot be re-laid are skipped.

    PYTHONPATH=src:benchmarks python benchmarks/relaid_probe.py --points deepseek-v3:8,qwen3-30b-a3b:64 --rounds 2

Round 47: ``--variants`` adds configs beside the table's at a token count (a JSON object or a file holding one,
``{"T": {"name": patch}}``; keys ``"MODEL:FORMAT:T"``, ``"MODEL:T"`` or ``"FORMAT:T"`` for one model or format), each
patch merged into the table's config as :func:`quant_probe.step_config` does, to find for each bucket of a shape the
form that is fastest on re-laid words; every variant's output is compared bit for bit with the table's config on
SPEC-packed words (what the layer's other buckets must match, SPEC §9).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts_quant as tq
from moekit.ops.w4_layout import relaid_ok, relay_rega
from kernel_profile import kernel_times  # benchmarks/: the script's own folder
from quant_probe import quantise, routing_sets, save_rows, shape_weights, step_config
from swap_probe import FORMATS


def forms(cfg: dict) -> str:
    """Which kernels ``cfg`` runs per GEMM: ``rega`` (register operand), ``gluon`` (another Gluon form), ``triton``."""
    out = []
    for part in ("w13", "w2"):
        c = cfg.get(part, {})
        out.append(f"{part}:" + ("rega" if c.get("gluon_rega") else "gluon" if c.get("gluon") else "triton"))
    return " ".join(out)


def _variants_at(variants: dict, name: str, fmt_name: str, t: int) -> dict:
    """The variants of one point: the first of the keys ``MODEL:FORMAT:T``, ``MODEL:T``, ``FORMAT:T``, ``T``."""
    for key in (f"{name}:{fmt_name}:{t}", f"{name}:{t}", f"{fmt_name}:{t}", str(t)):
        if key in variants:
            return variants[key]
    return {}


def time_pair(fns: dict, sets, rounds: int, tag: str, form: str, rows: list, key: dict) -> dict | None:
    """Time ``fns["spec"]`` and ``fns["relaid"]`` (experts step in a CUDA graph, µs per kernel), alternated
    ``rounds`` times, a row per timing into ``rows`` (``key`` merged in): ``{variant: output}``, or None (said) when
    the config cannot run."""
    try:
        fns["spec"](*sets[0])
    except Exception as exc:  # a variant a kernel cannot run: say so, go on with the next one
        print(f"{tag} failed: {type(exc).__name__}: {exc}"[:400], flush=True)
        return None
    outs = {}
    for r in range(rounds):
        for v in (("spec", "relaid") if r % 2 == 0 else ("relaid", "spec")):
            outs[v] = fns[v](*sets[0]).clone()
            per = kernel_times(fns[v], sets, 5)
            us = time_graph(fns[v], sets, target_ms=40.0, replays=5)
            k13 = sum(u for kn, u in per.items() if "w13" in kn)
            k2 = sum(u for kn, u in per.items() if "w2" in kn)
            print(f"{tag} {v:6s} round {r}: graph {us:9.1f} us | w13 {k13:8.1f}  w2 {k2:8.1f} ({form})", flush=True)
            rows.append(dict(key, variant=v, round=r, us=round(us, 1), kernels=per))
    return outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="deepseek-v3:1,deepseek-v3:8,deepseek-v3:64,deepseek-v3:256,"
                                        "qwen3-30b-a3b:8,qwen3-30b-a3b:64,qwen3-30b-a3b:256")
    ap.add_argument("--formats", default="mxfp4,int4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=None, help='{"T": {"name": config patch}} (JSON, or a file holding it)')
    a = ap.parse_args(argv)
    variants = {}
    if a.variants:
        variants = json.load(open(a.variants)) if os.path.exists(a.variants) else json.loads(a.variants)
    dev, rows = torch.device("cuda"), []
    for fmt_name in a.formats.split(","):
        by_model: dict = {}
        for point in a.points.split(","):
            name, t = point.split(":")
            t, m = int(t), MODELS[name]
            if not (relaid_ok(m.H) and relaid_ok(m.I)):
                print(f"{name:14s} {fmt_name:6s} T={t:6d} skipped: H = {m.H}, I = {m.I} not whole 128-value chunks")
                continue
            fmt = FORMATS[fmt_name]
            spec, spec_r = tq.QuantSpec.of(fmt), tq.QuantSpec.of(fmt, relaid=True)
            if name not in by_model:  # one model's weights at a time
                by_model.clear()
                torch.cuda.empty_cache()
                w13, w2, b1, b2, limit = shape_weights(m, dev)
                q13, q2, s13, s2 = quantise(w13, w2, fmt)
                del w13, w2
                by_model[name] = (q13, q2, relay_rega(q13), relay_rega(q2), s13, s2, b1, b2, limit)
            q13, q2, r13, r2, s13, s2, b1, b2, limit = by_model[name]
            sets = routing_sets(m, t, 2, dev)
            table_spec = None
            for label, patch in [("table", None), *_variants_at(variants, name, fmt_name, t).items()]:
                cfg = step_config(m, t, spec, dev, patch)

                def call(x, w, ids, p13, p2, sp, cfg=cfg):
                    return tq.fused_experts_quant_impl(x, p13, p2, w, ids, sp, s13, s2, None, None, m.act, False,
                                                       b1, b2, None, limit, config=cfg)

                fns = {"spec": functools.partial(call, p13=q13, p2=q2, sp=spec),
                       "relaid": functools.partial(call, p13=r13, p2=r2, sp=spec_r)}
                tag = f"{name:14s} {fmt_name:6s} T={t:6d} {label:10s}"
                outs = time_pair(fns, sets, a.rounds, tag, forms(cfg),
                                 rows, dict(model=name, quant=fmt_name, tokens=t, config_name=label))
                if outs is None:
                    continue
                if label == "table":
                    table_spec = outs["spec"]
                same = torch.equal(outs["spec"], outs["relaid"])
                same_t = table_spec is not None and torch.equal(table_spec, outs["relaid"])
                print(f"{tag} spec and relaid outputs bit-identical: {same}; relaid and the table's spec: {same_t}",
                      flush=True)
                rows.append(dict(model=name, quant=fmt_name, tokens=t, config_name=label, identical=same,
                                 identical_to_table=same_t, config=cfg))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
