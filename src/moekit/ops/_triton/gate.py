"""The router gate GEMM, batch invariant:

    logits[t, n] = Σ_h x[t, h] · W[n, h]  (+ b[n])          float32 products and sums, rounded once to out's dtype

x: [T, H] bf16 / fp16 / fp32; W: [N, H] (any of those); b: [N] or none; out: [T, N] fp32 / bf16 / fp16.

One program per (BM rows, BN columns) tile; the H loop runs in steps of ``BK`` from h = 0 upwards in every
program and for every tile shape, so a row's sums do not depend on the rows around it or on T (the
launcher keeps ``BK`` fixed; SPEC §9). Equal bf16 / fp16 operand dtypes run on tensor cores (their products
are exact in fp32); otherwise both tiles are widened to fp32 and ``IEEE`` dots (fp32 FMAs) are used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quant import to_dt


@triton.jit
def gate_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, T, N, H, stride_xt, stride_wn, stride_ot,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Grid (cdiv(T, BM), cdiv(N, BN))."""
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mmask, nmask = rm < T, rn < N
    xp = x_ptr + rm[:, None] * stride_xt + rk[None, :]
    wp = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, H, BK):
        kmask = (k0 + rk) < H
        a = tl.load(xp + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wp + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        if IEEE or INTERP:  # (the interpreter's dot reads bf16 tiles as their integer bits)
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_ot + rn[None, :], to_dt(acc, out_ptr.dtype.element_ty, INTERP),
             mask=mmask[:, None] & nmask[None, :])
