"""Grouped GEMMs over the padded expert-block layout of :mod:`.align`.

``w13_kernel``  inter[r, :] = act(x[tok(r)] · w13[e]ᵀ + b13[e])          (gate and up tiles in one program)
``w2_kernel``   out[t, :]   = Σ_k w[t, k] · (inter[r(t, k)] · w2[e]ᵀ + b2[e])  (combine fused, slot order)

Precision: operands in the input dtype, fp32 accumulation (``DOT_PREC="ieee"`` for fp32 inputs, so
fp32 is not silently tf32); the activation in fp32, rounded to the input dtype; the weighting and the
top-k sum in fp32. The per-slot weighted output is rounded once to the input dtype in the combine
buffer (the torch twin rounds elsewhere: its bf16 GEMM output, before the bias and the weight; both within the
tolerances, round 62's audit corrected this line), then the K slot
values of a token are summed in fp32 in slot order k = 0..K-1 and rounded once more at the end
(fp8 experts, and fp16 activations since round 50: the combine buffer is fp32, no per-slot rounding, as their
twins sum; round 63's audit added fp16 here).

Combine (``COMBINE``): a w2 program writes its weighted tile to ``part[slot]``, then bumps a
semaphore per (token, column block) with an acq_rel atomic; the program that brings it to the
token's number of live slots sums ``part[t·K + k]`` for k = 0..K-1 and writes ``out[t]``. The order of
that sum never depends on scheduling, so the output is deterministic (bit-identical run to run).
With K == 1 the tile goes straight to ``out``. (That tail: :func:`.combine.combine_tail`; the activation epilogue:
:func:`.epilogue.activate`.)

Quantised experts (``QUANT`` constexpr, :mod:`.quant`; 0 compiles exactly the unquantised kernels):

- 1 fp8 block ``(bn, bk)``, BK == bk: ``acc += (x_q · Wq) · s_x[row, k0/bk] · S[e, n/bn, k0/bk]`` per K step
  (fresh fp32 fp8 dot, a per-row times per-column scale); 2 fp8 row: ``acc += x_q · Wq`` per K step, then
  ``acc · s_x[row] · S[e, n]`` after the loop (per tensor: one S per shard). The w13 epilogue rounds the
  activation to the params dtype and quantises it again for w2 (``REQ`` 1: per row over its BN == bk
  columns, one group; 2: a static scale; 0: stored in the params dtype, quantised by a separate pass).
- 3 mxfp4 / 4 int4: weight tiles are unpacked and dequantised in registers to the params dtype, then the
  unquantised dot. Scales of column ``n``: ``ws_ptr + e·stride_wse + (n // ws_qbn)·stride_wsn``
  (+ ``ws_shard·stride_wsn`` for the up half of w13) plus the k index of the scale.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .combine import combine_tail
from .epilogue import activate
from .quant import FP8_ROW, MXFP4, requant_store, to_dt
from .w4_decode import load_w_scales
from .rows import inline_prologue, inline_slots, pid_to_tile, row_block, tail_block
from .tiles import acc0, acc_out, load_a, load_b, mma_step, row_offset, w_ptrs

@triton.jit
def w13_kernel(
    x_ptr, w1_ptr, w1_desc, b1_ptr, inter_ptr, tw_ptr, counts_ptr, sorted_ptr,
    ids_ptr, map_ptr, sem_ptr, out_ptr,
    H, I, N1, E_local, K, num_pid_m, limit, T, E_global, NBN,
    stride_xt, stride_we, stride_wn, stride_be, stride_ir, stride_twt, stride_it, stride_ot,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    ON_INPUT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, INLINE: tl.constexpr, SP: tl.constexpr, TP: tl.constexpr,
    HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, COMBINE: tl.constexpr, PDL: tl.constexpr = False,
    xs_ptr=None, ws_ptr=None, qs_ptr=None, is_ptr=None, stride_xst=0, stride_wse=0, stride_wsn=0, ws_shard=0,
    ws_qbn=1, stride_isr=0, QUANT: tl.constexpr = 0, REQ: tl.constexpr = 0, PACK: tl.constexpr = 1,
    QG: tl.constexpr = 1, UE8M0: tl.constexpr = False, FP8_ACC: tl.constexpr = 0, SPLIT: tl.constexpr = False,
    SWAP: tl.constexpr = False, W_ALIGN: tl.constexpr = 1, PTX: tl.constexpr = False, TAIL: tl.constexpr = 0,
    x_desc=None, XG: tl.constexpr = False, RELAID: tl.constexpr = False,
):
    """Grid (num_pid_m · cdiv(I, BN),); ``SPLIT``: (num_pid_m · 2·cdiv(I, BN),). inter: [rows, I] input dtype
    (sorted row layout).

    Quantised (``QUANT`` > 0, module docstring): fp8 reads ``x`` = x_q e4m3 with scales ``xs [T, ·]``
    (stride ``stride_xst``; 0 for a static scale) and writes ``inter`` as e4m3 with ``is [rows, I/BN]``
    (``REQ`` 1) or with the static ``*qs_ptr`` (``REQ`` 2); 4-bit reads packed ``w1`` (``PACK`` per
    element along k, scales every ``QG``). ``ON_INPUT`` is left to the fp8 input quantiser.

    ``INLINE`` (T·K <= SP, decode): no align kernel ran; every program derives the layout of its
    block from the ids in registers, and program 0 does the align kernel's zeroing.

    ``TAIL`` (= BS > 0, never with ``INLINE``): the tail-tile layout of :mod:`.align`; a program whose block is
    an expert's BS-row tail block runs the same tile code with BS rows (one kernel: the tail blocks of a row
    group run beside its BM blocks and find the same weight tiles in L2).

    ``USE_TMA``: weight tiles come through a tensor descriptor over ``w1.view(E·N1, H)`` (N1 = 2I or
    I); rows past ``I`` inside a tile belong to the next half/expert and only feed masked columns.

    ``XG`` (config ``"gather_pass"``): ``x`` is the input already in sorted order, ``[rows, H]``
    (:func:`.rows.gather_rows_kernel`; padding rows unwritten, never stored from), and a block's tile is read at its
    first row through ``x_desc`` (block [BM, BK]); a tail block's BS rows by pointers. The same values reach the dot.

    ``PDL`` (launched as a programmatic dependent launch): wait for the previous kernel before reading
    or writing anything, then let the w2 launch start early (its programs wait for this grid in turn).

    ``SPLIT`` (gated only): one accumulator per program: the first cdiv(I, BN) column blocks compute gate
    rows, the rest up rows, and ``inter`` is an fp32 ``[rows, 2I]`` (gate columns, then up) of the
    biased (fp8 row: dequantised) GEMM outputs; :func:`act_pass_kernel` then applies the epilogue. Every
    output element is the same dot as in the fused kernel, so the result is the same bits."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    half = 0  # SPLIT: 0 gate rows, 1 up rows
    if SPLIT:
        nbn1 = tl.cdiv(I, BN)
        pid_m, pid_n = pid_to_tile(pid, num_pid_m, 2 * nbn1, GROUP_M)
        half = pid_n // nbn1
        pid_n = pid_n % nbn1
    else:
        pid_m, pid_n = pid_to_tile(pid, num_pid_m, tl.cdiv(I, BN), GROUP_M)
    if TAIL > 0:
        e, row0, big, n_left = tail_block(counts_ptr, pid_m, E_local, BM, TAIL, BLOCK_E)
        if e < E_local:
            if big:  # (distinct names per branch: the compiler unifies a name across an if's branches)
                rb = tl.arange(0, BM)
                _w13_tile(x_ptr, x_desc, row0, w1_ptr, w1_desc, b1_ptr, inter_ptr, tw_ptr, sorted_ptr, out_ptr,
                          row0 + rb, rb < n_left, rb, e, pid_n, half, H, I, N1, K, limit, stride_xt, stride_we,
                          stride_wn, stride_be, stride_ir, stride_twt, xs_ptr, ws_ptr, qs_ptr, is_ptr, stride_xst,
                          stride_wse, stride_wsn, ws_shard, ws_qbn, stride_isr, BM, BN, BK, ACT, GATED, HAS_BIAS,
                          HAS_LIMIT, ON_INPUT, EVEN_K, DOT_PREC, UPCAST, USE_TMA, False, QUANT, REQ, PACK, QG, UE8M0,
                          FP8_ACC, SPLIT, SWAP, W_ALIGN, PTX, XG, XG, RELAID)
            else:
                rt = tl.arange(0, TAIL)
                _w13_tile(x_ptr, x_desc, row0, w1_ptr, w1_desc, b1_ptr, inter_ptr, tw_ptr, sorted_ptr, out_ptr,
                          row0 + rt, rt < n_left, rt, e, pid_n, half, H, I, N1, K, limit, stride_xt, stride_we,
                          stride_wn, stride_be, stride_ir, stride_twt, xs_ptr, ws_ptr, qs_ptr, is_ptr, stride_xst,
                          stride_wse, stride_wsn, ws_shard, ws_qbn, stride_isr, TAIL, BN, BK, ACT, GATED, HAS_BIAS,
                          HAS_LIMIT, ON_INPUT, EVEN_K, DOT_PREC, UPCAST, USE_TMA, False, QUANT, REQ, PACK, QG, UE8M0,
                          FP8_ACC, SPLIT, SWAP, W_ALIGN, PTX, XG, False, RELAID)
    else:
        loc = inline_slots(ids_ptr, tw_ptr, map_ptr, T * K, K, E_local, E_global, stride_it, stride_twt,
                            SP, HAS_MAP, SKIP_ZERO, INLINE)
        if INLINE:
            if pid == 0:
                inline_prologue(loc, sem_ptr, out_ptr, T, K, H, NBN, stride_ot, SP, TP, COMBINE)
        e, valid, slot = row_block(pid_m, loc, counts_ptr, E_local, BM, BLOCK_E, SP, INLINE)
        if e >= E_local:
            return
        _w13_tile(x_ptr, x_desc, pid_m * BM, w1_ptr, w1_desc, b1_ptr, inter_ptr, tw_ptr, sorted_ptr, out_ptr,
                  pid_m * BM + tl.arange(0, BM), valid, slot, e, pid_n, half, H, I, N1, K, limit, stride_xt,
                  stride_we, stride_wn, stride_be, stride_ir, stride_twt, xs_ptr, ws_ptr, qs_ptr, is_ptr,
                  stride_xst, stride_wse, stride_wsn, ws_shard, ws_qbn, stride_isr, BM, BN, BK, ACT, GATED,
                  HAS_BIAS, HAS_LIMIT, ON_INPUT, EVEN_K, DOT_PREC, UPCAST, USE_TMA, INLINE, QUANT, REQ, PACK, QG,
                  UE8M0, FP8_ACC, SPLIT, SWAP, W_ALIGN, PTX, XG, XG, RELAID)


@triton.jit
def _w13_tile(
    x_ptr, x_desc, row_a, w1_ptr, w1_desc, b1_ptr, inter_ptr, tw_ptr, sorted_ptr, out_ptr, rows, valid, slot, e, pid_n,
    half, H, I, N1, K, limit, stride_xt, stride_we, stride_wn, stride_be, stride_ir, stride_twt,
    xs_ptr, ws_ptr, qs_ptr, is_ptr, stride_xst, stride_wse, stride_wsn, ws_shard, ws_qbn, stride_isr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, ON_INPUT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, INLINE: tl.constexpr,
    QUANT: tl.constexpr, REQ: tl.constexpr, PACK: tl.constexpr, QG: tl.constexpr, UE8M0: tl.constexpr,
    FP8_ACC: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, W_ALIGN: tl.constexpr, PTX: tl.constexpr,
    XG: tl.constexpr = False, A_TMA: tl.constexpr = False, RELAID: tl.constexpr = False,
):
    """One [BM rows, BN columns] tile of :func:`w13_kernel` for expert ``e``: sorted rows ``rows`` [BM] (``valid``
    [BM]: live), their slots ``slot`` [BM] (``INLINE``; else loaded from ``sorted_ptr`` here). ``XG``: ``x`` holds
    the rows in sorted order (its row ``rows``, not the token's); ``A_TMA``: the tile at row ``row_a`` of
    ``x_desc``."""
    if not INLINE:
        slot = tl.load(sorted_ptr + rows, mask=valid, other=0)
    tok = (slot // K).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < I
    offs_k = tl.arange(0, BK)
    if XG:
        a_row = rows.to(tl.int64)
    else:
        a_row = tok
    a_ptrs = x_ptr + a_row[:, None] * stride_xt + offs_k[None, :]
    w_base = w1_ptr + row_offset(e, stride_we, W_ALIGN)
    g_ptrs = w_ptrs(w_base, offs_n + half * I, stride_wn, BK, PACK, W_ALIGN)
    u_ptrs = g_ptrs + row_offset(I, stride_wn, W_ALIGN)
    if ON_INPUT:
        w_in = tl.load(tw_ptr + tok * stride_twt, mask=valid, other=0.0).to(tl.float32)
    ws_g = x_ptr  # placeholders (unread) when not quantised
    ws_u = x_ptr
    xs_rows = x_ptr
    if QUANT > 0:  # scale rows of the gate / up columns; fp8: per-row activation scales
        ws_g = ws_ptr + e.to(tl.int64) * stride_wse + (offs_n // ws_qbn + half * ws_shard) * stride_wsn
        ws_u = ws_g + ws_shard * stride_wsn
        if QUANT <= FP8_ROW:
            xs_rows = xs_ptr + tok * stride_xst
    row_g = e * N1 + half * I + pid_n * BN
    acc_g = acc0(BM, BN, SWAP)
    acc_u = acc0(BM, BN, SWAP)
    sg0 = 0  # 4-bit: the scales of this K step, loaded one step ahead (w4_decode.load_w_scales)
    su0 = 0
    if QUANT >= MXFP4:
        sg0 = load_w_scales(ws_g, 0, H, nmask, QG, BK)
        su0 = sg0
        if GATED and not SPLIT:
            su0 = load_w_scales(ws_u, 0, H, nmask, QG, BK)
    for k0 in range(0, H, BK):
        kmask = offs_k < H - k0
        if QUANT >= MXFP4:
            sg1 = load_w_scales(ws_g, k0 + BK, H, nmask, QG, BK)
            su1 = su0
            if GATED and not SPLIT:
                su1 = load_w_scales(ws_u, k0 + BK, H, nmask, QG, BK)
        a = load_a(a_ptrs, x_desc, row_a, k0, valid, kmask, EVEN_K, A_TMA)
        g = load_b(g_ptrs, w1_desc, row_g, k0, H, kmask, nmask, sg0, x_ptr.dtype.element_ty, QUANT, PACK, QG,
                    BK, BN, EVEN_K, USE_TMA, UPCAST, W_ALIGN, PTX, RELAID)
        if ON_INPUT:
            a = to_dt(a.to(tl.float32) * w_in[:, None], x_ptr.dtype.element_ty, UPCAST)  # (interpreter: RTNE)
        acc_g = mma_step(a, g, acc_g, xs_rows, ws_g, k0 // BK, valid, nmask, QUANT, DOT_PREC, UPCAST, FP8_ACC, SWAP)
        if GATED and not SPLIT:
            u = load_b(u_ptrs, w1_desc, row_g + I, k0, H, kmask, nmask, su0, x_ptr.dtype.element_ty, QUANT, PACK,
                        QG, BK, BN, EVEN_K, USE_TMA, UPCAST, W_ALIGN, PTX, RELAID)
            acc_u = mma_step(a, u, acc_u, xs_rows, ws_u, k0 // BK, valid, nmask, QUANT, DOT_PREC, UPCAST, FP8_ACC,
                          SWAP)
            u_ptrs += BK // PACK
        a_ptrs += BK
        g_ptrs += BK // PACK
        if QUANT >= MXFP4:
            sg0 = sg1
            su0 = su1
    acc_g = acc_out(acc_g, SWAP)
    acc_u = acc_out(acc_u, SWAP)
    if QUANT == FP8_ROW:  # dequantising epilogue: acc · (s_x[row] · S[e, n]) (per tensor: S[e, shard]); the scales'
        # product first (round 51: (acc · s_x) · S overflowed float32 for inputs near 1e34 whose output is finite)
        a_s = tl.load(xs_rows, mask=valid, other=0.0)[:, None]
        acc_g = acc_g * (a_s * tl.load(ws_g, mask=nmask, other=0.0)[None, :])
        if GATED and not SPLIT:
            acc_u = acc_u * (a_s * tl.load(ws_u, mask=nmask, other=0.0)[None, :])
    if HAS_BIAS:
        b_base = b1_ptr + e.to(tl.int64) * stride_be + half * I
        acc_g += tl.load(b_base + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED and not SPLIT:
            acc_u += tl.load(b_base + I + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if SPLIT:  # the fp32 GEMM output; act_pass_kernel does the rest of the epilogue
        h_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + half * I + offs_n[None, :]
        tl.store(h_ptrs, acc_g, mask=valid[:, None] & nmask[None, :])
    else:
        h = activate(acc_g, acc_u, limit, ACT, HAS_LIMIT)
        out_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + offs_n[None, :]
        if REQ > 0:  # fp8 input of w2: round to the params dtype, quantise (per row of this group / static)
            requant_store(h, out_ptrs, valid[:, None] & nmask[None, :], is_ptr,
                          rows.to(tl.int64) * stride_isr + pid_n, valid, qs_ptr, nmask, out_ptr.dtype.element_ty, REQ,
                          UE8M0, UPCAST)
        else:
            tl.store(out_ptrs, to_dt(h, inter_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & nmask[None, :])


@triton.jit
def w2_kernel(
    inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, counts_ptr, sorted_ptr,
    part_ptr, sem_ptr, live_ptr,
    H, I, E_local, E_global, K, num_pid_m, NBN, S,
    stride_ir, stride_we, stride_wn, stride_be, stride_ot, stride_twt, stride_it, stride_pr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, ON_INPUT: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr,
    COMBINE: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, INLINE: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr = False,
    as_ptr=None, ws_ptr=None, stride_asr=0, stride_wse=0, stride_wsn=0, ws_qbn=1,
    QUANT: tl.constexpr = 0, PACK: tl.constexpr = 1, QG: tl.constexpr = 1, FP8_ACC: tl.constexpr = 0,
    SWAP: tl.constexpr = False, W_ALIGN: tl.constexpr = 1, PTX: tl.constexpr = False,
    SUM_PASS: tl.constexpr = False, TAIL: tl.constexpr = 0, RELAID: tl.constexpr = False,
):
    """Grid (num_pid_m · NBN,), NBN = cdiv(H, BN). out: [T, H]; part: [T·K, H] (COMBINE only).
    ``SUM_PASS`` (with ``COMBINE``): store the weighted slot rows in ``part`` and stop; the top-k sum runs as
    :func:`.combine.sum_slots_kernel` (the same bits as the fused sum below).
    Quantised (``QUANT`` > 0): fp8 reads ``inter`` as e4m3 with scales ``as [rows, ·]`` (stride
    ``stride_asr``; 0 for a static scale); 4-bit reads packed ``w2`` (see :func:`w13_kernel`).
    ``INLINE``: as in :func:`w13_kernel` (``T`` = ``S // K`` here: the slot count is ``S``).
    ``TAIL``: as in :func:`w13_kernel`; a tail block loads its ``inter`` rows by pointers (the descriptor's
    block is BM rows).

    ``USE_TMA``: weight tiles through a tensor descriptor over ``w2.view(E·H, I)``, and the rows of
    ``inter`` (contiguous in the sorted layout) through one over ``inter``; padding rows of a block are
    never written, and only feed masked output rows.

    ``PDL`` (programmatic dependent launch after :func:`w13_kernel`): the launch overlaps the w13
    grid; its programs wait for that grid before anything else. (Prefetching the block's w2 rows
    into L2 before the wait was measured slower on H100, Qwen3-30B-A3B at T=1.)"""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if SUM_PASS:
            tl.extra.cuda.gdc_launch_dependents()
    pid_m, pid_n = pid_to_tile(tl.program_id(0), num_pid_m, NBN, GROUP_M)
    if TAIL > 0:
        e, row0, big, n_left = tail_block(counts_ptr, pid_m, E_local, BM, TAIL, BLOCK_E)
        if e < E_local:
            if big:  # (distinct names per branch, as in w13_kernel)
                rb = tl.arange(0, BM)
                _w2_tile(inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, sorted_ptr,
                         part_ptr, sem_ptr, live_ptr, row0, rb < n_left, rb, rb, e, pid_n, H, I, E_local, E_global, K,
                         NBN, S, stride_ir, stride_we, stride_wn, stride_be, stride_ot, stride_twt, stride_it,
                         stride_pr, as_ptr, ws_ptr, stride_asr, stride_wse, stride_wsn, ws_qbn, BM, BN, BK, HAS_BIAS,
                         ON_INPUT, HAS_MAP, SKIP_ZERO, COMBINE, EVEN_K, DOT_PREC, UPCAST, USE_TMA, USE_TMA, False,
                         SP, QUANT, PACK, QG, FP8_ACC, SWAP, W_ALIGN, PTX, SUM_PASS, RELAID)
            else:
                rt = tl.arange(0, TAIL)
                _w2_tile(inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, sorted_ptr,
                         part_ptr, sem_ptr, live_ptr, row0, rt < n_left, rt, rt, e, pid_n, H, I, E_local, E_global, K,
                         NBN, S, stride_ir, stride_we, stride_wn, stride_be, stride_ot, stride_twt, stride_it,
                         stride_pr, as_ptr, ws_ptr, stride_asr, stride_wse, stride_wsn, ws_qbn, TAIL, BN, BK, HAS_BIAS,
                         ON_INPUT, HAS_MAP, SKIP_ZERO, COMBINE, EVEN_K, DOT_PREC, UPCAST, USE_TMA, False, False,
                         SP, QUANT, PACK, QG, FP8_ACC, SWAP, W_ALIGN, PTX, SUM_PASS, RELAID)
    else:
        loc = inline_slots(ids_ptr, tw_ptr, map_ptr, S, K, E_local, E_global, stride_it, stride_twt,
                            SP, HAS_MAP, SKIP_ZERO, INLINE)
        e, valid, slot = row_block(pid_m, loc, counts_ptr, E_local, BM, BLOCK_E, SP, INLINE)
        if e >= E_local:
            return
        _w2_tile(inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, sorted_ptr,
                 part_ptr, sem_ptr, live_ptr, pid_m * BM, valid, slot, loc, e, pid_n, H, I, E_local, E_global, K,
                 NBN, S, stride_ir, stride_we, stride_wn, stride_be, stride_ot, stride_twt, stride_it, stride_pr,
                 as_ptr, ws_ptr, stride_asr, stride_wse, stride_wsn, ws_qbn, BM, BN, BK, HAS_BIAS, ON_INPUT,
                 HAS_MAP, SKIP_ZERO, COMBINE, EVEN_K, DOT_PREC, UPCAST, USE_TMA, USE_TMA, INLINE, SP, QUANT, PACK,
                 QG, FP8_ACC, SWAP, W_ALIGN, PTX, SUM_PASS, RELAID)


@triton.jit
def _w2_tile(
    inter_ptr, inter_desc, w2_ptr, w2_desc, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, sorted_ptr,
    part_ptr, sem_ptr, live_ptr, row0, valid, slot, loc, e, pid_n, H, I, E_local, E_global, K, NBN, S,
    stride_ir, stride_we, stride_wn, stride_be, stride_ot, stride_twt, stride_it, stride_pr,
    as_ptr, ws_ptr, stride_asr, stride_wse, stride_wsn, ws_qbn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, ON_INPUT: tl.constexpr,
    HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, COMBINE: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, TMA_A: tl.constexpr,
    INLINE: tl.constexpr, SP: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr, QG: tl.constexpr,
    FP8_ACC: tl.constexpr, SWAP: tl.constexpr, W_ALIGN: tl.constexpr, PTX: tl.constexpr, SUM_PASS: tl.constexpr,
    RELAID: tl.constexpr = False,
):
    """One [BM rows, BN columns] tile of :func:`w2_kernel` for expert ``e``: the sorted rows ``row0 + [0, BM)``
    (``valid`` [BM]: live), their slots ``slot`` (``INLINE``, with the slots' experts ``loc``; else loaded here).
    ``TMA_A``: the ``inter`` rows through ``inter_desc`` (weights: ``USE_TMA``)."""
    rows = row0 + tl.arange(0, BM)
    if not INLINE:
        slot = tl.load(sorted_ptr + rows, mask=valid, other=0)
    tok = slot // K
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < H
    offs_k = tl.arange(0, BK)
    a_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + offs_k[None, :]
    w_base = w2_ptr + row_offset(e, stride_we, W_ALIGN)
    b_ptrs = w_ptrs(w_base, offs_n, stride_wn, BK, PACK, W_ALIGN)
    ws_row = inter_ptr  # placeholders (unread) when not quantised
    as_rows = inter_ptr
    if QUANT > 0:
        ws_row = ws_ptr + e.to(tl.int64) * stride_wse + (offs_n // ws_qbn) * stride_wsn
        if QUANT <= FP8_ROW:
            as_rows = as_ptr + rows.to(tl.int64) * stride_asr
    row_b = e * H + pid_n * BN
    acc = acc0(BM, BN, SWAP)
    s0 = 0  # 4-bit: the scales of this K step, loaded one step ahead (w4_decode.load_w_scales)
    if QUANT >= MXFP4:
        s0 = load_w_scales(ws_row, 0, I, nmask, QG, BK)
    for k0 in range(0, I, BK):
        kmask = offs_k < I - k0
        if QUANT >= MXFP4:
            s1 = load_w_scales(ws_row, k0 + BK, I, nmask, QG, BK)
        a = load_a(a_ptrs, inter_desc, row0, k0, valid, kmask, EVEN_K, TMA_A)
        b = load_b(b_ptrs, w2_desc, row_b, k0, I, kmask, nmask, s0, inter_ptr.dtype.element_ty, QUANT, PACK,
                    QG, BK, BN, EVEN_K, USE_TMA, UPCAST, W_ALIGN, PTX, RELAID)
        acc = mma_step(a, b, acc, as_rows, ws_row, k0 // BK, valid, nmask, QUANT, DOT_PREC, UPCAST, FP8_ACC, SWAP)
        a_ptrs += BK
        b_ptrs += BK // PACK
        if QUANT >= MXFP4:
            s0 = s1
    acc = acc_out(acc, SWAP)
    if QUANT == FP8_ROW:  # dequantising epilogue: acc · (s_x[row] · S[e, n]), the scales' product first (as w13)
        acc = acc * (tl.load(as_rows, mask=valid, other=0.0)[:, None] * tl.load(ws_row, mask=nmask, other=0.0)[None, :])
    if HAS_BIAS:
        acc += tl.load(b2_ptr + e.to(tl.int64) * stride_be + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if not ON_INPUT:
        kk = slot - tok * K
        wv = tl.load(tw_ptr + tok.to(tl.int64) * stride_twt + kk, mask=valid, other=0.0).to(tl.float32)
        acc = acc * wv[:, None]
    tok64 = tok.to(tl.int64)
    if COMBINE:
        p_ptrs = part_ptr + slot.to(tl.int64)[:, None] * stride_pr + offs_n[None, :]
        tl.store(p_ptrs, to_dt(acc, part_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & nmask[None, :])
        if not SUM_PASS:
            combine_tail(part_ptr, sem_ptr, live_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, loc, tok, valid, offs_n,
                          nmask, pid_n, K, NBN, E_local, E_global, stride_it, stride_twt, stride_pr, stride_ot, BM, BN,
                          HAS_MAP, SKIP_ZERO, INLINE, SP, UPCAST)
    else:
        o_ptrs = out_ptr + tok64[:, None] * stride_ot + offs_n[None, :]
        tl.store(o_ptrs, to_dt(acc, out_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & nmask[None, :])
