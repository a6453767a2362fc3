"""CPU cost of the quantised torch path (the twin) beside the bf16 one, and its dequantisation, fast forms vs rules.

    PYTHONPATH=src python benchmarks/bench_cpu_quant.py --out benchmarks/results/cpu_dequant-<date>-<tag>.json

Two measurements, each a median of ``--reps`` wall-clock runs (``time.perf_counter``) on ``--threads`` threads:

- ``dequant``: one expert's w13 + w2 dequantised into the twin's GEMM dtype by ``dequantize_weight`` (the fast forms
  of ``ops/_dequant_fast.py``) and by the rules alone (``fast_ok`` patched to False), with their bits compared.
- ``forward``: ``fused_experts_torch`` on bf16 weights beside ``fused_experts_quant_torch`` on the same experts
  quantised (mxfp4, int4 g32, fp8 block 128), fast forms vs rules, outputs compared bit for bit.

The machine's other load moves wall clock: run it on an idle machine and read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from unittest import mock

import torch

from moekit.ops import quantize as qmod
from moekit.ops.experts import fused_experts_torch
from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format

FORMATS = {"mxfp4": Mxfp4Format(), "int4_g32": Int4GroupFormat(group_size=32),
           "fp8_block": Fp8BlockFormat(block_n=128, block_k=128)}
SHAPES = {"gpt-oss-20b": (32, 2880, 2880, 4), "small": (32, 1024, 1024, 4)}  # E, H, I, K


def timed(fn, reps: int):
    fn()  # warm (allocator, thread pool)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    w = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(w), b.contiguous().view(w))


def rules_only():
    return mock.patch.object(qmod, "fast_ok", lambda *a: False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt-oss-20b,small")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tokens", default="1,64,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        e, h, i, k = SHAPES[shape]
        torch.manual_seed(0)
        w13 = (torch.randn(e, 2 * i, h) * 0.02).bfloat16()
        w2 = (torch.randn(e, h, i) * 0.02).bfloat16()
        for name in args.formats.split(","):
            fmt = FORMATS[name]
            q13, s13 = qmod.quantize_weight(w13.float(), fmt, shards=2)
            q2, s2 = qmod.quantize_weight(w2.float(), fmt)
            gemm = torch.float32 if fmt.quantizes_activations else torch.bfloat16

            def deq():
                return (qmod.dequantize_weight(q13[0], s13[0], fmt, shards=2, dtype=gemm),
                        qmod.dequantize_weight(q2[0], s2[0], fmt, dtype=gemm))
            ms_fast, a = timed(deq, args.reps)
            with rules_only():
                ms_rule, b = timed(deq, args.reps)
            row = dict(what="dequant", shape=shape, E=e, H=h, I=i, format=name, dtype=str(gemm), fast_ms=ms_fast,
                       rules_ms=ms_rule, speedup=ms_rule / ms_fast, same_bits=all(map(same_bits, a, b)))
            print(json.dumps(row), flush=True)
            rows.append(row)
            for t in map(int, args.tokens.split(",")):
                x = torch.randn(t, h).bfloat16()
                ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.empty(0, k).long()
                tw = torch.softmax(torch.randn(t, k), -1)
                ms_bf16, _ = timed(lambda: fused_experts_torch(x, w13, w2, tw, ids), args.reps)

                def quant():
                    return fused_experts_quant_torch(x, q13, q2, tw, ids, fmt=fmt, w13_scale=s13, w2_scale=s2)
                ms_q, a = timed(quant, args.reps)
                with rules_only():
                    ms_qr, b = timed(quant, args.reps)
                row = dict(what="forward", shape=shape, E=e, H=h, I=i, K=k, T=t, format=name, bf16_ms=ms_bf16,
                           quant_fast_ms=ms_q, quant_rules_ms=ms_qr, fast_vs_bf16=ms_q / ms_bf16,
                           rules_vs_bf16=ms_qr / ms_bf16, same_bits=same_bits(a, b))
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = dict(torch=torch.__version__, threads=args.threads, cpu=platform.processor() or platform.machine(),
                reps=args.reps, command="python benchmarks/bench_cpu_quant.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(args).items() if k != "out"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
