"""Quantised operands of the grouped GEMMs (SPEC §8): fp8 activation quantisation, fp8 dots, 4-bit unpacking.

``QUANT`` codes (a constexpr of :mod:`.grouped_gemm`'s kernels): 0 none (params dtype), 1 fp8 block,
2 fp8 row (per-channel / per-tensor weights, per-token or static activations), 3 mxfp4, 4 int4 groups.

fp8 activations, per row ``t`` and group ``g`` (``G`` columns; row mode: the whole row)::

    s[t, g] = max(amax |x[t, g]|, 1e-10) / 448          (ue8m0: 2^ceil(log2 s), exact, by exponent bits)
    x_q     = e4m3(clamp(x / s, -448, 448))            round to nearest even

Static: ``s`` is one given scalar. Weight-only formats, ``W[n, k]`` for one packed tile::

    mxfp4  W = e2m1(code) · 2^(e8m0 - 127)     code = nibble (low = even k), e2m1 = ±{0, .5, 1, 1.5, 2, 3, 4, 6}
    int4   W = (nibble - 8) · s[n, k // G]     eight nibbles per int32, element j at bits 4j

The dequantised tile is rounded to the activations' dtype in registers (never written to memory).
``INTERP`` (the Triton interpreter only): its fp32 -> e4m3 cast loses the carry of a mantissa that
rounds up into the next binade (7.96 -> 4, not 8), so the value is first rounded to the e4m3 grid by
bit arithmetic (exact, ties to even), after which the cast is exact.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_BLOCK = tl.constexpr(1)
FP8_ROW = tl.constexpr(2)
MXFP4 = tl.constexpr(3)
INT4 = tl.constexpr(4)


@triton.jit
def _round_e4m3_grid(v):
    """fp32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even, still fp32."""
    b = v.to(tl.int32, bitcast=True)
    lsb = (b >> 20) & 1  # keep 3 of fp32's 23 mantissa bits
    normal = ((b + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = (a + 16384.0) - 16384.0  # subnormals (|v| < 2^-6): multiples of 2^-9, fp32 add rounds to even
    return tl.where(a < 0.015625, tl.where(v < 0, -sub, sub), normal)


@triton.jit
def to_e4m3(v, INTERP: tl.constexpr):
    """``e4m3(clamp(v, ±448))`` of fp32 ``v``, round to nearest even."""
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if INTERP:
        v = _round_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def to_dt(v, DT: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``v`` rounded to ``DT`` (nearest even). ``INTERP``: the interpreter truncates fp32 -> bf16, so
    bf16 is rounded by bit arithmetic first (the cast of the rounded value is then exact)."""
    if INTERP:
        if DT == tl.bfloat16:
            b = v.to(tl.int32, bitcast=True)
            v = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def act_scale(amax, UE8M0: tl.constexpr):
    """``s = max(amax, 1e-10) / 448``; ``UE8M0``: ``2^ceil(log2 s)`` (a set mantissa bit carries into the
    exponent, then the mantissa is cleared: exact for the normal ``s`` this produces)."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-10), 448.0)
    if UE8M0:
        b = s.to(tl.int32, bitcast=True)
        s = ((b + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def quantize_tile(x, s, INTERP: tl.constexpr):
    """``e4m3(clamp(x / s, ±448))`` (fp32 ``x``, ``s`` broadcastable to it)."""
    return to_e4m3(tl.math.div_rn(x, s), INTERP)


@triton.jit
def dot_f32(a, b, INTERP: tl.constexpr, FP8_ACC: tl.constexpr = 0):
    """A fresh fp32 ``a · b`` of fp8 tiles (the caller scales it and adds it to its accumulator in fp32).

    ``FP8_ACC`` picks the instruction, which must be the same for every token bucket of a shape (SPEC §9):

    - ``0`` (``max_num_imprecise_acc=0``): Triton lowers the dot, whatever the tile, to fp16
      ``mma.sync m16n8k16`` on exact e4m3 -> fp16 upcasts (products exact in fp32, fp32 accumulation in k
      order). Exact, any ``BLOCK_M``, but at the fp16 rate and with the upcasts in the main loop.
    - ``n > 0`` (``max_num_imprecise_acc=n``): Hopper fp8 ``wgmma m64nNk32 e4m3`` (needs ``BLOCK_M`` >= 64
      and 4 or 8 warps: :meth:`QuantSpec.fix_config` enforces both, so every bucket runs the same
      instruction); the tensor core keeps its running sum in reduced precision for ``n`` products, then
      Triton promotes it into an fp32 register. With ``n`` = 32 every k32 instruction is promoted; the
      fresh dot per K step (BK = the scale block) bounds the chain to one block in any case (DeepSeek-V3's
      "promote every 128" recipe). A row's result depends on its own operands and ``BK`` only, never on
      ``BLOCK_M``/``BLOCK_N``: one instruction shape per row of 64.

    (Checked in the sm_90 PTX by ``benchmarks/compile_sm90.py``.)"""
    if INTERP:  # fp8 products are exact in fp32; only the order of the fp32 sum differs from hardware
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if FP8_ACC == 0:
        return tl.dot(a, b, max_num_imprecise_acc=0)
    return tl.dot(a, b, max_num_imprecise_acc=FP8_ACC)


@triton.jit
def _e2m1(c):
    """int32 e2m1 codes (bit 3 sign, bits 0-2 the magnitude index) -> fp32 ±{0, .5, 1, 1.5, 2, 3, 4, 6}.
    For index m >= 2 the fp32 bits are ``(m + 252) << 22`` (exponent m // 2 - 1, mantissa bit m % 2)."""
    m = c & 7
    bits = tl.where(m >= 2, (m + 252) << 22, tl.where(m == 1, 0x3F000000, 0))
    v = bits.to(tl.float32, bitcast=True)
    return tl.where(c >= 8, -v, v)


@triton.jit
def _scale_f32(s, QUANT: tl.constexpr):
    """Group scales -> fp32: e8m0 ``2^(s - 127)`` from its exponent bits (s = 0: 2^-127, a subnormal)."""
    if QUANT == MXFP4:
        sb = s.to(tl.int32)
        return tl.where(sb == 0, 0x400000, sb << 23).to(tl.float32, bitcast=True)
    return s.to(tl.float32)


@triton.jit
def load_packed_w(ptrs, s_row, k0, K, nmask, DT: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr,
                  G: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr):
    """[BK, BN] tile of ``W[n, k0 + k]`` in ``DT`` from packed weights, dequantised in registers.

    ptrs: [BK / PACK, BN] pointers to the packed words of k0 (uint8: 2 codes, int32: 8 nibbles);
    s_row: [BN] pointers to the scale row of each column (``G`` k values per scale); K: true length."""
    kp = tl.arange(0, BK // PACK)
    if EVEN_K:
        p = tl.load(ptrs, mask=nmask[None, :], other=0)
    else:
        p = tl.load(ptrs, mask=(kp[:, None] < (K - k0) // PACK) & nmask[None, :], other=0)
    shifts = tl.arange(0, PACK) * 4
    nib = (p.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/PACK, PACK, BN], k = kk·PACK + j
    if QUANT == MXFP4:
        w = tl.reshape(_e2m1(nib), (BK, BN))
    else:
        w = tl.reshape((nib - 8).to(tl.float32), (BK, BN))
    if BK >= G:
        g = k0 // G + tl.arange(0, BK // G)
        s = tl.load(s_row[None, :] + g[:, None], mask=(g[:, None] < K // G) & nmask[None, :], other=0)
        s = tl.reshape(tl.broadcast_to(_scale_f32(s, QUANT)[:, None, :], (BK // G, G, BN)), (BK, BN))
    else:  # the whole tile lies in one group
        s = _scale_f32(tl.load(s_row + k0 // G, mask=nmask, other=0), QUANT)[None, :]
    return to_dt(w * s, DT, INTERP)


@triton.jit
def requant_store(h, q_ptrs, qmask, s_ptr, s_offs, smask, qs_ptr, nmask, DT: tl.constexpr, REQ: tl.constexpr,
                  UE8M0: tl.constexpr, INTERP: tl.constexpr):
    """The w13 epilogue's fused activation quantisation of ``h`` (fp32 [BM, BN], rounded to ``DT`` first):
    ``REQ == 1``: one group per row of the tile (BN == the group size), scales stored at ``s_ptr + s_offs``
    [BM]; ``REQ == 2``: the static scale ``*qs_ptr``. Stores e4m3 at ``q_ptrs``."""
    hr = to_dt(h, DT, INTERP).to(tl.float32)
    if REQ == 1:
        s = act_scale(tl.max(tl.where(nmask[None, :], tl.abs(hr), 0.0), axis=1), UE8M0)
        tl.store(s_ptr + s_offs, s, mask=smask)
        q = quantize_tile(hr, s[:, None], INTERP)
    else:
        q = quantize_tile(hr, tl.load(qs_ptr).to(tl.float32), INTERP)
    tl.store(q_ptrs, q, mask=qmask)


@triton.jit
def act_quant_kernel(
    x_ptr, q_ptr, s_ptr, tw_ptr, qs_ptr, K, stride_xt, stride_qt, stride_st, stride_twt,
    G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, UE8M0: tl.constexpr,
    ON_INPUT: tl.constexpr, INTERP: tl.constexpr,
):
    """x [T, K] (params dtype) -> x_q [T, K] e4m3 and s (module docstring).

    ``MODE`` 0: groups of ``G`` columns, grid (T, cdiv(⌈K/G⌉, GP)), ``GP`` groups per program, s [T, ⌈K/G⌉];
    1: one group per row, grid (T,), two passes over ``BLOCK`` columns, s [T, 1];
    2: static, ``s = *qs_ptr`` (nothing stored in s), grid (T,).
    ``ON_INPUT`` (K = 1 routing weight on the input): ``x = round(x · w[t, 0])`` first, as the twin does."""
    t = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + t * stride_xt
    qrow = q_ptr + t * stride_qt
    if ON_INPUT:
        w_in = tl.load(tw_ptr + t * stride_twt).to(tl.float32)
    if MODE == 0:
        gi = tl.program_id(1) * GP + tl.arange(0, GP)
        cols = gi[:, None] * G + tl.arange(0, G)[None, :]
        m = cols < K
        x = tl.load(xrow + cols, mask=m, other=0.0).to(tl.float32)
        if ON_INPUT:
            x = to_dt(x * w_in, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
        s = act_scale(tl.max(tl.abs(x), axis=1), UE8M0)
        tl.store(qrow + cols, quantize_tile(x, s[:, None], INTERP), mask=m)
        tl.store(s_ptr + t * stride_st + gi, s, mask=gi * G < K)
    else:
        if MODE == 1:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                cols = k0 + tl.arange(0, BLOCK)
                x = tl.load(xrow + cols, mask=cols < K, other=0.0).to(tl.float32)
                if ON_INPUT:
                    x = to_dt(x * w_in, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            s = act_scale(tl.max(amax, axis=0), UE8M0)
            tl.store(s_ptr + t * stride_st, s)
        else:
            s = tl.load(qs_ptr).to(tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            x = tl.load(xrow + cols, mask=cols < K, other=0.0).to(tl.float32)
            if ON_INPUT:
                x = to_dt(x * w_in, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
            tl.store(qrow + cols, quantize_tile(x, s, INTERP), mask=cols < K)
