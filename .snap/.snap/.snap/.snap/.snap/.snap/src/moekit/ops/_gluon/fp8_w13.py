"""fp8 block-scaled w13 GEMM with the scale promotion overlapped (Hopper wgmma, Gluon).

Per output tile (rows of one expert block, BN gate columns and the same BN up columns), K step ``k`` of
BK = 128 (one scale block)::

    t_g = x_q[tok(rows), k·BK:(k+1)·BK] · Wq[e, n, k·BK:(k+1)·BK]ᵀ     (fp8 wgmma, fp32, fresh; t_u: rows I + n)
    acc_g = fma(t_g, s_x[tok, k] · S[e, n // 128, k], acc_g)          (acc_u likewise, its own scale block)

then ``+ b13``, the gated activation in fp32 and the store (rounded to the params dtype, or quantised for w2
per row of the tile when BN is one group): :func:`moekit.ops._triton.grouped_gemm.w13_kernel` for fp8 block
weights, bit for bit (the same wgmma per K step, products, fma and epilogue functions).

``STACK`` (config ``"gluon_stack"``): the gate and up tiles land in one [2·BN, BK] slot and one m64n(2·BN)k32
wgmma per k32 computes both (the row tile is read once per step instead of twice); its product splits into the gate
and up halves in registers (:func:`halves`: a column's half is a register bit), so the promotion and epilogue are
unchanged and so are the bits. H200 round 16 (``-r16-profile-stack.log``): within ±2 % of the two-wgmma form at
every compute-bound point (DeepSeek-V3 T = 16384 w13 11189 -> 11429 µs, Mixtral 10193 -> 10011): the shared-memory
operand traffic is not what bounds this kernel. Opt-in, in no table; the tuner tries it.

The schedule is :mod:`.fp8_w2`'s: step k's two wgmmas run while step k - 1 is promoted. The token rows are
gathered (a block's rows are scattered tokens, so no TMA): ``cp.async`` 16-byte copies into a ring of
``STAGES`` slots, one copy group per step; the weight tiles come by TMA into the same slots.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .common import block_expert, pid_to_tile, step_scale, w13_store
from .compat import cp_async_load, cta_barrier, tma_load


@gluon.jit
def _issue(a_ptrs, valid_a, offs_k, H, w_desc, a_smem, w_smem, bars, k, nk, row_g, I, STAGES: gl.constexpr,
           BK: gl.constexpr, EVEN_K: gl.constexpr, STACK: gl.constexpr):
    """K step ``k`` into ring slot ``k % STAGES``: the gathered rows by cp.async (one commit group, empty past
    the last step), the gate and up tiles by TMA on the slot's barrier."""
    s = k % STAGES
    if k < nk:
        if EVEN_K:
            mask = valid_a[:, None]
        else:
            mask = valid_a[:, None] & (offs_k[None, :] < H - k * BK)
        cp_async_load(a_smem.index(s), a_ptrs + k * BK, mask=mask)
        bar = bars.index(s)
        mbarrier.expect(bar, 2 * w_desc.block_type.nbytes)
        if STACK:  # gate rows, then up rows, of one [2·BN, BK] tile
            BN: gl.constexpr = w_desc.block_type.shape[0]
            tma_load(w_desc, [row_g, k * BK], bar, w_smem.index(s).slice(0, BN))
            tma_load(w_desc, [row_g + I, k * BK], bar, w_smem.index(s).slice(BN, BN))
        else:
            tma_load(w_desc, [row_g, k * BK], bar, w_smem.index(2 * s))
            tma_load(w_desc, [row_g + I, k * BK], bar, w_smem.index(2 * s + 1))
    async_copy.commit_group()


@gluon.jit
def _mma2(a_smem, w_smem, bars, k, zero, STAGES: gl.constexpr, BK: gl.constexpr, STACK: gl.constexpr):
    """Step ``k``'s operands ready (the rows' copy group — the caller waited —, the weight tiles' barrier),
    then its gate and up wgmmas (fresh accumulators); returns the two in-flight tokens. ``STACK``: one wgmma
    over the stacked [2·BN, BK] tile (``zero``: [BM, 2·BN]), its token twice."""
    s = k % STAGES
    cta_barrier()  # every thread's rows of this step have landed (each waited for its own copies)
    fence_async_shared()  # ... and are visible to the wgmma's async proxy
    mbarrier.wait(bars.index(s), (k // STAGES) & 1)
    if STACK:
        t = warpgroup_mma(a_smem.index(s), w_smem.index(s).permute((1, 0)), zero, use_acc=False,
                          max_num_imprecise_acc=BK, is_async=True)
        return t, t
    else:
        tg = warpgroup_mma(a_smem.index(s), w_smem.index(2 * s).permute((1, 0)), zero, use_acc=False,
                           max_num_imprecise_acc=BK, is_async=True)
        tu = warpgroup_mma(a_smem.index(s), w_smem.index(2 * s + 1).permute((1, 0)), zero, use_acc=False,
                           max_num_imprecise_acc=BK, is_async=True)
        return tg, tu


@gluon.jit
def halves(c, BM: gl.constexpr, BN: gl.constexpr):
    """(gate, up) halves of a stacked [BM, 2·BN] product: columns [0, BN) and [BN, 2·BN). In the wgmma layout a
    column's half is a register bit of its thread, so the split moves no data."""
    return gl.split(gl.permute(gl.reshape(c, [BM, 2, BN]), (0, 2, 1)))


@gluon.jit
def _wait2(tg, tu, BM: gl.constexpr, BN: gl.constexpr, STACK: gl.constexpr):
    """Wait for a step's wgmmas: its (gate, up) products [BM, BN]."""
    if STACK:
        return halves(warpgroup_mma_wait(num_outstanding=0, deps=(tg,)), BM, BN)
    else:
        return warpgroup_mma_wait(num_outstanding=0, deps=(tg, tu))


@gluon.jit
def fp8_w13_kernel(
    x_ptr, w_desc, xs_ptr, ws_ptr, b1_ptr, inter_ptr, is_ptr, out_ptr, counts_ptr, row_start_ptr, sorted_ptr,
    H, I, N1, E_local, K, num_pid_m, limit,
    stride_xt, stride_xst, stride_wse, stride_wsn, ws_shard, stride_be, stride_ir, stride_isr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
    HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr, STACK: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid (num_pid_m · cdiv(I, BN),). x: x_q [T, H] e4m3 (row stride ``stride_xt``), xs: [T, cdiv(H, BK)]
    fp32; w_desc: TMA over w13.view(E·N1, H) e4m3, block [BN, BK]; ws: [E, 2·ws_shard, cdiv(H, BK)] fp32 (gate
    blocks, then up; QBN % BN == 0); inter: [rows, I] params dtype (``REQ`` 0) or e4m3 with scales ``is``
    [rows, cdiv(I, BN)] (``REQ`` 1, BN = the group); ``out_ptr``: any tensor of the params dtype (not read)."""
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(I, BN), GROUP_M)
    e, first, n_e = block_expert(counts_ptr, row_start_ptr, pid_m, E_local, BM, BLOCK_E, num_warps)
    if e < E_local:
        NW: gl.constexpr = 2 * BN if STACK else BN  # one wgmma's columns
        mma_w: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, NW, 32])
        zero = gl.zeros([BM, NW], gl.float32, layout=mma_w)
        if STACK:  # the accumulators in the layout of a stacked product's halves
            zg, zu = halves(zero, BM, BN)
            mma_l: gl.constexpr = zg.type.layout
        else:
            mma_l: gl.constexpr = mma_w
        a_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])  # 16-byte row chunks
        a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv)
        # the gathered rows' pointers (cp.async layout) and, in the accumulator's row layout, their scales
        ra = gl.arange(0, BM, layout=gl.SliceLayout(1, a_l))
        valid_a = (pid_m - first) * BM + ra < n_e
        tok_a = gl.load(sorted_ptr + pid_m * BM + ra, mask=valid_a, other=0) // K
        offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, a_l))
        a_ptrs = x_ptr + tok_a.to(gl.int64)[:, None] * stride_xt + offs_k[None, :]
        r = gl.arange(0, BM, layout=gl.SliceLayout(1, mma_l))
        rows = pid_m * BM + r
        valid = (pid_m - first) * BM + r < n_e
        tok = gl.load(sorted_ptr + rows, mask=valid, other=0) // K
        xs_rows = xs_ptr + tok.to(gl.int64) * stride_xst
        ws_g = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn
        ws_u = ws_g + ws_shard * stride_wsn
        row_g = e * N1 + pid_n * BN

        a_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, BK], a_sl)
        if STACK:
            w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 2 * BN, BK], w_desc.layout)
        else:
            w_smem = gl.allocate_shared_memory(w_desc.dtype, [2 * STAGES, BN, BK], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        nk = gl.cdiv(H, BK)
        for s in gl.static_range(STAGES):
            _issue(a_ptrs, valid_a, offs_k, H, w_desc, a_smem, w_smem, bars, s, nk, row_g, I, STAGES, BK, EVEN_K,
                   STACK)

        acc_g = gl.zeros([BM, BN], gl.float32, layout=mma_l)
        acc_u = gl.zeros([BM, BN], gl.float32, layout=mma_l)
        # copy groups committed before step k's wait: STAGES + k - 1 (k >= 1), so STAGES - 2 may stay in flight
        async_copy.wait_group(STAGES - 1)
        tg0, tu0 = _mma2(a_smem, w_smem, bars, 0, zero, STAGES, BK, STACK)
        # scales two steps before their promotion, as in fp8_w2: entering step pair (k, k + 1), (tg0, tu0) = step
        # k - 1 in flight, (sg0, su0) its scales, (sg1, su1) step k's
        sg0 = step_scale(xs_rows, valid, ws_g, 0)
        su0 = step_scale(xs_rows, valid, ws_u, 0)
        sg1 = step_scale(xs_rows, valid, ws_g, gl.minimum(1, nk - 1))
        su1 = step_scale(xs_rows, valid, ws_u, gl.minimum(1, nk - 1))
        for k in range(1, nk - 1, 2):
            cg0, cu0 = _wait2(tg0, tu0, BM, BN, STACK)
            async_copy.wait_group(STAGES - 2)
            tg1, tu1 = _mma2(a_smem, w_smem, bars, k, zero, STAGES, BK, STACK)
            acc_g = gl.fma(cg0, sg0[:, None], acc_g)
            acc_u = gl.fma(cu0, su0[:, None], acc_u)
            cta_barrier()  # every warpgroup is past step k - 1's wgmmas: its slot may be refilled
            _issue(a_ptrs, valid_a, offs_k, H, w_desc, a_smem, w_smem, bars, k - 1 + STAGES, nk, row_g, I, STAGES,
                   BK, EVEN_K, STACK)
            sg0 = step_scale(xs_rows, valid, ws_g, k + 1)
            su0 = step_scale(xs_rows, valid, ws_u, k + 1)
            cg1, cu1 = _wait2(tg1, tu1, BM, BN, STACK)
            async_copy.wait_group(STAGES - 2)
            tg0, tu0 = _mma2(a_smem, w_smem, bars, k + 1, zero, STAGES, BK, STACK)
            acc_g = gl.fma(cg1, sg1[:, None], acc_g)
            acc_u = gl.fma(cu1, su1[:, None], acc_u)
            cta_barrier()
            _issue(a_ptrs, valid_a, offs_k, H, w_desc, a_smem, w_smem, bars, k + STAGES, nk, row_g, I, STAGES, BK,
                   EVEN_K, STACK)
            sg1 = step_scale(xs_rows, valid, ws_g, gl.minimum(k + 2, nk - 1))
            su1 = step_scale(xs_rows, valid, ws_u, gl.minimum(k + 2, nk - 1))
        if nk % 2 == 0:  # one odd step left
            cg0, cu0 = _wait2(tg0, tu0, BM, BN, STACK)
            async_copy.wait_group(STAGES - 2)
            tg1, tu1 = _mma2(a_smem, w_smem, bars, nk - 1, zero, STAGES, BK, STACK)
            acc_g = gl.fma(cg0, sg0[:, None], acc_g)
            acc_u = gl.fma(cu0, su0[:, None], acc_u)
            lg, lu = _wait2(tg1, tu1, BM, BN, STACK)
            acc_g = gl.fma(lg, sg1[:, None], acc_g)
            acc_u = gl.fma(lu, su1[:, None], acc_u)
        else:
            lg, lu = _wait2(tg0, tu0, BM, BN, STACK)
            acc_g = gl.fma(lg, sg0[:, None], acc_g)
            acc_u = gl.fma(lu, su0[:, None], acc_u)
        async_copy.wait_group(0)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        w13_store(acc_g, acc_u, e, rows, valid, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, I, limit, stride_be,
                  stride_ir, stride_isr, BN, gl.SliceLayout(0, mma_l), ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0)
