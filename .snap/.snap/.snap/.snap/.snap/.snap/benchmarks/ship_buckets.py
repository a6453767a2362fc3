"""Write measured winners into a shipped config table: for each (model, format, T) of a kernel_profile JSON, the
fastest variant's config replaces the table's bucket when it beats the ``base`` variant's step by ``--min-gain``.
Base and candidates may come from separate runs (several JSON files; rows keyed by model, format, tokens, variant).

    PYTHONPATH=src python benchmarks/ship_buckets.py base.json cand.json --table src/moekit/configs/NVIDIA_H200.json
"""

from __future__ import annotations

import argparse
import json

import torch

from moekit.benchmarking import MODELS
from moekit.ops import triton_configs as tc

QUANT_KEYS = {"mxfp4": "mxfp4", "int4": "int4_g32", "fp8": "fp8_block128x128"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--table", required=True)
    ap.add_argument("--min-gain", type=float, default=0.05)
    a = ap.parse_args(argv)
    points: dict = {}
    for path in a.results:
        for r in json.load(open(path))["rows"]:
            points.setdefault((r["model"], r["fmt"], r["tokens"]), {})[r["variant"]] = r
    table = json.load(open(a.table))
    for (model, fmt, t), v in sorted(points.items()):
        if "base" not in v or len(v) < 2:
            continue
        base = v["base"]["us"]
        best = min((r for n, r in v.items() if n != "base"), key=lambda r: r["us"])
        gain = 1 - best["us"] / base
        m = MODELS[model]
        key = tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, QUANT_KEYS[fmt])
        ship = gain >= a.min_gain and str(t) in table["entries"].get(key, {})
        print(f"{model:14s} {fmt:6s} T={t:6d} base {base:9.1f} best {best['variant'][:12]:12s} {best['us']:9.1f} "
              f"{100 * gain:5.1f} %{'  shipped' if ship else ''}")
        if ship:
            table["entries"][key][str(t)] = best["config"]
    with open(a.table, "w") as f:
        f.write(json.dumps(table, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
