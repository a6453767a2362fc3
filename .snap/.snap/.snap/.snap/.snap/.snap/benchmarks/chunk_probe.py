"""Token chunks of the Triton experts step: the old rule (full chunks + the rest) against equal chunks
(:func:`moekit.ops.experts.chunk_tokens`) and one chunk past the bound, side by side in one run (experts step in
a CUDA graph, µs).

    PYTHONPATH=src python benchmarks/chunk_probe.py --points deepseek-v3:16384:fp8,longcat-flash:16384:fp8
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts as te
from quant_probe import experts_step, routing_sets, save_rows, step_config  # benchmarks/: the script's own folder
from swap_probe import FORMATS

#: "one": the whole call in one chunk, past the workspace bound (how much the bound itself costs)
RULES = {"full+rest": lambda total, most: max(1, min(total, most)), "equal": te.chunk_tokens,
         "one": lambda total, most: max(1, total)}


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
        call, spec = experts_step(m, FORMATS[fname], dev)
        sets = routing_sets(m, t, 2, dev)
        cfg = step_config(m, t, spec, dev)
        sizes: list[int] = []
        run = te._run_chunk

        def record(x, *args, **kw):
            sizes.append(x.shape[0])
            return run(x, *args, **kw)

        fn = functools.partial(call, cfg=cfg)

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
        del fn, call, sets
    save_rows(a.out, dev, rows)
    print(json.dumps({r["model"] + ":" + r["fmt"] + ":" + r["rule"]: r["us"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
