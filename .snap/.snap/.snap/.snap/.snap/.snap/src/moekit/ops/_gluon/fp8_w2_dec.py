"""fp8 block-scaled w2 of a decode batch: swapped tiles, the layout in registers, the top-k sum fused (Gluon).

The Triton w2 of the fp8 decode buckets (``SWAP``, ``INLINE``, ``COMBINE``: :func:`.._triton.grouped_gemm.w2_kernel`)
lowers each K step's fresh fp8 dot as wgmma + ``wait_group 0``, so the tensor cores and the promotion take turns:
at T = 1 the DeepSeek-V3 w2 ran 35-38 µs where the same programs only streaming their weight rows take 30.7
(round 29, ``benchmarks/access_probe.py``). This kernel computes the same bits with step k's wgmma in flight while
step k - 1 is promoted (as :mod:`.fp8_w2`, in the swapped orientation). Program (row block b, column tile n)::

    t_k[c, m] = Wq[e, c, k·BK:(k+1)·BK] · x_q[row m, k·BK:(k+1)·BK]        (wgmma, M = BN weight rows, N = BM)
    acc[c, m] = fma(t_k, S[e, c // QBN, k] · s_x[row m, k], acc)           (fp32)
    part[slot m, c] = (acc (+ b2[e, c])) (· w[slot m])

then the (token, column tile) semaphore of each live slot is bumped (acq_rel) and the program that completes a token
sums ``part[t·K + k]`` for k = 0..K-1 (live slots; fp32 from 0.0, slot order) into ``out[t]``, rounded once: the
operations of :func:`.._triton.combine.combine_tail`. The layout is the Triton kernels' inline one
(:func:`.._triton.rows.inline_block`: slot j of expert e at row BM · (blocks of experts < e) + its rank among
e's slots), which the Triton w13 of the same launch used for ``inter``; that w13's program 0 zeroed the semaphores
and the rows of tokens with no live slot. Past the inline bound (``INLINE`` false, round 30) the rows are in the
align kernel's layout, which also zeroed the semaphores.

Round 30 added two schedule options, each keeping the bits: ``NT`` column tiles per program through one ring (the
next tile's weight rows stream while a tile is stored and summed), and ``PDL`` (a programmatic dependent launch:
the first weight tiles are requested before the grid wait, while the w13 grid is still running). Round 31: with one
tile per program (``NT`` = 1) a step's refill reads its K step directly (no run-time division by the step count: ~25
fewer instructions per step, 307 -> 251 per pair of steps in sm_90 SASS; Mixtral's T = 1 w2, one program per SM, 41.5
-> 37.4 µs on the H200). :mod:`.fp8_w2_dec_ws` is the same kernel with its loads in a producer warp.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma_wait

from .._triton.align import slot_local_expert
from .._triton.quant import to_dt
from .common import block_expert, pid_to_tile
from .compat import cta_barrier
from .fp8_w2 import _mma, _promote, ring


@gluon.jit
def inline_layout(ids_ptr, tw_ptr, map_ptr, b, S, K, E_local, E_global, stride_it, stride_twt,
                  BM: gl.constexpr, SP: gl.constexpr, HAS_MAP: gl.constexpr, SKIP_ZERO: gl.constexpr,
                  L2: gl.constexpr):
    """Row block ``b`` of the inline layout (``_triton.rows.inline_slots`` + ``inline_block``, the same
    arithmetic): (expert or E_local past the end, valid [BM], slot [BM], the slots' experts [SP]), the [BM]
    vectors in ``SliceLayout(1, L2)``, the experts in ``SliceLayout(0, L2)``; ``L2`` any 2-D layout."""
    il: gl.constexpr = gl.SliceLayout(1, L2)
    jl: gl.constexpr = gl.SliceLayout(0, L2)
    i = gl.arange(0, SP, layout=il)
    j = gl.arange(0, SP, layout=jl)
    loc_i = slot_local_expert(ids_ptr, tw_ptr, map_ptr, i // K, i % K, i < S, stride_it, stride_twt, E_local,
                              E_global, HAS_MAP, SKIP_ZERO)
    loc_j = slot_local_expert(ids_ptr, tw_ptr, map_ptr, j // K, j % K, j < S, stride_it, stride_twt, E_local,
                              E_global, HAS_MAP, SKIP_ZERO)
    live_i = loc_i >= 0
    live_j = loc_j >= 0
    same = (loc_i[:, None] == loc_j[None, :]) & live_i[:, None] & live_j[None, :]  # [i, j], symmetric
    rank_j = gl.sum((same & (i[:, None] < j[None, :])).to(gl.int32), axis=0)  # earlier slots of j's expert
    n_i = gl.sum(same.to(gl.int32), axis=1)
    rank_i = gl.sum((same & (j[None, :] < i[:, None])).to(gl.int32), axis=1)
    nb_i = (n_i + BM - 1) // BM
    first_i = live_i & (rank_i == 0)  # one slot per expert carries its block count
    earlier = first_i[:, None] & (loc_i[:, None] < loc_j[None, :])
    before_j = gl.sum(gl.where(earlier, nb_i[:, None], 0), axis=0)
    row_j = gl.where(live_j, before_j * BM + rank_j, -1)
    in_block = live_j & (row_j >= b * BM) & (row_j < b * BM + BM)
    e = gl.max(gl.where(in_block, loc_j, -1), axis=0)
    e = gl.where(e < 0, E_local, e)
    m = b * BM + gl.arange(0, BM, layout=il)
    hit = (row_j[None, :] == m[:, None]) & live_j[None, :]
    valid = gl.max(hit.to(gl.int32), axis=1) > 0
    slot = gl.sum(gl.where(hit, j[None, :], 0), axis=1)
    return e, valid, slot, loc_j


@gluon.jit
def block_layout(ids_ptr, tw_ptr, map_ptr, counts_ptr, row_start_ptr, sorted_ptr, b, S, K, E_local, E_global, stride_it,
                 stride_twt, BM: gl.constexpr, SP: gl.constexpr, HAS_MAP: gl.constexpr, SKIP_ZERO: gl.constexpr,
                 INLINE: gl.constexpr, BLOCK_E: gl.constexpr, L2: gl.constexpr, NW: gl.constexpr):
    """Row block ``b``'s (expert or E_local, valid [BM], slot [BM], the slots' experts [SP] or, past the inline layout,
    ``valid`` again: unused) from the inline layout (:func:`inline_layout`) or the align kernel's rows."""
    if INLINE:
        e, valid2, slot2, loc_j = inline_layout(ids_ptr, tw_ptr, map_ptr, b, S, K, E_local, E_global, stride_it,
                                                stride_twt, BM, SP, HAS_MAP, SKIP_ZERO, L2)
    else:
        e, first, n_e = block_expert(counts_ptr, row_start_ptr, b, E_local, BM, BLOCK_E, NW)
        rr = gl.arange(0, BM, layout=gl.SliceLayout(1, L2))
        valid2 = (b - first) * BM + rr < n_e
        slot2 = gl.load(sorted_ptr + b * BM + rr, mask=valid2, other=0)
        loc_j = valid2  # (the inline layout's slot experts: not used)
    return e, valid2, slot2, loc_j


@gluon.jit
def part_store(acc, e, slot, valid, pid_n, b2_ptr, tw_ptr, part_ptr, H, K, stride_be, stride_twt, stride_pr,
               BN: gl.constexpr, col_l: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr):
    """The epilogue in the Triton w2's order: ``part[slot] = (acc (+ b2[e])) (· w[slot])`` in fp32 for the block's
    live slots and columns < H. acc: [BN, BM] (weight rows, slots); slot / valid: [BM] along its columns."""
    cols = pid_n * BN + gl.arange(0, BN, layout=col_l)
    nmask = cols < H
    if HAS_BIAS:
        acc += gl.load(b2_ptr + e.to(gl.int64) * stride_be + cols, mask=nmask, other=0.0).to(gl.float32)[:, None]
    if not ON_INPUT:
        tok = slot // K
        wv = gl.load(tw_ptr + tok.to(gl.int64) * stride_twt + (slot - tok * K), mask=valid, other=0.0)
        acc = acc * wv.to(gl.float32)[None, :]
    p_ptrs = part_ptr + slot.to(gl.int64)[None, :] * stride_pr + cols[:, None]
    gl.store(p_ptrs, acc, mask=valid[None, :] & nmask[:, None])


@gluon.jit
def _scale(as_rows, valid, ws_e, k):
    """s_x[row, k] · S[e, tile, k] for the block's rows ([BM]), the product in Triton's order (w_s · a_s)."""
    return gl.load(ws_e + k) * gl.load(as_rows + k, mask=valid, other=0.0)


@gluon.jit
def _tile(a_desc, w_desc, a_smem, w_smem, bars, zero, as_rows, valid, ws_e, g0, n_steps, nk, row_a, row_w,
          STAGES: gl.constexpr, BK: gl.constexpr, BN: gl.constexpr, NT: gl.constexpr):
    """One column tile's K loop, ring steps g0 .. g0 + nk - 1 (each refilling its slot with step + STAGES, of this
    tile or the program's next): the promoted fp32 accumulator [BN, BM]. As :mod:`.fp8_w2`: step k - 1 waited for,
    step k's wgmma started, k - 1 promoted while it runs; steps in pairs (t0 even, t1 odd)."""
    acc = zero  # (SSA: the fma below makes a new tensor; zero stays the wgmmas' fresh accumulator)
    t0 = _mma(a_smem, w_smem, bars, g0, zero, STAGES, BK, True)
    sc0 = _scale(as_rows, valid, ws_e, 0)
    for k in range(1, nk - 1, 2):
        c0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
        t1 = _mma(a_smem, w_smem, bars, g0 + k, zero, STAGES, BK, True)
        acc = _promote(c0, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, g0 + k - 1, n_steps, nk, row_a, row_w,
                       STAGES, BK, BN, True, NT == 1)
        sc1 = _scale(as_rows, valid, ws_e, k)
        c1 = warpgroup_mma_wait(num_outstanding=0, deps=(t1,))
        t0 = _mma(a_smem, w_smem, bars, g0 + k + 1, zero, STAGES, BK, True)
        acc = _promote(c1, acc, sc1, a_desc, w_desc, a_smem, w_smem, bars, g0 + k, n_steps, nk, row_a, row_w,
                       STAGES, BK, BN, True, NT == 1)
        sc0 = _scale(as_rows, valid, ws_e, k + 1)
    if nk % 2 == 0:  # one odd step left
        c0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
        t1 = _mma(a_smem, w_smem, bars, g0 + nk - 1, zero, STAGES, BK, True)
        acc = _promote(c0, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, g0 + nk - 2, n_steps, nk, row_a, row_w,
                       STAGES, BK, BN, True, NT == 1)
        sc1 = _scale(as_rows, valid, ws_e, nk - 1)
        last = warpgroup_mma_wait(num_outstanding=0, deps=(t1,))
        acc = _promote(last, acc, sc1, a_desc, w_desc, a_smem, w_smem, bars, g0 + nk - 1, n_steps, nk, row_a, row_w,
                       STAGES, BK, BN, True, NT == 1)
    else:
        last = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
        acc = _promote(last, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, g0 + nk - 1, n_steps, nk, row_a, row_w,
                       STAGES, BK, BN, True, NT == 1)
    return acc


@gluon.jit
def fp8_w2_dec_kernel(
    a_desc, w_desc, as_ptr, ws_ptr, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, part_ptr, sem_ptr,
    counts_ptr, row_start_ptr, sorted_ptr, live_ptr,
    H, I, E_local, E_global, K, S, num_pid_m, NBN,
    stride_asr, stride_wse, stride_wsn, stride_be, stride_ot, stride_twt, stride_it, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    SP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr,
    HAS_MAP: gl.constexpr, SKIP_ZERO: gl.constexpr, NT: gl.constexpr = 1, PDL: gl.constexpr = False,
    INLINE: gl.constexpr = True, BLOCK_E: gl.constexpr = 1, num_warps: gl.constexpr = 4,
):
    """Grid (num_pid_m · cdiv(NBN, NT),). a_desc: TMA over inter_q [rows, I] e4m3, block [BM, BK]; w_desc: over
    w2.view(E·H, I) e4m3, block [BN, BK]; as: [rows, cdiv(I, BK)] fp32; ws: [E, cdiv(H, QBN), cdiv(I, BK)] fp32
    (QBN % BN == 0); part: [S, H] fp32; sem: [T, NBN] int32 (zeroed); out: [T, H]; ids / tw: [T, K].

    ``INLINE``: the rows are in the inline layout (derived here from the ids); else in the align kernel's layout
    (``counts`` / ``row_start`` [E_local] find a block's expert, ``sorted`` [rows] its slots, ``live`` [T] a token's
    live slot count, which the sum waits for), as the Triton w2 reads them past the inline bound.

    ``NT``: a program computes NT neighbouring column tiles of its row block one after the other through one ring
    (the next tile's weight rows stream while a tile is promoted, stored and summed), so fewer, longer programs
    stream the same rows (the per-tile operations are unchanged: the same bits). ``PDL`` (launched as a
    programmatic dependent of the kernel that wrote ``inter_q`` / ``as``): the layout (from the routing ids, written
    before the w13 launch), the expert and the first ``STAGES`` weight tiles are read before the grid wait;
    ``inter_q``, ``as``, the semaphores and the outputs only after it."""
    pid_m, pid_g = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(NBN, NT), GROUP_M)
    L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
    e, valid2, slot2, loc_j = block_layout(ids_ptr, tw_ptr, map_ptr, counts_ptr, row_start_ptr, sorted_ptr, pid_m, S, K,
                                           E_local, E_global, stride_it, stride_twt, BM, SP, HAS_MAP, SKIP_ZERO, INLINE,
                                           BLOCK_E, L2, num_warps)
    if e < E_local:
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BM, 32])
        col_l: gl.constexpr = gl.SliceLayout(1, mma_l)  # along the weight rows (output columns)
        tok_l: gl.constexpr = gl.SliceLayout(0, mma_l)  # along the block's slot rows
        row_a = pid_m * BM
        n0 = pid_g * NT  # the program's first column tile
        row_w = e * H + n0 * BN
        nk = gl.cdiv(I, BK)
        n_steps = gl.minimum(NBN - n0, NT) * nk
        a_smem, w_smem, bars = ring(a_desc, w_desc, n_steps, nk, row_a, row_w, STAGES, BM, BN, BK, PDL)
        valid = gl.convert_layout(valid2, tok_l)
        slot = gl.convert_layout(slot2, tok_l)
        rows = row_a + gl.arange(0, BM, layout=tok_l)
        as_rows = as_ptr + rows.to(gl.int64) * stride_asr
        zero = gl.zeros([BN, BM], gl.float32, layout=mma_l)
        for j in gl.static_range(NT):  # column tile n0 + j: steps [j·nk, (j + 1)·nk) of the ring
            if j * nk < n_steps:  # (the last program of a row block may have fewer tiles)
                pid_n = n0 + j
                ws_e = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn
                acc = _tile(a_desc, w_desc, a_smem, w_smem, bars, zero, as_rows, valid, ws_e, j * nk, n_steps, nk,
                            row_a, row_w, STAGES, BK, BN, NT)
                part_store(acc, e, slot, valid, pid_n, b2_ptr, tw_ptr, part_ptr, H, K, stride_be, stride_twt, stride_pr,
                           BN, col_l, HAS_BIAS, ON_INPUT)
                _combine(part_ptr, sem_ptr, live_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, loc_j, slot2, valid2, pid_n,
                         H, K, NBN, S, E_local, E_global, stride_it, stride_twt, stride_pr, stride_ot, BM, BN, SP,
                         HAS_MAP, SKIP_ZERO, INLINE, L2, num_warps)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))


@gluon.jit
def _combine(part_ptr, sem_ptr, live_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, loc_j, slot, valid, pid_n, H, K, NBN, S,
             E_local, E_global, stride_it, stride_twt, stride_pr, stride_ot, BM: gl.constexpr, BN: gl.constexpr,
             SP: gl.constexpr, HAS_MAP: gl.constexpr, SKIP_ZERO: gl.constexpr, INLINE: gl.constexpr,
             L2: gl.constexpr, NW: gl.constexpr):
    """``_triton.combine.combine_tail``: bump the (token, column tile) semaphores of the block's live slots; where a
    token is complete, sum its live slots' ``part`` rows in slot order and write ``out``. slot / valid: [BM] in
    ``SliceLayout(1, L2)``; a token's live slot count from the inline layout's slot experts ``loc_j`` [SP]
    (``SliceLayout(0, L2)``), else from the align kernel's ``live`` [T]."""
    tok = slot // K
    tok64 = tok.to(gl.int64)
    cta_barrier()  # every thread's part stores precede the release below
    one = gl.full([BM], 1, gl.int32, layout=gl.SliceLayout(1, L2))
    old = gl.atomic_add(sem_ptr + tok64 * NBN + pid_n, one, mask=valid, sem="acq_rel", scope="gpu")
    if INLINE:
        j = gl.arange(0, SP, layout=gl.SliceLayout(0, L2))
        need = gl.sum(((j[None, :] // K == tok[:, None]) & (loc_j[None, :] >= 0)).to(gl.int32), axis=1)
    else:
        need = gl.load(live_ptr + tok64, mask=valid, other=0)
    last = valid & (old == need - 1)
    if gl.max(last.to(gl.int32), axis=0) > 0:
        cta_barrier()  # the acquiring atomics precede every thread's loads below
        lt: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
        tok_t = gl.convert_layout(tok, gl.SliceLayout(1, lt))
        last_t = gl.convert_layout(last, gl.SliceLayout(1, lt))
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, lt))
        nmask = cols < H
        total = gl.zeros([BM, BN], gl.float32, layout=lt)
        for k2 in range(0, K):
            loc2 = slot_local_expert(ids_ptr, tw_ptr, map_ptr, tok_t, k2, last_t, stride_it, stride_twt, E_local,
                                     E_global, HAS_MAP, SKIP_ZERO)
            live2 = last_t & (loc2 >= 0)
            q_ptrs = part_ptr + (tok_t.to(gl.int64) * K + k2)[:, None] * stride_pr + cols[None, :]
            v = gl.load(q_ptrs, mask=live2[:, None] & nmask[None, :], other=0.0, cache_modifier=".cg")
            total += v.to(gl.float32)
        o_ptrs = out_ptr + tok_t.to(gl.int64)[:, None] * stride_ot + cols[None, :]
        gl.store(o_ptrs, to_dt(total, out_ptr.dtype.element_ty, False), mask=last_t[:, None] & nmask[None, :])
