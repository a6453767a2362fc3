"""Token chunks of the Triton experts step: the old rule (full chunks + the rest) against equal chunks
(:func:`moekit.ops.experts.chunk_tokens`), side by side in one run (experts step in a CUDA graph, µs).

    PYTHONPATH=src python benchmarks/chunk_probe.py --points deepseek-v3:16384:fp8,longcat-flash:16384:fp8
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts as te
from moekit.ops import triton_experts_quant as tq
from moekit.ops.triton_configs import get_config
from quant_probe import routing_sets, save_rows, shape_weights  # benchmarks/: the script's own folder
from swap_probe import FORMATS, quantise

RULES = {"full+rest": lambda total, most: max(1, min(total, most)), "equal": te.chunk_tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="deepseek-v3:16384:fp8,longcat-flash:16384:fp8,deepseek-v3:16384:bf16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev, rows = torch.device("cuda"), []
    for point in a.points.split(","):
        name, t, fname = point.split(":")
        t, m = int(t), MODELS[name]
        torch.cuda.empty_cache()
        w13, w2, b1, b2, limit = shape_weights(m, dev)
        fmt = FORMATS[fname]
        spec = tq.QuantSpec.of(fmt) if fmt is not None else None
        q = quantise(w13, w2, fmt) if fmt is not None else None
        if q is not None:
            del w13, w2
            w13 = w2 = None
        sets = routing_sets(m, t, 2, dev)
        cfg = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key if spec else None)
        if spec is not None:
            cfg = spec.fix_config(cfg, torch.bfloat16)
        sizes: list[int] = []
        run = te._run_chunk

        def record(x, *args, **kw):
            sizes.append(x.shape[0])
            return run(x, *args, **kw)

        def fn(x, w, ids):
            if q is None:
                return te.fused_experts_impl(x, w13, w2, w, ids, m.act, False, b1, b2, None, limit, config=cfg)
            return tq.fused_experts_quant_impl(x, q[0], q[1], w, ids, spec, q[2], q[3], None, None, m.act, False,
                                               b1, b2, None, limit, config=cfg)
        for rule, f in RULES.items():
            te.chunk_tokens = f
            te._run_chunk = record
            sizes.clear()
            fn(*sets[0])
            te._run_chunk = run
            chunks = list(sizes)
            us = time_graph(fn, sets, target_ms=60.0, replays=5)
            print(f"{name:14s} T={t:6d} {fname:5s} {rule:10s} chunks {chunks}  {us:9.1f} us", flush=True)
            rows.append(dict(model=name, tokens=t, fmt=fname, rule=rule, chunks=chunks, us=round(us, 1), config=cfg))
        te.chunk_tokens = RULES["equal"]
        del q, sets
    save_rows(a.out, dev, rows)
    print(json.dumps({r["model"] + ":" + r["fmt"] + ":" + r["rule"]: r["us"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
