"""Quantised operands of the grouped GEMMs (SPEC §8): fp8 activation quantisation, fp8 dots (the 4-bit weights'
decode: :mod:`.w4_decode`).

``QUANT`` codes (a constexpr of :mod:`.grouped_gemm`'s kernels): 0 none (params dtype), 1 fp8 block,
2 fp8 row (per-channel / per-tensor weights, per-token or static activations), 3 mxfp4, 4 int4 groups.

fp8 activations, per row ``t`` and group ``g`` (``G`` columns; row mode: the whole row)::

    s[t, g] = max(amax |x[t, g]|, 1e-10) / 448          (ue8m0: 2^ceil(log2 s), exact, by exponent bits)
    x_q     = e4m3(clamp(x / s, -448, 448))            round to nearest even

Static: ``s`` is one given scalar. ``INTERP`` (the Triton interpreter only): its fp32 -> e4m3 cast loses the carry
of a mantissa that rounds up into the next binade (7.96 -> 4, not 8), so the value is first rounded to the e4m3 grid
by bit arithmetic (exact, ties to even), after which the cast is exact.
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
    """``e4m3(clamp(v, ±448))`` of fp32 ``v``, round to nearest even; NaN stays NaN (the clamp's min / max drop it:
    round 49's audit saw a NaN input row come out finite; the group's amax ignores NaN, the NaN element carries it)."""
    c = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if INTERP:  # the interpreter's cast saturates NaN: write e4m3fn's NaN code (0x7F) itself
        nan = tl.full(v.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
        return tl.where(v != v, nan, _round_e4m3_grid(c).to(tl.float8e4nv))
    # (no tl.full here: Gluon kernels call this with layouts) the GPU's satfinite conversion keeps NaN a NaN
    return tl.where(v != v, v, c).to(tl.float8e4nv)


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
def _e4m3_f32(a):
    """fp8 e4m3fn -> fp32 in the interpreter, whose cast reads the NaN code (0x7F / 0xFF) as 480 (the GPU: NaN)."""
    return tl.where((a.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), a.to(tl.float32))


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
        return tl.dot(_e4m3_f32(a), _e4m3_f32(b), input_precision="ieee")
    if FP8_ACC == 0:
        return tl.dot(a, b, max_num_imprecise_acc=0)
    return tl.dot(a, b, max_num_imprecise_acc=FP8_ACC)


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
def _quant_groups(rows, cols, m, w_in, UE8M0: tl.constexpr, ON_INPUT: tl.constexpr, INTERP: tl.constexpr):
    """Groups of columns quantised, one group per row of ``cols`` ([GP, G] column offsets, mask ``m``) from the
    params-dtype rows at ``rows`` (one row's pointer, or [GP, 1] of them); ``ON_INPUT``: times the routing weight
    ``w_in`` (broadcastable), rounded to the params dtype first. Returns (the e4m3 values [GP, G], the scales [GP])."""
    x = tl.load(rows + cols, mask=m, other=0.0).to(tl.float32)
    if ON_INPUT:
        x = to_dt(x * w_in, rows.dtype.element_ty, INTERP).to(tl.float32)
    s = act_scale(tl.max(tl.abs(x), axis=1), UE8M0)
    return quantize_tile(x, s[:, None], INTERP), s


@triton.jit
def act_quant_kernel(
    x_ptr, q_ptr, s_ptr, tw_ptr, qs_ptr, K, R, stride_xt, stride_qt, stride_st, stride_twt,
    G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, UE8M0: tl.constexpr,
    ON_INPUT: tl.constexpr, INTERP: tl.constexpr, SLOTS: tl.constexpr = False, loc_ptr=None, rank_ptr=None,
    row_start_ptr=None, PDL: tl.constexpr = False, WAIT_FIRST: tl.constexpr = False,
):
    """x [R, K] (params dtype) -> x_q [R, K] e4m3 and s (module docstring).

    ``MODE`` 0: groups of ``G`` columns, s [R, ⌈K/G⌉]; the R·⌈K/G⌉ (row, group) pairs in row-major order, ``GP``
    of them per program, grid (cdiv(R·⌈K/G⌉, GP),) (a program may span rows: fewer, fuller programs than one per
    row when rows hold few groups). 1: one group per row, grid (R,), two passes over ``BLOCK`` columns, s [R, 1].
    2: static, ``s = *qs_ptr`` (nothing stored in s), grid (R,).
    ``ON_INPUT`` (K = 1 routing weight on the input): ``x = round(x · w[t, 0])`` first, as the twin does.
    ``SLOTS`` (w2's input in the sorted layout): ``R`` counts the S slots instead, and slot ``s`` stands for row
    ``row_start[loc[s]] + rank[s]`` (the align kernel's layout) when it is live, else for nothing: a block's padding
    rows, which no GEMM output reads, are skipped (at decode most rows are padding).
    ``PDL`` (a programmatic dependent launch): let the next launch begin (w2 after this w2-input quantiser, a
    programmatic dependent of w13), then wait for the grid before. ``WAIT_FIRST`` (the experts' input quantiser,
    launched as a programmatic dependent of whatever ran before, usually the routing kernel, which lets it start at
    once): wait for that grid first, then let the next launch begin, so that a launch after this one that reads the
    routing ids before its own grid wait (the Gluon decode w13) starts only once the grid that wrote them completed.
    Nothing is read or written before the wait, so the launch computes what a plain launch would."""
    if PDL:
        if WAIT_FIRST:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        else:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
    if MODE == 0:
        pair = tl.program_id(0).to(tl.int64) * GP + tl.arange(0, GP)
        ng = tl.cdiv(K, G)
        r = pair // ng
        gi = pair - r * ng
        live = r < R
        if SLOTS:
            e = tl.load(loc_ptr + r, mask=live, other=-1)
            live = live & (e >= 0)
            t = tl.load(row_start_ptr + e, mask=live, other=0) + tl.load(rank_ptr + r, mask=live, other=0)
            t = t.to(tl.int64)
        else:
            t = r
        cols = gi[:, None] * G + tl.arange(0, G)[None, :]
        m = live[:, None] & (cols < K)
        w_in = 1.0
        if ON_INPUT:
            w_in = tl.load(tw_ptr + t * stride_twt, mask=live, other=0.0).to(tl.float32)[:, None]
        xq, s = _quant_groups(x_ptr + t[:, None] * stride_xt, cols, m, w_in, UE8M0, ON_INPUT, INTERP)
        tl.store(q_ptr + t[:, None] * stride_qt + cols, xq, mask=m)
        tl.store(s_ptr + t * stride_st + gi, s, mask=live)
    else:
        if SLOTS:
            slot = tl.program_id(0)
            e = tl.load(loc_ptr + slot)
            if e < 0:
                return
            t = (tl.load(row_start_ptr + e) + tl.load(rank_ptr + slot)).to(tl.int64)
        else:
            t = tl.program_id(0).to(tl.int64)
        xrow = x_ptr + t * stride_xt
        qrow = q_ptr + t * stride_qt
        w_in = 1.0
        if ON_INPUT:
            w_in = tl.load(tw_ptr + t * stride_twt).to(tl.float32)
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


@triton.jit
def act_quant_sorted_kernel(
    x_ptr, q_ptr, s_ptr, tw_ptr, loc_ptr, rank_ptr, row_start_ptr, K, TOPK, stride_xt, stride_qr, stride_sg,
    stride_twt, G: tl.constexpr, GP: tl.constexpr, UE8M0: tl.constexpr, ON_INPUT: tl.constexpr,
    INTERP: tl.constexpr,
):
    """``act_quant_kernel``'s ``MODE`` 0 (groups of ``G`` columns, the same values and scales), each token's row
    stored at the sorted rows of its live slots instead of at row t: slot ``t · TOPK + j`` of local expert
    ``loc[slot] >= 0`` sits at row ``row_start[loc] + rank[slot]`` (the align kernel's layout), so
    ``q [rows, K]`` e4m3 holds the rows a row block's GEMM reads as one tile, and ``s [⌈K/G⌉, rows]`` their
    scales transposed (group stride ``stride_sg``: a step's scales of a row block are contiguous). Rows of no
    slot (a block's padding) are not written. Grid (T, cdiv(⌈K/G⌉, GP))."""
    t = tl.program_id(0).to(tl.int64)
    w_in = 1.0
    if ON_INPUT:
        w_in = tl.load(tw_ptr + t * stride_twt).to(tl.float32)
    gi = tl.program_id(1) * GP + tl.arange(0, GP)
    cols = gi[:, None] * G + tl.arange(0, G)[None, :]
    m = cols < K
    xq, s = _quant_groups(x_ptr + t * stride_xt, cols, m, w_in, UE8M0, ON_INPUT, INTERP)
    for j in range(TOPK):
        slot = t * TOPK + j
        e = tl.load(loc_ptr + slot)
        live = e >= 0
        r = (tl.load(row_start_ptr + e, mask=live, other=0) + tl.load(rank_ptr + slot)).to(tl.int64)
        tl.store(q_ptr + r * stride_qr + cols, xq, mask=m & live)
        tl.store(s_ptr + gi * stride_sg + r, s, mask=(gi * G < K) & live)
