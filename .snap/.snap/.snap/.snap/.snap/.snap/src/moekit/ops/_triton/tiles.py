"""Tile pieces of the grouped GEMMs (:mod:`.grouped_gemm`): operand loads (pointers or tensor descriptors, packed
4-bit weights), one K step of each format, swapped-operand orientation, int64 row offsets."""

from __future__ import annotations

import triton
import triton.language as tl

from .quant import FP8_BLOCK, FP8_ROW, MXFP4, dot_f32
from .w4_decode import load_packed_w


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a · b in fp32. ``UPCAST`` (interpreter only: its bf16 dot is wrong) multiplies in fp32,
    which is exact for bf16/fp16 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def load_a(ptrs, desc, row, k0, valid, kmask, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """[BM, BK] tile of activation rows (masked rows -> 0): by descriptor, or by pointers."""
    if USE_TMA:
        return desc.load([row, k0])
    elif EVEN_K:
        return tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)


@triton.jit
def load_w(ptrs, desc, row, k0, kmask, nmask, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """[BK, BN] tile of transposed weight rows: by descriptor (rows ``row..row+BN``), or by pointers."""
    if USE_TMA:
        return tl.trans(desc.load([row, k0]))
    elif EVEN_K:
        return tl.load(ptrs, mask=nmask[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)


@triton.jit
def load_b(ptrs, desc, row, k0, K, kmask, nmask, s, DT: tl.constexpr, QUANT: tl.constexpr,
            PACK: tl.constexpr, QG: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr,
            USE_TMA: tl.constexpr, UPCAST: tl.constexpr, W_ALIGN: tl.constexpr = 1, PTX: tl.constexpr = False,
            RELAID: tl.constexpr = False):
    """[BK, BN] weight tile ready for the dot: as stored (params dtype or e4m3), or unpacked to ``DT`` with
    the step's scales ``s`` (:func:`.w4_decode.load_w_scales`; ``RELAID``: packed in :mod:`..w4_layout`'s
    register-operand layout)."""
    # if / else on the constexpr: compiled Triton type-checks every return it reaches, and a ``return``
    # after a taken constexpr ``if`` is still reached (packed pointers in load_w: a shape error)
    if QUANT >= MXFP4:
        w = load_packed_w(ptrs, s, k0, K, nmask, DT, QUANT, PACK, QG, BK, BN, EVEN_K, UPCAST, W_ALIGN, PTX, RELAID)
    else:
        w = load_w(ptrs, desc, row, k0, kmask, nmask, EVEN_K, USE_TMA)
    return w


@triton.jit
def mma_step(a, b, acc, xs_rows, ws_row, kb, valid, nmask, QUANT: tl.constexpr, DOT_PREC: tl.constexpr,
          UPCAST: tl.constexpr, FP8_ACC: tl.constexpr, SWAP: tl.constexpr = False):
    """One K step: fp8 block ``acc + (a · b) · s_x[row, kb] · S[col, kb]`` (``xs_rows`` [BM], ``ws_row``
    [BN] scale pointers), fp8 row ``acc + a · b``, else the dot into acc.

    ``SWAP``: ``acc`` is the transposed accumulator [BN, BM] and the dot is ``bᵀ · aᵀ``: the weight tile
    is the MMA's left operand (on Hopper a wgmma m64 row block of weights, from registers when it was
    decoded there; tokens are the narrow N side, >= 16). Every element is the same products and scales;
    whether the tensor core sums them in the same order either way is measured, not assumed."""
    lhs, rhs = dot_operands(a, b, SWAP)
    if QUANT == FP8_BLOCK:
        a_s = tl.load(xs_rows + kb, mask=valid, other=0.0)
        w_s = tl.load(ws_row + kb, mask=nmask, other=0.0)
        acc = acc + dot_f32(lhs, rhs, UPCAST, FP8_ACC) * scale_outer(a_s, w_s, SWAP)
    elif QUANT == FP8_ROW:
        acc = acc + dot_f32(lhs, rhs, UPCAST, FP8_ACC)
    else:
        acc = mma(lhs, rhs, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def dot_operands(a, b, SWAP: tl.constexpr):
    """The dot's (left, right) operands: (a [BM, BK], b [BK, BN]), or swapped (bᵀ, aᵀ)."""
    if SWAP:
        return tl.trans(b), tl.trans(a)
    else:
        return a, b


@triton.jit
def scale_outer(row_s, col_s, SWAP: tl.constexpr):
    """The per-row times per-column scale product in the accumulator's orientation."""
    if SWAP:
        return col_s[:, None] * row_s[None, :]
    else:
        return row_s[:, None] * col_s[None, :]


@triton.jit
def acc0(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
    """A zero fp32 accumulator: [BM, BN], or [BN, BM] for ``SWAP`` (transposed back after the K loop)."""
    if SWAP:
        return tl.zeros([BN, BM], dtype=tl.float32)
    else:
        return tl.zeros([BM, BN], dtype=tl.float32)


@triton.jit
def acc_out(acc, SWAP: tl.constexpr):
    """The accumulator as [BM, BN] after the K loop."""
    if SWAP:
        return tl.trans(acc)
    else:
        return acc


@triton.jit
def row_offset(index, stride, W_ALIGN: tl.constexpr):
    """``index · stride`` (int64), hinted a multiple of ``W_ALIGN`` when it is > 1. Two traps: the hint must
    sit on the product computed here (on a value passed in as an argument it was dropped: gpt-oss int4 rows
    went back to 4-byte copies), and ``tl.multiple_of(x, 1)`` is no no-op: it replaces what Triton derived
    from the strides (divisible by 16), so bf16 weight rows were loaded 2 bytes at a time without cp.async or
    pipelining (sm_90 SASS main loop 68 -> 229 instructions; H200 pointer-load buckets 2.5-2.8x slower:
    Qwen3-30B-A3B T = 8 394 vs 141 µs, Mixtral T = 64 1698 vs 683 µs)."""
    off = index.to(tl.int64) * stride
    if W_ALIGN > 1:
        off = tl.multiple_of(off, W_ALIGN)
    return off


@triton.jit
def w_ptrs(w_base, offs_n, stride_wn, BK: tl.constexpr, PACK: tl.constexpr, W_ALIGN: tl.constexpr = 1):
    """Pointers to the weight rows ``offs_n`` at k = 0: [BK, BN] (transposed rows, as the dot takes them), or
    packed (``PACK`` > 1) [BN, BK / PACK] in memory order (:func:`.w4_decode.load_packed_w` unpacks along k).
    ``W_ALIGN``: every packed row starts on a multiple of this many elements (the launcher checked it), so
    the loads can be 16-byte vectors even when the row stride is no multiple of 16 (gpt-oss int4: 360)."""
    if PACK > 1:
        row = row_offset(offs_n, stride_wn, W_ALIGN)
        ptrs = w_base + row[:, None] + tl.arange(0, BK // PACK)[None, :]
    else:
        ptrs = w_base + offs_n.to(tl.int64)[None, :] * stride_wn + tl.arange(0, BK // PACK)[:, None]
    return ptrs
