"""A/B of the eager bucket replay (round 23): a patched transformers MoE block, eager, with the direct bucket
replay (``replay_bucket``: a checked input key goes straight to its bucket graph) and without it (the checked
path every call), alternated in one process, beside transformers' ``grouped_mm`` block of the same model.

Per model and batch x seq shape: ``grouped_mm`` eager ms (CUDA events, median; measured before patching), then
``rounds`` alternations of ``direct`` / ``checked`` (each first in every other round: clock drift within a round
hits both): the block's eager ms (``time_events``, median of ``iters`` calls, each from an idle GPU: what
``bench_transformers`` reports) and its host µs per call back to back (``time_host``). The ``checked``
variant disables the direct replay by replacing ``moekit.runner.replay_bucket`` with a function returning None.

    PYTHONPATH=src:benchmarks python benchmarks/eager_ab.py --models qwen3_moe_30b_a3b,deepseek_v3 \
        --shapes 8x1,64x1,1x1024 [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import bench_transformers as bt
from block_trace import _build, block_input, write_json
from moekit.benchmarking import time_events
from moekit.benchmarking.eager import time_host


def _eager_ms(block, x, device, iters: int) -> float:
    return time_events(lambda: block(x), iters, warmup=3, device=device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3_moe_30b_a3b,deepseek_v3")
    ap.add_argument("--shapes", default="8x1,64x1,1x1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from moekit import runner
    from moekit.integrations.transformers import patch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    real, off = runner.replay_bucket, (lambda *_a, **_k: None)
    result = {}
    for key in args.models.split(","):
        model, config = _build(key, device, args.tiny)
        model.set_experts_implementation("grouped_mm")
        block = bt._moe_block(model)
        inputs = [(shape, block_input(shape, config.hidden_size, device)) for shape in args.shapes.split(",")]
        rows = {}
        with torch.inference_mode():
            for shape, x in inputs:
                rows[shape] = {"grouped_mm_ms": round(_eager_ms(block, x, device, args.iters), 4)}
            patch(model)
            block = bt._moe_block(model)
            for shape, x in inputs:
                row = rows[shape]
                for _ in range(5):
                    block(x)  # captures
                for r in range(args.rounds):
                    pair = (("direct", real), ("checked", off))
                    for name, fn in pair if r % 2 == 0 else pair[::-1]:  # each variant first in every other round
                        runner.replay_bucket = fn
                        try:
                            ms = _eager_ms(block, x, device, args.iters)
                            host = time_host(lambda: block(x), [()]) if cuda else float("nan")
                        finally:
                            runner.replay_bucket = real
                        row.setdefault(f"{name}_ms", []).append(round(ms, 4))
                        row.setdefault(f"{name}_host_us", []).append(round(host, 1))
                med = {n: statistics.median(row[f"{n}_ms"]) for n in ("direct", "checked")}
                g = row["grouped_mm_ms"]
                print(f"{key:18s} {shape:7s} grouped_mm {g:.4f} ms | direct {med['direct']:.4f} ms "
                      f"({g / med['direct']:.2f}x, host {statistics.median(row['direct_host_us'])} us) | checked "
                      f"{med['checked']:.4f} ms ({g / med['checked']:.2f}x, host "
                      f"{statistics.median(row['checked_host_us'])} us)", flush=True)
        result[key] = rows
        del model, block
        if cuda:
            torch.cuda.empty_cache()
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
