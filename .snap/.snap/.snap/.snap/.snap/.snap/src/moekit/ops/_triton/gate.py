"""The router gate GEMM, batch invariant:

    logits[t, n] = (Σ_{s < S} Σ_{h in chunk s} x[t, h] · W[n, h])  (+ b[n])     float32 products and sums,
                                                                               rounded once to out's dtype

x: [T, H] bf16 / fp16 / fp32; W: [N, H] (any of those); b: [N] or none; out: [T, N] fp32 / bf16 / fp16.

H is cut into ``S`` chunks of ``KS`` columns (the last may be shorter). :func:`gate_kernel` runs one program per
(BM rows, BN columns, chunk) tile; its loop over the chunk runs in steps of ``BK`` from the chunk's start
upwards. With ``S = 1`` it writes the output (+ bias, rounded); otherwise fp32 partial sums ``part[s, t, n]``
that :func:`gate_sum_kernel` adds in chunk order (+ bias, rounded). ``S``, ``KS`` and ``BK`` depend on H only
(the launcher), never on T: a row's sums are the same operations whatever the rows around it (SPEC §9),
while decode still gets ``S`` times the programs. Equal bf16 / fp16 operand dtypes run on tensor cores (their
products are exact in fp32); otherwise both tiles are widened to fp32 and ``IEEE`` dots (fp32 FMAs) are used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quant import to_dt


@triton.jit
def gate_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, T, N, H, KS, stride_xt, stride_wn, stride_os, stride_ot,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Grid (cdiv(T, BM), cdiv(N, BN), S): chunk ``s`` covers columns [s·KS, min(H, (s+1)·KS)) and writes
    ``out + s·stride_os`` (S = 1: the output itself)."""
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    s = tl.program_id(2).to(tl.int64)
    rk = tl.arange(0, BK)
    mmask, nmask = rm < T, rn < N
    k_end = tl.minimum((s + 1) * KS, H)
    xp = x_ptr + rm[:, None] * stride_xt + rk[None, :]
    wp = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(s * KS, k_end, BK):
        kmask = (k0 + rk) < k_end
        a = tl.load(xp + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wp + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        if IEEE or INTERP:  # (the interpreter's dot reads bf16 tiles as their integer bits)
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + s * stride_os + rm[:, None] * stride_ot + rn[None, :],
             to_dt(acc, out_ptr.dtype.element_ty, INTERP), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def gate_sum_kernel(
    part_ptr, b_ptr, out_ptr, N, S, stride_ps, stride_pt, stride_ot,
    BN: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP: tl.constexpr,
):
    """Grid (T, cdiv(N, BN)): ``out[t, n] = (Σ_{s = 0..S-1} part[s, t, n]) (+ b[n])``, in chunk order, rounded once."""
    t = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = rn < N
    acc = tl.zeros([BN], dtype=tl.float32)
    p = part_ptr + t * stride_pt + rn
    for _ in range(0, S):  # a pointer step per chunk: s · stride_ps (int32) wrapped at (S - 1)·rows·N >= 2^31
        acc += tl.load(p, mask=nmask, other=0.0)
        p += stride_ps
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + rn, to_dt(acc, out_ptr.dtype.element_ty, INTERP), mask=nmask)
