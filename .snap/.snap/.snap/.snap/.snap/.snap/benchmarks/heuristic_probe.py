"""The untuned heuristic's middle regime (37-160 expected rows per touched expert) beside other tile forms, on shapes
with and without a table. Round 57 wrote it for the heuristic of round 56, which ran BLOCK_M 128 with 4-warp GEMMs
there (the w13 held two 128 x 64 float32 accumulators on 128 threads: ptxas spilled ~2 KB per thread); the
``heuristic`` row is whatever this tree's heuristic gives, and the other variants keep its BLOCK_K and (except where
named) its BLOCK_M. Each point's variants are timed in a CUDA graph (median µs), alternated twice, and their outputs
compared bit for bit with the heuristic's (SPEC §9: one BLOCK_K, so the same bits whatever the tiles).

    PYTHONPATH=src:benchmarks python benchmarks/heuristic_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json

import torch

from moekit.benchmarking.tune import Kernel, make_problem
from moekit.ops.config_heuristic import heuristic_config
from quant_probe import time_alternated  # benchmarks/: the script's own folder

# name: (E, H, I, K, dtype, token counts): rows per touched expert = T·K / min(E, T·K)
POINTS = {
    "custom-fp16": (60, 1000, 352, 6, torch.float16, [1000]),  # round 57's tune: 655 µs in use vs 127 tuned
    "qwen3-30b-a3b": (128, 2048, 768, 8, torch.bfloat16, [1024, 2048]),  # rows 64, 128
    "gpt-oss-120b": (128, 2880, 2880, 4, torch.bfloat16, [2048, 4096]),  # rows 64, 128
    "mixtral-8x7b": (8, 4096, 14336, 2, torch.bfloat16, [256]),  # rows 64
    "glm-4.5-air": (128, 4096, 1408, 8, torch.bfloat16, [1024]),  # rows 64
    "granite-3.0-3b": (40, 1536, 512, 8, torch.bfloat16, [256]),  # rows 51
    "deepseek-v2-lite": (64, 2048, 1408, 6, torch.bfloat16, [1024]),  # rows 96
}


def variants(t, e, h, i, k, dtype) -> dict[str, dict]:
    heur = heuristic_config(t, e, h, i, k, dtype, torch.cuda.get_device_properties(0).multi_processor_count, None,
                            torch.cuda.get_device_capability(0))
    bk = heur["w13"]["BK"]
    g = lambda bn, w, s: dict(BN=bn, BK=bk, GROUP_M=8, num_warps=w, num_stages=s)  # noqa: E731
    out = {"heuristic": heur}
    out["8w"] = {**heur, "w13": g(64, 8, 4), "w2": g(128, 8, 4)}
    out["bm128-big"] = {**heur, "BLOCK_M": 128, "w13": g(128, 8, 3), "w2": g(256, 8, 3), "tma": True}
    out["bm64-4w"] = {**heur, "BLOCK_M": 64, "w13": g(64, 4, 4), "w2": g(128, 4, 4), "tma": True}
    out["bm64-8w"] = {**heur, "BLOCK_M": 64, "w13": g(128, 8, 3), "w2": g(64, 4, 4), "tma": True}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, (e, h, i, k, dtype, tokens) in POINTS.items():
        call = Kernel("silu")
        weights = None
        for t in tokens:
            probs = []
            for s in range(3):
                pr = make_problem(t, e, h, i, k, dtype, "silu", False, dev, seed=s, weights=weights)
                weights = (pr[1], pr[2], pr[5], pr[6])
                probs.append(pr)
            vs = variants(t, e, h, i, k, dtype)
            ref = call(probs[0], vs["heuristic"])
            times = time_alternated({v: (lambda pr, c=cfg: call(pr, c)) for v, cfg in vs.items()},
                                    [(p,) for p in probs], args.rounds)
            for v, cfg in vs.items():
                same = torch.equal(call(probs[0], cfg), ref)
                us = min(times[v])
                rows.append(dict(shape=name, T=t, variant=v, us=us, all_us=times[v], identical=same, config=cfg))
                print(f"{name:16s} T={t:5d} {v:10s} {us:9.1f} us  {'/'.join(f'{x:.1f}' for x in times[v])}  "
                      f"bits {'=' if same else '!='}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
