"""fp8 block-scaled w13 of a decode batch: swapped tiles, the loads in a producer warp (Hopper wgmma, Gluon).

The Triton w13 of the fp8 decode buckets (``SWAP``, ``INLINE``, ``REQ``: :func:`.._triton.grouped_gemm.w13_kernel`)
computes, per program (row block b, column tile n of BN gate and BN up columns) and K step k of BK = 128 (one scale
block)::

    t_g[c, m] = Wq[e, n·BN + c, k·BK:(k+1)·BK] · x_q[tok(m), k·BK:(k+1)·BK]    (wgmma, M = BN weight rows, N = BM)
    acc_g[c, m] = fma(t_g, S[e, n-block, k] · s_x[tok(m), k], acc_g)             (t_u, acc_u: the up rows I + n·BN)

then ``+ b13``, the gated activation in fp32 and the store of ``inter[row m]`` (quantised for w2 per row of the tile
when BN is one group, ``REQ`` 1, or rounded to the params dtype, ``REQ`` 0). This kernel gives the same bits (the
same m64nBMk32 wgmmas per step with a fresh accumulator, the same scale product and fma, the epilogue functions of
:func:`.common.w13_store` on the transposed accumulators) with :mod:`.fp8_w2_dec_ws`'s schedule:

- a producer warp issues every load: it waits ``empty[s]``, gathers the step's x rows of the block's tokens and
  copies their scales ``s_x`` and the tile's two weight scales into the slot by ``cp.async`` (one ``full[s]``
  arrival per lane once landed), then ``expect``s the two weight tiles' bytes and requests them by TMA;
- the consumer warpgroup waits ``full[s]``, reads the scales from shared memory, runs step k's two wgmmas while it
  promotes step k - 1 (:func:`.fp8_w13_ws._steps` in the swapped orientation), frees the slot, and runs the epilogue.

The rows are the inline layout's (:func:`.fp8_w2_dec.inline_layout`, the arithmetic of
:func:`.._triton.rows.inline_block`), derived here from the routing ids; program 0 also does what the align kernel
would (:func:`inline_prologue`: the w2 combine's semaphores and the output rows of tokens without a live slot zeroed).
Past the inline bound (``INLINE`` false) the rows are the align kernel's, which did that.

``PDL`` (launched as a programmatic dependent of the input quantiser): the layout (from the routing ids) and the
first ``STAGES`` weight tiles are read before the grid wait, ``x_q`` and its scales only after it. That is sound
because the quantiser lets this launch begin only after its own grid wait returned
(:meth:`..triton_experts_quant.QuantLaunch.setup`, ``WAIT_FIRST``): whatever wrote the ids, the routing kernel that the
quantiser follows or any launch before, had completed by then. The consumer lets the w2 launch begin
(``griddepcontrol.launch_dependents``) once its grid wait returns, as the Triton w13 does.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .common import grid_launch_dependents, grid_wait, pid_to_tile, ring_barriers, w13_store
from .compat import cp_async_load, tma_load
from .fp8_w13_ws import _mma2, _steps
from .fp8_w2_dec import block_layout

#: registers per thread of the producer warp (its warpgroup is padded with idle warps that get as many)
PRODUCER_REGS = gl.constexpr(40)


@gluon.jit
def inline_prologue(loc_j, sem_ptr, out_ptr, T, K, H, NBN, stride_ot, SP: gl.constexpr, TP: gl.constexpr,
                    COMBINE: gl.constexpr, L2: gl.constexpr, NW: gl.constexpr):
    """What the align kernel's count phase does besides counting (:func:`.._triton.rows.inline_prologue`): zero the
    combine semaphores [T · NBN] (``COMBINE``) and the output rows of tokens with no live slot. ``loc_j``: the slots'
    local experts [SP] (-1 dead) in ``SliceLayout(0, L2)``; ``NW``: the warps running it."""
    if COMBINE:
        z_l: gl.constexpr = gl.BlockedLayout([4], [32], [NW], [0])
        for j0 in range(0, T * NBN, 1024):
            jz = j0 + gl.arange(0, 1024, layout=z_l)
            gl.store(sem_ptr + jz, gl.zeros([1024], gl.int32, layout=z_l), mask=jz < T * NBN)
    j = gl.arange(0, SP, layout=gl.SliceLayout(0, L2))
    t = gl.arange(0, TP, layout=gl.SliceLayout(1, L2))
    cnt = gl.sum(((j[None, :] // K == t[:, None]) & (loc_j[None, :] >= 0)).to(gl.int32), axis=1)
    dead = (t < T) & (cnt == 0)
    if gl.max(dead.to(gl.int32), axis=0) > 0:
        rows = out_ptr + t.to(gl.int64)[:, None] * stride_ot
        for h0 in range(0, H, 32):
            h = h0 + gl.arange(0, 32, layout=gl.SliceLayout(0, L2))
            gl.store(rows + h[None, :], gl.zeros([TP, 32], out_ptr.dtype.element_ty, layout=L2),
                     mask=dead[:, None] & (h[None, :] < H))


@gluon.jit
def _produce(ring, tok_smem, x_ptr, xs_ptr, w_desc, ws_ptr, e, pid_n, H, I, N1, stride_xt, stride_xst, stride_wse,
             stride_wsn, ws_shard, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr,
             STAGES: gl.constexpr, EVEN_K: gl.constexpr, PDL: gl.constexpr):
    """Every load of the program's K steps, slot by slot (one warp): the block's x rows gathered by ``cp.async``
    (16-byte pieces, zero past H and for rows without a slot), their scales and the tile's two weight scales, the gate
    and up tiles by TMA."""
    a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty = ring
    A_L: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [1, 1], [1, 0])  # 16-byte pieces of the rows
    ROW_L: gl.constexpr = gl.BlockedLayout([(BM + 31) // 32], [32], [1], [0])
    nbytes: gl.constexpr = 2 * w_desc.block_type.nbytes
    row_g = e * N1 + pid_n * BN
    nk = gl.cdiv(H, BK)
    if PDL:  # the weight tiles of the first STAGES steps do not depend on the kernel before this one
        for s0 in gl.static_range(STAGES):
            if s0 < nk:
                bar0 = full.index(s0)
                mbarrier.expect(bar0, nbytes)
                tma_load(w_desc, [row_g, s0 * BK], bar0, w_smem.index(2 * s0))
                tma_load(w_desc, [row_g + I, s0 * BK], bar0, w_smem.index(2 * s0 + 1))
        grid_wait()
    tok_a = tok_smem.load(gl.SliceLayout(1, A_L))  # the rows' tokens, -1 for a row without a slot
    offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, A_L))
    a_ptrs = x_ptr + gl.maximum(tok_a, 0).to(gl.int64)[:, None] * stride_xt + offs_k[None, :]
    tok_r = tok_smem.load(ROW_L)
    xs_rows = xs_ptr + gl.maximum(tok_r, 0).to(gl.int64) * stride_xst
    # S[e, n-block, k] of the gate and the up rows, once per row (the consumer multiplies column by column)
    ws_g = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn + tok_r * 0
    ws_u = ws_g + ws_shard * stride_wsn
    for k in range(nk):
        s = k % STAGES
        mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)  # the wgmmas that read it are done
        bar = full.index(s)
        if EVEN_K:
            amask = (tok_a >= 0)[:, None]
        else:
            amask = (tok_a >= 0)[:, None] & (offs_k[None, :] < H - k * BK)
        cp_async_load(a_smem.index(s), a_ptrs + k * BK, mask=amask)
        cp_async_load(sa_smem.index(s), xs_rows + k, mask=tok_r >= 0)
        cp_async_load(sg_smem.index(s), ws_g + k)
        cp_async_load(su_smem.index(s), ws_u + k)
        async_copy.mbarrier_arrive(bar, increment_count=False)  # one of full[s]'s arrivals per lane, once landed
        if not (PDL and k < STAGES):  # (else expected and requested before the grid wait)
            mbarrier.expect(bar, nbytes)
            tma_load(w_desc, [row_g, k * BK], bar, w_smem.index(2 * s))
            tma_load(w_desc, [row_g + I, k * BK], bar, w_smem.index(2 * s + 1))


@gluon.jit
def _consume(ring, e, valid2, loc_j, pid_m, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, sem_ptr, H, I, T, K, NBN,
             limit, stride_be, stride_ir, stride_isr, stride_ot, BM: gl.constexpr, BN: gl.constexpr,
             BK: gl.constexpr, SP: gl.constexpr, TP: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr,
             HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr,
             COMBINE: gl.constexpr, INLINE: gl.constexpr, PDL: gl.constexpr, L2: gl.constexpr, NW: gl.constexpr):
    """The wgmmas, promotions and epilogue of the program's tile (the default partition's warps); program 0 of the
    inline layout also zeroes what the align kernel would have."""
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BM, 32])
    tok_l: gl.constexpr = gl.SliceLayout(0, mma_l)  # along the block's rows (the accumulators' columns)
    if PDL:  # inter, its scales and the output rows are written after the kernel before this one completed
        grid_wait()
        grid_launch_dependents()
    if INLINE:
        if gl.program_id(0) == 0:
            inline_prologue(loc_j, sem_ptr, out_ptr, T, K, H, NBN, stride_ot, SP, TP, COMBINE, L2, NW)
    zero = gl.zeros([BN, BM], gl.float32, layout=mma_l)
    tg, tu, pg, pu = _mma2(ring, 0, zero, 0, STAGES, BK, tok_l, 0, BM, True)
    acc_g, acc_u = _steps(tg, tu, pg, pu, ring, 0, gl.cdiv(H, BK), zero, 0, STAGES, BK, tok_l, 0, BM, True)
    # the epilogue on [BM, BN] (rows, columns), as the Triton kernel's after its transpose
    epi_l: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])
    acc_g = gl.convert_layout(gl.permute(acc_g, (1, 0)), epi_l)
    acc_u = gl.convert_layout(gl.permute(acc_u, (1, 0)), epi_l)
    rows = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, epi_l))
    valid = gl.convert_layout(valid2, gl.SliceLayout(1, epi_l))
    w13_store(acc_g, acc_u, e, rows, valid, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, I, limit, stride_be, stride_ir,
              stride_isr, BN, gl.SliceLayout(0, epi_l), ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0)


@gluon.jit
def fp8_w13_dec_kernel(
    x_ptr, w_desc, xs_ptr, ws_ptr, b1_ptr, inter_ptr, is_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, sem_ptr,
    counts_ptr, row_start_ptr, sorted_ptr,
    H, I, N1, E_local, E_global, K, T, NBN, num_pid_m, limit,
    stride_xt, stride_xst, stride_wse, stride_wsn, ws_shard, stride_be, stride_ir, stride_isr, stride_it, stride_twt,
    stride_ot,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    SP: gl.constexpr, TP: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
    HAS_LIMIT: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr, HAS_MAP: gl.constexpr,
    SKIP_ZERO: gl.constexpr, COMBINE: gl.constexpr, EVEN_K: gl.constexpr, PDL: gl.constexpr = False,
    INLINE: gl.constexpr = True, BLOCK_E: gl.constexpr = 1, num_warps: gl.constexpr = 4,
):
    """Grid (num_pid_m · cdiv(I, BN),): one column tile per program. x: x_q [T, H] e4m3 (row stride ``stride_xt``),
    xs: [T, cdiv(H, BK)] fp32; w_desc: TMA over w13.view(E·N1, H) e4m3, block [BN, BK]; ws: [E, 2·ws_shard,
    cdiv(H, BK)] fp32 (gate blocks, then up; QBN % BN == 0); inter: [rows, I] e4m3 with scales ``is`` [rows,
    cdiv(I, BN)] (``REQ`` 1, BN = the group) or the params dtype (``REQ`` 0); out: [T, H] (the inline prologue zeroes
    dead tokens' rows); sem: [T, NBN] int32 (w2's column tiles; zeroed by the inline prologue when ``COMBINE``);
    ids / tw: [T, K]. Past the inline layout (``INLINE`` false): the align kernel's ``counts`` / ``row_start``
    [E_local] and ``sorted`` [rows] (as :func:`.fp8_w2_dec.block_layout` reads them). ``num_warps`` = 4 (the
    consumer warpgroup), plus one producer warp."""
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(I, BN), GROUP_M)
    L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
    e, valid2, slot2, loc_j = block_layout(ids_ptr, tw_ptr, map_ptr, counts_ptr, row_start_ptr, sorted_ptr, pid_m,
                                           T * K, K, E_local, E_global, stride_it, stride_twt, BM, SP, HAS_MAP,
                                           SKIP_ZERO, INLINE, BLOCK_E, L2, num_warps)
    if e < E_local:
        scale_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per slot: [BM] fp32
        a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv)
        a_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BM, BK], a_sl)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [2 * STAGES, BN, BK], w_desc.layout)
        sa_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], scale_l)
        sg_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], scale_l)
        su_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], scale_l)
        # the rows' tokens for the producer warp (its layouts are one warp's); -1: no slot
        tok_smem = gl.allocate_shared_memory(gl.int32, [BM], scale_l)
        tok_smem.store(gl.where(valid2, slot2 // K, -1))
        # a slot is full after the producer's expect (1 arrival, then the TMA bytes) and each of its 32 lanes'
        # copies (one arrival per lane once its copies landed)
        full, empty = ring_barriers(STAGES, 1 + 32, 1)
        ring = (a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty)
        gl.warp_specialize([
            (_consume, (ring, e, valid2, loc_j, pid_m, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, sem_ptr, H, I, T, K,
                        NBN, limit, stride_be, stride_ir, stride_isr, stride_ot, BM, BN, BK, SP, TP, STAGES, ACT,
                        HAS_BIAS, HAS_LIMIT, REQ, UE8M0, COMBINE, INLINE, PDL, L2, num_warps)),
            (_produce, (ring, tok_smem, x_ptr, xs_ptr, w_desc, ws_ptr, e, pid_n, H, I, N1, stride_xt, stride_xst,
                        stride_wse, stride_wsn, ws_shard, BM, BN, BK, QBN, STAGES, EVEN_K, PDL)),
        ], [1], [PRODUCER_REGS])
    elif INLINE:
        if gl.program_id(0) == 0:  # no live slot in block 0: still the align kernel's zeroing
            if PDL:
                grid_wait()
            inline_prologue(loc_j, sem_ptr, out_ptr, T, K, H, NBN, stride_ot, SP, TP, COMBINE, L2, num_warps)
