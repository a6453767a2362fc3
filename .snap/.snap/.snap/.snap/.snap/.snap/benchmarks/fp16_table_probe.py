"""fp16 activations on a GPU with bf16 tables: the shipped tables are keyed by dtype, so a float16 layer of a benchmark
shape runs the heuristic. This times the experts step (CUDA graph, median µs, alternated twice) under the heuristic
for float16 and under the bf16 table's entry for the same bucket, and checks that rows keep their bits alone (T = 1
bucket's config) and inside a batch of each bucket (that bucket's config) when float16 runs the bf16 table.

    PYTHONPATH=src:benchmarks python benchmarks/fp16_table_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.tune import Kernel, make_problem
from moekit.ops.config_heuristic import heuristic_config
from moekit.ops.triton_configs import nearest_bucket, shape_key, shape_table
from quant_probe import time_alternated  # benchmarks/: the script's own folder

TOKENS = [1, 8, 64, 256, 1024, 4096]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b,gpt-oss-120b")
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    props = torch.cuda.get_device_properties(dev)
    cap = torch.cuda.get_device_capability(dev)
    rows = []
    for model in args.models.split(","):
        m = MODELS[model]
        e = m.E
        table = shape_table(name, shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated))[1]
        if not table:
            print(f"{model}: no bf16 table on {name}")
            continue
        call = Kernel(m.act)
        weights = None
        for t in TOKENS:
            probs = []
            for s in range(2):
                pr = make_problem(t, e, m.H, m.I, m.K, torch.float16, m.act, m.has_bias, dev, seed=s, weights=weights)
                weights = (pr[1], pr[2], pr[5], pr[6])
                probs.append(pr)
            vs = {"heuristic": heuristic_config(t, m.E, m.H, m.I, m.K, torch.float16, props.multi_processor_count, None,
                                                cap),
                  "bf16-table": nearest_bucket(table, t)}
            times = time_alternated({v: (lambda pr, c=cfg: call(pr, c)) for v, cfg in vs.items()},
                                    [(p,) for p in probs], 2)
            # rows alone (the table's smallest bucket) vs in this batch (this bucket's entry), fp16
            x, w1, w2, tw, ids, b1, b2 = probs[0]
            out = call(probs[0], vs["bf16-table"])
            n = min(t, 4)
            same = all(torch.equal(out[i], call((x[i:i + 1], w1, w2, tw[i:i + 1], ids[i:i + 1], b1, b2),
                                                table[min(table, key=int)])[0]) for i in range(n))
            h, b = min(times["heuristic"]), min(times["bf16-table"])
            rows.append(dict(shape=model, T=t, heuristic_us=h, table_us=b, rows_identical=same,
                             config=vs["bf16-table"]))
            print(f"{model:16s} T={t:5d} heuristic {h:9.1f}  bf16-table {b:9.1f}  ({h / b:.2f}x)  rows alone = in "
                  f"batch: {same}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": name, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
