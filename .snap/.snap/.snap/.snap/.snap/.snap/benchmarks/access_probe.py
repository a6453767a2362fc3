"""DRAM efficiency of the fp8 decode GEMMs' weight access pattern, the GEMM taken out (a streaming probe).

Round 28's Nsight Compute readings (docs/kernels.md): at T = 1 the DeepSeek-V3 fp8 w2 (896 programs, each 64 weight
rows x 2048 bytes in 16 steps of a [64 rows, 128 bytes] box) read its 118 MB at 66 % of the DRAM peak, the w13
(256 programs, 56 steps) at 82 %, Mixtral's w2 (128 programs, 112 steps) at 62 %. Is the box shape (128 bytes of
each row per step) part of it, or only the programs' count and length? Each program here streams the same rows as
a decode GEMM program (``rows`` weight rows x ``cols`` bytes, a contiguous region), one box per step, summing the
bytes (so nothing is elided), with the same ring depth (``num_stages``): only the box changes, [64, 128] ->
[32, 256] -> [16, 512] -> [8, 1024] bytes (8 KB each), through a TMA descriptor or by pointers. µs per pass in a
CUDA graph (median), TB/s against the run's read ceiling (``bench.measure_ceilings``).

    PYTHONPATH=src python benchmarks/access_probe.py [--shapes deepseek-v3-w2,...] [--out FILE.json] [--once]

The shapes: DeepSeek-V3 w2 at T = 1 (8 experts x 7168 rows x 2048), its w13 (8 x 4096 x 7168), Mixtral w2 at T = 1
(2 x 4096 x 14336). If a wide box streams faster at the same program count and length, a decode GEMM whose K step
covers several 128-column scale blocks (one promotion per block, the same reduction order) is the next experiment.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

#: name -> (weight rows in all, bytes per row, rows per program, ring stages): the shipped decode tiles' programs
SHAPES = {
    "deepseek-v3-w2": (8 * 7168, 2048, 64, 3),
    "deepseek-v3-w13": (8 * 4096, 7168, 128, 4),  # a w13 program reads 64 gate + 64 up rows
    "mixtral-w2": (2 * 4096, 14336, 64, 6),
    # round 30: the same w2 rows in fewer, longer programs (the Gluon decode w2's "gluon_nt": 2 / 4 column tiles)
    "deepseek-v3-w2-nt2": (8 * 7168, 2048, 128, 3),
    "deepseek-v3-w2-nt4": (8 * 7168, 2048, 256, 3),
    # round 32: the decode w13 grids of the H200 fp8 table's T = 1 buckets, a program's 128 gate + 128 up rows as 256
    # contiguous ones (boxes 4 / 5: the 16 / 32 KB a w13 step reads), ring depths as shipped: Mixtral (224 programs,
    # two per SM), DeepSeek-V3 at BN 128 (128 programs), gpt-oss (92 programs, 2880 bytes cut to 2816 = 22 boxes)
    "mixtral-w13": (224 * 256, 4096, 256, 3),
    "deepseek-v3-w13-bn128": (8 * 4096, 7168, 256, 5),
    "gpt-oss-w13": (92 * 256, 2816, 256, 5),
}
#: (box rows, box bytes per row): 8 KB per step each, then 16 and 32 KB (round 32: a decode w13 step's gate and up
#: tiles of 64 or 128 rows)
BOXES = [(64, 128), (32, 256), (16, 512), (8, 1024), (128, 128), (256, 128)]


@triton.jit
def stream_kernel(desc, w_ptr, out_ptr, stride, COLS: tl.constexpr, ROWS: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr, STAGES: tl.constexpr, USE_TMA: tl.constexpr):
    """Program p sums the bytes of rows [p·ROWS, (p + 1)·ROWS) x [0, COLS) of ``w`` (uint8), one [BR, BC] box per
    step, row groups outer, columns inner (a decode GEMM's order when BR = ROWS); ``out[p]`` = the sum. Each step's
    box is summed over its rows into a [BC] accumulator (round 32: a [BR, BC] one took too many registers for the
    32 KB boxes)."""
    pid = tl.program_id(0)
    row0 = pid * ROWS
    n_c: tl.constexpr = COLS // BC
    acc = tl.zeros([BC], dtype=tl.int32)
    for s in tl.range(0, (ROWS // BR) * n_c, num_stages=STAGES):
        r = row0 + (s // n_c) * BR
        c = (s % n_c) * BC
        if USE_TMA:
            t = desc.load([r, c])
        else:
            rr = (r + tl.arange(0, BR)).to(tl.int64)
            t = tl.load(w_ptr + rr[:, None] * stride + c + tl.arange(0, BC)[None, :])
        acc += tl.sum(t.to(tl.int32), axis=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream(w: torch.Tensor, rows: int, box: tuple[int, int], stages: int, tma: bool) -> torch.Tensor:
    """One pass of :func:`stream_kernel` over ``w`` [R, C] uint8: the per-program byte sums [R / rows] int32."""
    n_rows, cols = w.shape
    if n_rows % rows or rows % box[0] or cols % box[1]:
        raise ValueError(f"rows={rows} and box={box} must tile w of shape {tuple(w.shape)}")
    out = torch.empty(n_rows // rows, dtype=torch.int32, device=w.device)
    desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(w, list(box))
    stream_kernel[(n_rows // rows,)](desc, w, out, w.stride(0), COLS=cols, ROWS=rows, BR=box[0], BC=box[1],
                                     STAGES=stages, USE_TMA=tma, num_warps=4)
    return out


def reference(w: torch.Tensor, rows: int) -> torch.Tensor:
    """The per-program byte sums, in torch."""
    return w.view(-1, rows * w.shape[1]).to(torch.int64).sum(1).to(torch.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--boxes", default=None, help="box indices into BOXES to run (e.g. 0 for [64, 128] only)")
    ap.add_argument("--once", action="store_true",
                    help="each variant launched once, checked, not timed (for Nsight Compute: one launch per variant)")
    a = ap.parse_args(argv)
    from moekit.benchmarking.bench import measure_ceilings
    from moekit.benchmarking.timer import time_graph

    dev = torch.device("cuda")
    _, read_bps, _ = (0.0, 1.0, 0.0) if a.once else measure_ceilings(dev)
    print(f"read ceiling {read_bps / 1e12:.3f} TB/s", flush=True)
    rows_out = []
    for name in a.shapes.split(","):
        n_rows, cols, rows, stages = SHAPES[name]
        w = torch.randint(0, 256, (n_rows, cols), dtype=torch.uint8, device=dev)
        want = reference(w, rows)
        for tma in (True, False):
            for bi, box in enumerate(BOXES):
                if rows % box[0] or (a.boxes is not None and str(bi) not in a.boxes.split(",")):
                    continue
                try:  # (a TMA box wider than 256 elements may be refused by the driver: the other rows still run)
                    got = stream(w, rows, box, stages, tma)
                    if not torch.equal(got, want):
                        raise AssertionError(f"{name} box {box} tma={tma}: wrong sums")
                    if a.once:
                        print(f"{name:16s} {'tma' if tma else 'ptr'} box {box}: sums right", flush=True)
                        continue
                    us = time_graph(stream, [(w, rows, box, stages, tma)], target_ms=20.0, replays=7)
                except Exception as exc:  # noqa: BLE001 - reported per row, the probe goes on
                    print(f"{name:16s} {'tma' if tma else 'ptr'} box {box}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                tbps = w.numel() / (us * 1e-6) / 1e12
                print(f"{name:16s} {'tma' if tma else 'ptr'} box {box[0]:3d} x {box[1]:5d}  programs {n_rows // rows:5d}  "
                      f"steps {rows // box[0] * cols // box[1]:4d}  {us:8.1f} us  {tbps:5.2f} TB/s  "
                      f"{100 * tbps * 1e12 / read_bps:5.1f} % of read", flush=True)
                rows_out.append(dict(shape=name, tma=tma, box=list(box), programs=n_rows // rows, us=round(us, 2),
                                     tbps=round(tbps, 3), pct_read=round(100 * tbps * 1e12 / read_bps, 1)))
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev), read_bps=read_bps, rows=rows_out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
