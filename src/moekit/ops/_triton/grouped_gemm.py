"""Grouped GEMMs over the padded expert-block layout of :mod:`.align`.

``w13_kernel``  inter[r, :] = act(x[tok(r)] · w13[e]ᵀ + b13[e])          (gate and up tiles in one program)
``w2_kernel``   out[t, :]   = Σ_k w[t, k] · (inter[r(t, k)] · w2[e]ᵀ + b2[e])  (combine fused, slot order)

Precision: operands in the input dtype, fp32 accumulation (``DOT_PREC="ieee"`` for fp32 inputs, so
fp32 is not silently tf32); the activation in fp32, rounded to the input dtype; the weighting and the
top-k sum in fp32. The per-slot weighted output is rounded once to the input dtype in the combine
buffer (the torch twin rounds the GEMM output to the input dtype at the same point), then the K slot
values of a token are summed in fp32 in slot order k = 0..K-1 and rounded once more at the end
(fp8 experts: the combine buffer is fp32, no per-slot rounding, as their twin and SPEC §8 sum).

Combine (``COMBINE``): a w2 program writes its weighted tile to ``part[slot]``, then bumps a
semaphore per (token, column block) with an acq_rel atomic; the program that brings it to the
token's number of live slots sums ``part[t·K + k]`` for k = 0..K-1 and writes ``out[t]``. The order of
that sum never depends on scheduling, so the output is deterministic (bit-identical run to run).
With K == 1 the tile goes straight to ``out``.

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

from ..activation import SOFTCAP_GATE, SOFTCAP_UP, SWIGLUOAI_ALPHA, get_activation
from .align import slot_local_expert
from .quant import FP8_BLOCK, FP8_ROW, MXFP4, dot_f32, load_packed_w, load_w_scales, requant_store, to_dt

# the ACT codes of the activation registry (:mod:`moekit.ops.activation`), as constexpr globals
SILU = tl.constexpr(get_activation("silu").code)
GELU = tl.constexpr(get_activation("gelu").code)
GELU_TANH = tl.constexpr(get_activation("gelu_tanh").code)
RELU2 = tl.constexpr(get_activation("relu2").code)
SILU_POST_CLAMP = tl.constexpr(get_activation("silu_post_clamp").code)
SOFTCAP_SWIGLU = tl.constexpr(get_activation("softcap_swiglu").code)
OAI_ALPHA = tl.constexpr(SWIGLUOAI_ALPHA)
CAP_G = tl.constexpr(SOFTCAP_GATE)
CAP_U = tl.constexpr(SOFTCAP_UP)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activate(g, u, limit, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """fp32 epilogue: gated act(g, u), or relu(g)² for relu2 (``u`` unused). ``ACT``: a registry code."""
    if ACT == RELU2:
        r = tl.maximum(g, 0.0)
        return r * r
    if ACT == SOFTCAP_SWIGLU:  # c·tanh(x/c) = c·(2·sigmoid(2x/c) - 1)
        gc = CAP_G * (2.0 * _sigmoid(2.0 * g / CAP_G) - 1.0)
        uc = CAP_U * (2.0 * _sigmoid(2.0 * u / CAP_U) - 1.0)
        return gc * _sigmoid(g) * uc
    if ACT == SILU_POST_CLAMP:  # min(silu(g), L) · clamp(u, ±L)
        s = g * _sigmoid(g)
        if HAS_LIMIT:
            s = tl.minimum(s, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        return s * u
    if HAS_LIMIT:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    if ACT == SILU:
        return g * _sigmoid(g) * u
    if ACT == GELU:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    if ACT == GELU_TANH:  # 0.5 g (1 + tanh(y)) == g · sigmoid(2y), y = sqrt(2/pi) (g + 0.044715 g³)
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * _sigmoid(2.0 * y) * u
    return (u + 1.0) * g * _sigmoid(OAI_ALPHA * g)  # swigluoai: the one code left


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a · b in fp32. ``UPCAST`` (interpreter only: its bf16 dot is wrong) multiplies in fp32,
    which is exact for bf16/fp16 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _pid_to_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M blocks of rows share weight tiles in L2, and the n tiles of one row
    block run together so its gathered inputs stay in L2."""
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _block_expert(counts_ptr, b, E_local, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, its first block, its live rows) of block ``b``; expert >= E_local past the end."""
    offs = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs, mask=offs < E_local, other=0)
    nb = (cnt + BM - 1) // BM
    cum = tl.cumsum(nb, 0)
    e = tl.sum((cum <= b).to(tl.int32), 0)
    first = tl.sum(tl.where(offs == e, cum - nb, 0), 0)
    n_e = tl.sum(tl.where(offs == e, cnt, 0), 0)
    return e, first, n_e


@triton.jit
def _inline_slots(ids_ptr, tw_ptr, map_ptr, S, K, E_local, E_global, stride_it, stride_twt,
                  SP: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, INLINE: tl.constexpr):
    """``INLINE``: local expert of every slot of a tiny batch (S <= SP), [SP] int32, -1 when dead.
    Otherwise an unused placeholder (the align kernel ran)."""
    if INLINE:
        j = tl.arange(0, SP)
        return slot_local_expert(
            ids_ptr, tw_ptr, map_ptr, j // K, j % K, j < S, stride_it, stride_twt, E_local, E_global, HAS_MAP,
            SKIP_ZERO,
        )
    else:
        return tl.zeros([SP], dtype=tl.int32)


@triton.jit
def _inline_block(loc, b, E_local, BM: tl.constexpr, SP: tl.constexpr):
    """The align layout computed in registers for a tiny batch (no align kernel): slot j of expert e
    sits at row ``BM · (blocks of experts < e) + #{i < j: loc_i = e}`` — the same block structure as
    :mod:`.align`, with ranks in slot order. Returns (expert or E_local past the end, valid [BM], slot [BM])."""
    j = tl.arange(0, SP)
    live = loc >= 0
    same = (loc[:, None] == loc[None, :]) & live[:, None] & live[None, :]  # [i, j]
    n = tl.sum(same.to(tl.int32), axis=0)
    rank = tl.sum((same & (j[:, None] < j[None, :])).to(tl.int32), axis=0)
    nb = (n + BM - 1) // BM
    first = live & (rank == 0)
    earlier = first[:, None] & (loc[:, None] < loc[None, :])
    before = tl.sum(tl.where(earlier, nb[:, None], 0), axis=0)
    row = tl.where(live, before * BM + rank, -1)
    in_block = live & (row >= b * BM) & (row < b * BM + BM)
    e = tl.max(tl.where(in_block, loc, -1), axis=0)
    e = tl.where(e < 0, E_local, e)
    m = b * BM + tl.arange(0, BM)
    hit = (row[None, :] == m[:, None]) & live[None, :]
    valid = tl.max(hit.to(tl.int32), axis=1) > 0
    slot = tl.sum(tl.where(hit, j[None, :], 0), axis=1)
    return e, valid, slot


@triton.jit
def _inline_prologue(loc, sem_ptr, out_ptr, T, K, H, NBN, stride_ot,
                     SP: tl.constexpr, TP: tl.constexpr, COMBINE: tl.constexpr):
    """What the align kernel's count phase does besides counting: zero the combine semaphores and
    the output rows of tokens with no live slot. Run by one program of the w13 launch."""
    if COMBINE:
        for j0 in range(0, T * NBN, 1024):
            jz = j0 + tl.arange(0, 1024)
            tl.store(sem_ptr + jz, tl.zeros([1024], dtype=tl.int32), mask=jz < T * NBN)
    j = tl.arange(0, SP)
    t = tl.arange(0, TP)
    cnt = tl.sum(((j[None, :] // K == t[:, None]) & (loc[None, :] >= 0)).to(tl.int32), axis=1)
    dead = (t < T) & (cnt == 0)
    if tl.max(dead.to(tl.int32), axis=0) > 0:
        rows = out_ptr + t.to(tl.int64)[:, None] * stride_ot
        for h0 in range(0, H, 64):
            h = h0 + tl.arange(0, 64)
            tl.store(rows + h[None, :], tl.zeros([TP, 64], dtype=out_ptr.dtype.element_ty),
                     mask=dead[:, None] & (h[None, :] < H))


@triton.jit
def _row_block(pid_m, loc, counts_ptr, E_local, BM: tl.constexpr, BLOCK_E: tl.constexpr, SP: tl.constexpr,
               INLINE: tl.constexpr):
    """Row block ``pid_m`` of the sorted layout: (expert, or >= E_local past the end; valid [BM]; slot [BM]).
    ``INLINE``: from the slots' local experts ``loc`` in registers. Otherwise from the align kernel's
    counts, and ``slot`` is a placeholder: a program with work loads it from ``sorted_slot`` after the
    exit test."""
    if INLINE:
        e, valid, slot = _inline_block(loc, pid_m, E_local, BM, SP)
    else:
        e, first, n_e = _block_expert(counts_ptr, pid_m, E_local, BM, BLOCK_E)
        valid = (pid_m - first) * BM + tl.arange(0, BM) < n_e
        slot = tl.zeros([BM], dtype=tl.int32)
    return e, valid, slot


@triton.jit
def _load_a(ptrs, desc, row, k0, valid, kmask, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """[BM, BK] tile of activation rows (masked rows -> 0): by descriptor, or by pointers."""
    if USE_TMA:
        return desc.load([row, k0])
    elif EVEN_K:
        return tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _load_w(ptrs, desc, row, k0, kmask, nmask, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """[BK, BN] tile of transposed weight rows: by descriptor (rows ``row..row+BN``), or by pointers."""
    if USE_TMA:
        return tl.trans(desc.load([row, k0]))
    elif EVEN_K:
        return tl.load(ptrs, mask=nmask[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)


@triton.jit
def _load_b(ptrs, desc, row, k0, K, kmask, nmask, s, DT: tl.constexpr, QUANT: tl.constexpr,
            PACK: tl.constexpr, QG: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr,
            USE_TMA: tl.constexpr, UPCAST: tl.constexpr, W_ALIGN: tl.constexpr = 1, PTX: tl.constexpr = False):
    """[BK, BN] weight tile ready for the dot: as stored (params dtype or e4m3), or unpacked to ``DT`` with
    the step's scales ``s`` (:func:`.quant.load_w_scales`)."""
    # if / else on the constexpr: compiled Triton type-checks every return it reaches, and a ``return``
    # after a taken constexpr ``if`` is still reached (packed pointers in _load_w: a shape error)
    if QUANT >= MXFP4:
        w = load_packed_w(ptrs, s, k0, K, nmask, DT, QUANT, PACK, QG, BK, BN, EVEN_K, UPCAST, W_ALIGN, PTX)
    else:
        w = _load_w(ptrs, desc, row, k0, kmask, nmask, EVEN_K, USE_TMA)
    return w


@triton.jit
def _step(a, b, acc, xs_rows, ws_row, kb, valid, nmask, QUANT: tl.constexpr, DOT_PREC: tl.constexpr,
          UPCAST: tl.constexpr, FP8_ACC: tl.constexpr, SWAP: tl.constexpr = False):
    """One K step: fp8 block ``acc + (a · b) · s_x[row, kb] · S[col, kb]`` (``xs_rows`` [BM], ``ws_row``
    [BN] scale pointers), fp8 row ``acc + a · b``, else the dot into acc.

    ``SWAP``: ``acc`` is the transposed accumulator [BN, BM] and the dot is ``bᵀ · aᵀ``: the weight tile
    is the MMA's left operand (on Hopper a wgmma m64 row block of weights, from registers when it was
    decoded there; tokens are the narrow N side, >= 16). Every element is the same products and scales;
    whether the tensor core sums them in the same order either way is measured, not assumed."""
    lhs, rhs = _operands(a, b, SWAP)
    if QUANT == FP8_BLOCK:
        a_s = tl.load(xs_rows + kb, mask=valid, other=0.0)
        w_s = tl.load(ws_row + kb, mask=nmask, other=0.0)
        acc = acc + dot_f32(lhs, rhs, UPCAST, FP8_ACC) * _outer(a_s, w_s, SWAP)
    elif QUANT == FP8_ROW:
        acc = acc + dot_f32(lhs, rhs, UPCAST, FP8_ACC)
    else:
        acc = _mma(lhs, rhs, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _operands(a, b, SWAP: tl.constexpr):
    """The dot's (left, right) operands: (a [BM, BK], b [BK, BN]), or swapped (bᵀ, aᵀ)."""
    if SWAP:
        return tl.trans(b), tl.trans(a)
    else:
        return a, b


@triton.jit
def _outer(row_s, col_s, SWAP: tl.constexpr):
    """The per-row times per-column scale product in the accumulator's orientation."""
    if SWAP:
        return col_s[:, None] * row_s[None, :]
    else:
        return row_s[:, None] * col_s[None, :]


@triton.jit
def _acc0(BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
    """A zero fp32 accumulator: [BM, BN], or [BN, BM] for ``SWAP`` (transposed back after the K loop)."""
    if SWAP:
        return tl.zeros([BN, BM], dtype=tl.float32)
    else:
        return tl.zeros([BM, BN], dtype=tl.float32)


@triton.jit
def _acc_out(acc, SWAP: tl.constexpr):
    """The accumulator as [BM, BN] after the K loop."""
    if SWAP:
        return tl.trans(acc)
    else:
        return acc


@triton.jit
def _offset(index, stride, W_ALIGN: tl.constexpr):
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
def _w_ptrs(w_base, offs_n, stride_wn, BK: tl.constexpr, PACK: tl.constexpr, W_ALIGN: tl.constexpr = 1):
    """Pointers to the weight rows ``offs_n`` at k = 0: [BK, BN] (transposed rows, as the dot takes them), or
    packed (``PACK`` > 1) [BN, BK / PACK] in memory order (:func:`.quant.load_packed_w` unpacks along k).
    ``W_ALIGN``: every packed row starts on a multiple of this many elements (the launcher checked it), so
    the loads can be 16-byte vectors even when the row stride is no multiple of 16 (gpt-oss int4: 360)."""
    if PACK > 1:
        row = _offset(offs_n, stride_wn, W_ALIGN)
        ptrs = w_base + row[:, None] + tl.arange(0, BK // PACK)[None, :]
    else:
        ptrs = w_base + offs_n.to(tl.int64)[None, :] * stride_wn + tl.arange(0, BK // PACK)[:, None]
    return ptrs


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
    SWAP: tl.constexpr = False, W_ALIGN: tl.constexpr = 1, PTX: tl.constexpr = False,
):
    """Grid (num_pid_m · cdiv(I, BN),); ``SPLIT``: (num_pid_m · 2·cdiv(I, BN),). inter: [rows, I] input dtype (sorted row layout).

    Quantised (``QUANT`` > 0, module docstring): fp8 reads ``x`` = x_q e4m3 with scales ``xs [T, ·]``
    (stride ``stride_xst``; 0 for a static scale) and writes ``inter`` as e4m3 with ``is [rows, I/BN]``
    (``REQ`` 1) or with the static ``*qs_ptr`` (``REQ`` 2); 4-bit reads packed ``w1`` (``PACK`` per
    element along k, scales every ``QG``). ``ON_INPUT`` is left to the fp8 input quantiser.

    ``INLINE`` (T·K <= SP, decode): no align kernel ran; every program derives the layout of its
    block from the ids in registers, and program 0 does the align kernel's zeroing.

    ``USE_TMA``: weight tiles come through a tensor descriptor over ``w1.view(E·N1, H)`` (N1 = 2I or
    I); rows past ``I`` inside a tile belong to the next half/expert and only feed masked columns.

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
        pid_m, pid_n = _pid_to_tile(pid, num_pid_m, 2 * nbn1, GROUP_M)
        half = pid_n // nbn1
        pid_n = pid_n % nbn1
    else:
        pid_m, pid_n = _pid_to_tile(pid, num_pid_m, tl.cdiv(I, BN), GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    loc = _inline_slots(ids_ptr, tw_ptr, map_ptr, T * K, K, E_local, E_global, stride_it, stride_twt,
                        SP, HAS_MAP, SKIP_ZERO, INLINE)
    if INLINE:
        if pid == 0:
            _inline_prologue(loc, sem_ptr, out_ptr, T, K, H, NBN, stride_ot, SP, TP, COMBINE)
    e, valid, slot = _row_block(pid_m, loc, counts_ptr, E_local, BM, BLOCK_E, SP, INLINE)
    if e >= E_local:
        return
    if not INLINE:
        slot = tl.load(sorted_ptr + rows, mask=valid, other=0)
    tok = (slot // K).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < I
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    w_base = w1_ptr + _offset(e, stride_we, W_ALIGN)
    g_ptrs = _w_ptrs(w_base, offs_n + half * I, stride_wn, BK, PACK, W_ALIGN)
    u_ptrs = g_ptrs + _offset(I, stride_wn, W_ALIGN)
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
    acc_g = _acc0(BM, BN, SWAP)
    acc_u = _acc0(BM, BN, SWAP)
    sg0 = 0  # 4-bit: the scales of this K step, loaded one step ahead (quant.load_w_scales)
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
        a = _load_a(a_ptrs, None, 0, k0, valid, kmask, EVEN_K, False)
        g = _load_b(g_ptrs, w1_desc, row_g, k0, H, kmask, nmask, sg0, x_ptr.dtype.element_ty, QUANT, PACK, QG,
                    BK, BN, EVEN_K, USE_TMA, UPCAST, W_ALIGN, PTX)
        if ON_INPUT:
            a = (a.to(tl.float32) * w_in[:, None]).to(x_ptr.dtype.element_ty)
        acc_g = _step(a, g, acc_g, xs_rows, ws_g, k0 // BK, valid, nmask, QUANT, DOT_PREC, UPCAST, FP8_ACC, SWAP)
        if GATED and not SPLIT:
            u = _load_b(u_ptrs, w1_desc, row_g + I, k0, H, kmask, nmask, su0, x_ptr.dtype.element_ty, QUANT, PACK,
                        QG, BK, BN, EVEN_K, USE_TMA, UPCAST, W_ALIGN, PTX)
            acc_u = _step(a, u, acc_u, xs_rows, ws_u, k0 // BK, valid, nmask, QUANT, DOT_PREC, UPCAST, FP8_ACC,
                          SWAP)
            u_ptrs += BK // PACK
        a_ptrs += BK
        g_ptrs += BK // PACK
        if QUANT >= MXFP4:
            sg0 = sg1
            su0 = su1
    acc_g = _acc_out(acc_g, SWAP)
    acc_u = _acc_out(acc_u, SWAP)
    if QUANT == FP8_ROW:  # dequantising epilogue: s_x[row] · S[e, n] (per tensor: S[e, shard])
        a_s = tl.load(xs_rows, mask=valid, other=0.0)[:, None]
        acc_g = acc_g * a_s * tl.load(ws_g, mask=nmask, other=0.0)[None, :]
        if GATED and not SPLIT:
            acc_u = acc_u * a_s * tl.load(ws_u, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        b_base = b1_ptr + e.to(tl.int64) * stride_be + half * I
        acc_g += tl.load(b_base + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATED and not SPLIT:
            acc_u += tl.load(b_base + I + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if SPLIT:  # the fp32 GEMM output; act_pass_kernel does the rest of the epilogue
        h_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + half * I + offs_n[None, :]
        tl.store(h_ptrs, acc_g, mask=valid[:, None] & nmask[None, :])
        return
    h = _activate(acc_g, acc_u, limit, ACT, HAS_LIMIT)
    out_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + offs_n[None, :]
    if REQ > 0:  # fp8 input of w2: round to the params dtype, quantise (per row of this group / static)
        requant_store(h, out_ptrs, valid[:, None] & nmask[None, :], is_ptr, rows.to(tl.int64) * stride_isr + pid_n,
                      valid, qs_ptr, nmask, out_ptr.dtype.element_ty, REQ, UE8M0, UPCAST)
    else:
        tl.store(out_ptrs, to_dt(h, inter_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & nmask[None, :])


@triton.jit
def act_pass_kernel(h_ptr, inter_ptr, is_ptr, qs_ptr, out_ptr, I, limit, stride_hr, stride_ir, stride_isr,
                    ACT: tl.constexpr, HAS_LIMIT: tl.constexpr, REQ: tl.constexpr,
                    UE8M0: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """The w13 epilogue after a ``SPLIT`` w13: ``inter[r, n] = act(h[r, n], h[r, I + n])`` (fp32), rounded to
    the params dtype (``out_ptr``'s, the layer output's: not read) and stored, or quantised for w2 (``REQ`` 1: one group per program, BLOCK = the group, scale at
    ``is[r, pid_1]``; 2: the static ``*qs_ptr``) exactly as :func:`w13_kernel`'s fused epilogue.
    Grid (rows, cdiv(I, BLOCK)); h: [rows, 2I] fp32."""
    r = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    offs = cb * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(h_ptr + r * stride_hr + offs, mask=m, other=0.0)[None, :]
    u = tl.load(h_ptr + r * stride_hr + I + offs, mask=m, other=0.0)[None, :]
    h = _activate(g, u, limit, ACT, HAS_LIMIT)
    out_ptrs = inter_ptr + r * stride_ir + offs[None, :]
    DT: tl.constexpr = out_ptr.dtype.element_ty
    if REQ > 0:
        one = tl.full([1], 0, tl.int64)
        requant_store(h, out_ptrs, m[None, :], is_ptr, one + r * stride_isr + cb, one == 0, qs_ptr, m, DT, REQ,
                      UE8M0, INTERP)
    else:
        tl.store(out_ptrs, to_dt(h, DT, INTERP), mask=m[None, :])


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
    SUM_PASS: tl.constexpr = False,
):
    """Grid (num_pid_m · NBN,), NBN = cdiv(H, BN). out: [T, H]; part: [T·K, H] (COMBINE only).
    ``SUM_PASS`` (with ``COMBINE``): store the weighted slot rows in ``part`` and stop; the top-k sum runs as
    :func:`.combine.sum_slots_kernel` (the same bits as the fused sum below).
    Quantised (``QUANT`` > 0): fp8 reads ``inter`` as e4m3 with scales ``as [rows, ·]`` (stride
    ``stride_asr``; 0 for a static scale); 4-bit reads packed ``w2`` (see :func:`w13_kernel`).
    ``INLINE``: as in :func:`w13_kernel` (``T`` = ``S // K`` here: the slot count is ``S``).

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
    pid_m, pid_n = _pid_to_tile(tl.program_id(0), num_pid_m, NBN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    loc = _inline_slots(ids_ptr, tw_ptr, map_ptr, S, K, E_local, E_global, stride_it, stride_twt,
                        SP, HAS_MAP, SKIP_ZERO, INLINE)
    e, valid, slot = _row_block(pid_m, loc, counts_ptr, E_local, BM, BLOCK_E, SP, INLINE)
    if e >= E_local:
        return
    if not INLINE:
        slot = tl.load(sorted_ptr + rows, mask=valid, other=0)
    tok = slot // K
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < H
    offs_k = tl.arange(0, BK)
    a_ptrs = inter_ptr + rows.to(tl.int64)[:, None] * stride_ir + offs_k[None, :]
    w_base = w2_ptr + _offset(e, stride_we, W_ALIGN)
    b_ptrs = _w_ptrs(w_base, offs_n, stride_wn, BK, PACK, W_ALIGN)
    ws_row = inter_ptr  # placeholders (unread) when not quantised
    as_rows = inter_ptr
    if QUANT > 0:
        ws_row = ws_ptr + e.to(tl.int64) * stride_wse + (offs_n // ws_qbn) * stride_wsn
        if QUANT <= FP8_ROW:
            as_rows = as_ptr + rows.to(tl.int64) * stride_asr
    row_b = e * H + pid_n * BN
    acc = _acc0(BM, BN, SWAP)
    s0 = 0  # 4-bit: the scales of this K step, loaded one step ahead (quant.load_w_scales)
    if QUANT >= MXFP4:
        s0 = load_w_scales(ws_row, 0, I, nmask, QG, BK)
    for k0 in range(0, I, BK):
        kmask = offs_k < I - k0
        if QUANT >= MXFP4:
            s1 = load_w_scales(ws_row, k0 + BK, I, nmask, QG, BK)
        a = _load_a(a_ptrs, inter_desc, pid_m * BM, k0, valid, kmask, EVEN_K, USE_TMA)
        b = _load_b(b_ptrs, w2_desc, row_b, k0, I, kmask, nmask, s0, inter_ptr.dtype.element_ty, QUANT, PACK,
                    QG, BK, BN, EVEN_K, USE_TMA, UPCAST, W_ALIGN, PTX)
        acc = _step(a, b, acc, as_rows, ws_row, k0 // BK, valid, nmask, QUANT, DOT_PREC, UPCAST, FP8_ACC, SWAP)
        a_ptrs += BK
        b_ptrs += BK // PACK
        if QUANT >= MXFP4:
            s0 = s1
    acc = _acc_out(acc, SWAP)
    if QUANT == FP8_ROW:  # dequantising epilogue: s_x[row] · S[e, n]
        acc = acc * tl.load(as_rows, mask=valid, other=0.0)[:, None] * tl.load(ws_row, mask=nmask, other=0.0)[None, :]
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
        if SUM_PASS:
            return
        tl.debug_barrier()  # every thread's part stores precede the release below
        old = tl.atomic_add(sem_ptr + tok64 * NBN + pid_n, 1, mask=valid, sem="acq_rel", scope="gpu")
        if INLINE:
            jj = tl.arange(0, SP)
            need = tl.sum(((jj[None, :] // K == tok[:, None]) & (loc[None, :] >= 0)).to(tl.int32), axis=1)
        else:
            need = tl.load(live_ptr + tok, mask=valid, other=0)
        last = valid & (old == need - 1)
        if tl.max(last.to(tl.int32), axis=0) > 0:
            tl.debug_barrier()  # the acquiring atomics precede every thread's loads below
            total = tl.zeros([BM, BN], dtype=tl.float32)
            for k2 in range(0, K):
                loc2 = slot_local_expert(
                    ids_ptr, tw_ptr, map_ptr, tok, k2, last, stride_it, stride_twt, E_local, E_global,
                    HAS_MAP, SKIP_ZERO,
                )
                live2 = last & (loc2 >= 0)
                q_ptrs = part_ptr + (tok64 * K + k2)[:, None] * stride_pr + offs_n[None, :]
                v = tl.load(q_ptrs, mask=live2[:, None] & nmask[None, :], other=0.0, cache_modifier=".cg")
                total += v.to(tl.float32)
            o_ptrs = out_ptr + tok64[:, None] * stride_ot + offs_n[None, :]
            tl.store(o_ptrs, to_dt(total, out_ptr.dtype.element_ty, UPCAST), mask=last[:, None] & nmask[None, :])
    else:
        o_ptrs = out_ptr + tok64[:, None] * stride_ot + offs_n[None, :]
        tl.store(o_ptrs, to_dt(acc, out_ptr.dtype.element_ty, UPCAST), mask=valid[:, None] & nmask[None, :])
