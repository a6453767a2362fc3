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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .common import block_expert, pid_to_tile, step_scale


@gluon.jit
def _issue(a_desc, w_desc, a_smem, w_smem, bars, k, row_a, row_w, STAGES: gl.constexpr, BK: gl.constexpr):
    """TMA loads of K step ``k`` into ring slot ``k % STAGES``."""
    s = k % STAGES
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row_a, k * BK], bar, a_smem.index(s))
    tma.async_copy_global_to_shared(w_desc, [row_w, k * BK], bar, w_smem.index(s))


@gluon.jit
def _mma(a_smem, w_smem, bars, k, zero, STAGES: gl.constexpr, BK: gl.constexpr):
    """Wait for step ``k``'s tiles, start its wgmma (fresh accumulator); returns the in-flight token."""
    s = k % STAGES
    mbarrier.wait(bars.index(s), (k // STAGES) & 1)
    return warpgroup_mma(a_smem.index(s), w_smem.index(s).permute((1, 0)), zero, use_acc=False,
                         max_num_imprecise_acc=BK, is_async=True)


@gluon.jit
def _promote(c, acc, sc, a_desc, w_desc, a_smem, w_smem, bars, k, nk, row_a, row_w, STAGES: gl.constexpr,
             BK: gl.constexpr):
    """Promote step ``k``'s finished product ``c`` into ``acc`` (while the next wgmma runs) and refill its ring
    slot with step k + STAGES."""
    acc = gl.fma(c, sc[:, None], acc)
    if k + STAGES < nk:
        _issue(a_desc, w_desc, a_smem, w_smem, bars, k + STAGES, row_a, row_w, STAGES, BK)
    return acc


@gluon.jit
def fp8_w2_sum_kernel(
    a_desc, w_desc, as_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_asr, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid (num_pid_m · NBN,). a_desc: TMA over inter_q [rows, I] e4m3, block [BM, BK]; w_desc: over
    w2.view(E·H, I) e4m3, block [BN, BK]; as: [rows, cdiv(I, BK)] fp32; ws: [E, cdiv(H, QBN), cdiv(I, BK)] fp32
    (QBN % BN == 0: one weight scale per tile and step); part: [T·K, H] fp32."""
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, NBN, GROUP_M)
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
        ws_e = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn
        row_a = pid_m * BM
        row_w = e * H + pid_n * BN

        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        nk = gl.cdiv(I, BK)
        for s in gl.static_range(STAGES):
            if s < nk:
                _issue(a_desc, w_desc, a_smem, w_smem, bars, s, row_a, row_w, STAGES, BK)

        zero = gl.zeros([BM, BN], gl.float32, layout=mma_l)
        acc = gl.zeros([BM, BN], gl.float32, layout=mma_l)
        # step k - 1 is waited for, step k's wgmma started, then k - 1 promoted while it runs. Steps go in pairs
        # (t0 even, t1 odd), so no in-flight accumulator is carried into a register that must move.
        t0 = _mma(a_smem, w_smem, bars, 0, zero, STAGES, BK)
        sc0 = step_scale(as_rows, valid, ws_e, 0)
        for k in range(1, nk - 1, 2):
            c0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
            t1 = _mma(a_smem, w_smem, bars, k, zero, STAGES, BK)
            acc = _promote(c0, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, k - 1, nk, row_a, row_w, STAGES, BK)
            sc1 = step_scale(as_rows, valid, ws_e, k)
            c1 = warpgroup_mma_wait(num_outstanding=0, deps=(t1,))
            t0 = _mma(a_smem, w_smem, bars, k + 1, zero, STAGES, BK)
            acc = _promote(c1, acc, sc1, a_desc, w_desc, a_smem, w_smem, bars, k, nk, row_a, row_w, STAGES, BK)
            sc0 = step_scale(as_rows, valid, ws_e, k + 1)
        if nk % 2 == 0:  # one odd step left
            c0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
            t1 = _mma(a_smem, w_smem, bars, nk - 1, zero, STAGES, BK)
            acc = _promote(c0, acc, sc0, a_desc, w_desc, a_smem, w_smem, bars, nk - 2, nk, row_a, row_w, STAGES, BK)
            sc1 = step_scale(as_rows, valid, ws_e, nk - 1)
            last = warpgroup_mma_wait(num_outstanding=0, deps=(t1,))
            acc = gl.fma(last, sc1[:, None], acc)
        else:
            last = warpgroup_mma_wait(num_outstanding=0, deps=(t0,))
            acc = gl.fma(last, sc0[:, None], acc)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        cols = pid_n * BN + gl.arange(0, BN, layout=col_l)
        nmask = cols < H
        if HAS_BIAS:
            acc += gl.load(b2_ptr + e.to(gl.int64) * stride_be + cols, mask=nmask, other=0.0).to(gl.float32)[None, :]
        slot = gl.load(sorted_ptr + rows, mask=valid, other=0)
        if not ON_INPUT:
            tok = slot // K
            kk = slot - tok * K
            wv = gl.load(tw_ptr + tok.to(gl.int64) * stride_twt + kk, mask=valid, other=0.0).to(gl.float32)
            acc = acc * wv[:, None]
        p_ptrs = part_ptr + slot.to(gl.int64)[:, None] * stride_pr + cols[None, :]
        gl.store(p_ptrs, acc, mask=valid[:, None] & nmask[None, :])
