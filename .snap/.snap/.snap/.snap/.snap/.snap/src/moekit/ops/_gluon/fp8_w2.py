"""fp8 block-scaled w2 GEMM with the scale promotion overlapped (Hopper wgmma, Gluon).

Per output tile (rows of one expert block, BN columns), K step ``k`` of BK = 128 (one scale block)::

    t_k  = x_q[rows, k·BK:(k+1)·BK] · Wq[e, cols, k·BK:(k+1)·BK]ᵀ          (fp8 wgmma, fp32, fresh)
    acc  = fma(t_k, s_x[row, k] · S[e, col // 128, k], acc)                   (fp32, CUDA cores)

then ``+ b2[e, col]`` and ``· w[tok, kk]`` (router weight on the output), stored to ``part[slot]`` (fp32):
the SUM_PASS branch of :func:`moekit.ops._triton.grouped_gemm.w2_kernel`, bit for bit (same wgmma
instructions per K step with ``max_num_imprecise_acc`` = BK, same products and fma).

The Triton kernel cannot overlap the two lines: a dot whose result is not a loop-carried accumulator is
lowered as wgmma + ``wait_group 0``, so the tensor cores idle while the promotion runs. Here the wgmma of step
k is in flight while step k - 1 is promoted (``warpgroup_mma_wait(1)``); two fresh accumulators alternate
(steps are handled in pairs, so neither is moved while its wgmma runs). Operand tiles arrive by TMA into a
ring of ``STAGES`` buffers; a buffer is refilled once the wgmma that read it has been waited for.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .common import block_expert, grid_wait, pid_to_tile, step_scale, w2_part_store
from .compat import tma_load


@gluon.jit
def _issue(a_desc, w_desc, a_smem, w_smem, bars, g, nk, row_a, row_w, STAGES: gl.constexpr, BK: gl.constexpr,
           BN: gl.constexpr, ONE: gl.constexpr = False):
    """TMA loads of the program's step ``g`` (tile ``g // nk``, K step ``g % nk``) into ring slot
    ``g % STAGES``; ``row_w``: the weight row of the program's first tile. ``ONE``: the program has one tile
    (step g is K step g: no run-time division in the K loop, ~25 instructions of a decode step's chain)."""
    s = g % STAGES
    if ONE:
        j = 0
        k = g
    else:
        j = g // nk
        k = g - j * nk
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma_load(a_desc, [row_a, k * BK], bar, a_smem.index(s))
    tma_load(w_desc, [row_w + j * BN, k * BK], bar, w_smem.index(s))


@gluon.jit
def ring(a_desc, w_desc, n_steps, nk, row_a, row_w, STAGES: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
         BK: gl.constexpr, PDL: gl.constexpr = False):
    """The program's ring: ``STAGES`` slots of a [BM, BK] and a [BN, BK] e4m3 tile and their barriers, the first
    ``STAGES`` of its ``n_steps`` steps already in flight: (a_smem, w_smem, bars). ``PDL`` (a programmatic dependent
    launch): those steps' weight tiles are requested before :func:`.common.grid_wait` (they do not depend on the
    kernels before this one), their activation tiles after it; each slot's barrier expects both."""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    if PDL:
        for s in gl.static_range(STAGES):
            if s < n_steps:
                j = s // nk
                mbarrier.expect(bars.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma_load(w_desc, [row_w + j * BN, (s - j * nk) * BK], bars.index(s), w_smem.index(s))
        grid_wait()
        for s in gl.static_range(STAGES):
            if s < n_steps:
                j = s // nk
                tma_load(a_desc, [row_a, (s - j * nk) * BK], bars.index(s), a_smem.index(s))
    else:
        for s in gl.static_range(STAGES):
            if s < n_steps:
                _issue(a_desc, w_desc, a_smem, w_smem, bars, s, nk, row_a, row_w, STAGES, BK, BN)
    return a_smem, w_smem, bars


@gluon.jit
def _mma(a_smem, w_smem, bars, g, zero, STAGES: gl.constexpr, BK: gl.constexpr, SWAP: gl.constexpr = False):
    """Wait for step ``g``'s tiles, start its wgmma (fresh accumulator); returns the in-flight token. ``SWAP``: the
    weight rows on the wgmma's M side (:mod:`.fp8_w2_dec`), the accumulator [BN, BM]."""
    s = g % STAGES
    mbarrier.wait(bars.index(s), (g // STAGES) & 1)
    if SWAP:
        tok = warpgroup_mma(w_smem.index(s), a_smem.index(s).permute((1, 0)), zero, use_acc=False,
                            max_num_imprecise_acc=BK, is_async=True)
    else:
        tok = warpgroup_mma(a_smem.index(s), w_smem.index(s).permute((1, 0)), zero, use_acc=False,
                            max_num_imprecise_acc=BK, is_async=True)
    return tok


@gluon.jit
def _promote(c, acc, sc, a_desc, w_desc, a_smem, w_smem, bars, g, n_steps, nk, row_a, row_w, STAGES: gl.constexpr,
             BK: gl.constexpr, BN: gl.constexpr, SWAP: gl.constexpr = False, ONE: gl.constexpr = False):
    """Promote step ``g``'s finished product ``c`` into ``acc`` (while the next wgmma runs) and refill its ring
    slot with step g + STAGES (of this tile or the program's next one). ``sc``: one scale per token row, along
    the accumulator's rows ([BM, BN]) or, ``SWAP``, its columns ([BN, BM])."""
    if SWAP:
        acc = gl.fma(c, sc[None, :], acc)
    else:
        acc = gl.fma(c, sc[:, None], acc)
    if g + STAGES < n_steps:
        _issue(a_desc, w_desc, a_smem, w_smem, bars, g + STAGES, nk, row_a, row_w, STAGES, BK, BN, ONE)
    return acc


@gluon.jit
def fp8_w2_sum_kernel(
    a_desc, w_desc, as_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_asr, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr,
    NT: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid (num_pid_m · cdiv(NBN, NT),): a program computes NT neighbouring column tiles of one row block, one
    after the other through one ring (the next tile's first loads are in flight while a tile is promoted and
    stored; the row block's expert, slots and router weights are read once). a_desc: TMA over inter_q [rows, I]
    e4m3, block [BM, BK]; w_desc: over w2.view(E·H, I) e4m3, block [BN, BK]; as: [rows, cdiv(I, BK)] fp32; ws:
    [E, cdiv(H, QBN), cdiv(I, BK)] fp32 (QBN % BN == 0: one weight scale per tile and step); part: [T·K, H]
    fp32."""
    pid_m, pid_g = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(NBN, NT), GROUP_M)
    e, first, n_e = block_expert(counts_ptr, row_start_ptr, pid_m, E_local, BM, BLOCK_E, num_warps)
    if e < E_local:
        mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BN, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, mma_l)
        col_l: gl.constexpr = gl.SliceLayout(0, mma_l)
        r = gl.arange(0, BM, layout=row_l)
        rows = pid_m * BM + r
        valid = (pid_m - first) * BM + r < n_e
        as_rows = as_ptr + rows.to(gl.int64) * stride_asr
        row_a = pid_m * BM
        n0 = pid_g * NT  # the program's first column tile
        row_w = e * H + n0 * BN
        nt = gl.minimum(NBN - n0, NT)
        nk = gl.cdiv(I, BK)
        n_steps = nt * nk

        a_smem, w_smem, bars = ring(a_desc, w_desc, n_steps, nk, row_a, row_w, STAGES, BM, BN, BK)
        slot = gl.load(sorted_ptr + rows, mask=valid, other=0)
        if not ON_INPUT:
            tok = slot // K
            wv = gl.load(tw_ptr + tok.to(gl.int64) * stride_twt + (slot - tok * K), mask=valid, other=0.0)
        else:  # the weight went onto the input: nothing to read (the epilogue ignores wv)
            wv = slot
        zero = gl.zeros([BM, BN], gl.float32, layout=mma_l)

        for j in range(nt):
            g0 = j * nk  # the tile's first step in the program's ring
            pid_n = n0 + j
            ws_e = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn
            acc = gl.zeros([BM, BN], gl.float32, layout=mma_l)
            # step k - 1 is waited for, step k's wgmma started, then k - 1 promoted while it runs. Steps go in
            # pairs (t0 even, t1 odd), so no in-flight accumulator is carried into a register that must move.
            t0 = _mma(a_smem, w_smem, bars, g0, zero, STAGES, BK)
            sc0 = step_scale(as_rows, valid, ws_e, 0)
            for k in range(1, nk - 1, 2):
                c0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
                t1 = _mma(a_smem, w_smem, bars, g0 + k, zero, STAGES, BK)
                acc = _promote(c0, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, g0 + k - 1, n_steps, nk, row_a,
                               row_w, STAGES, BK, BN)
                sc1 = step_scale(as_rows, valid, ws_e, k)
                c1 = warpgroup_mma_wait(num_outstanding=0, deps=(t1,))
                t0 = _mma(a_smem, w_smem, bars, g0 + k + 1, zero, STAGES, BK)
                acc = _promote(c1, acc, sc1, a_desc, w_desc, a_smem, w_smem, bars, g0 + k, n_steps, nk, row_a,
                               row_w, STAGES, BK, BN)
                sc0 = step_scale(as_rows, valid, ws_e, k + 1)
            if nk % 2 == 0:  # one odd step left
                c0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
                t1 = _mma(a_smem, w_smem, bars, g0 + nk - 1, zero, STAGES, BK)
                acc = _promote(c0, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, g0 + nk - 2, n_steps, nk, row_a,
                               row_w, STAGES, BK, BN)
                sc1 = step_scale(as_rows, valid, ws_e, nk - 1)
                last = warpgroup_mma_wait(num_outstanding=0, deps=(t1,))
                acc = _promote(last, acc, sc1, a_desc, w_desc, a_smem, w_smem, bars, g0 + nk - 1, n_steps, nk,
                               row_a, row_w, STAGES, BK, BN)
            else:
                last = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
                acc = _promote(last, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, g0 + nk - 1, n_steps, nk,
                               row_a, row_w, STAGES, BK, BN)

            w2_part_store(acc, e, pid_n, slot, valid, wv, b2_ptr, part_ptr, H, stride_be, stride_pr, BN, col_l, HAS_BIAS,
                          ON_INPUT)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))
