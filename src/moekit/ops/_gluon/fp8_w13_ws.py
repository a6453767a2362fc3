"""fp8 block-scaled w13 GEMM, warp-specialised and persistent (Hopper wgmma, Gluon).

The math and the bits are :func:`.fp8_w13.fp8_w13_kernel`'s. Per output tile (the BM sorted rows of one expert
block, BN gate columns and the same BN up columns) and K step ``k`` of BK = 128 (one scale block)::

    t_g = x_q[tok(rows), k·BK:(k+1)·BK] · Wq[e, n, k·BK:(k+1)·BK]ᵀ     (fp8 wgmma, fp32, fresh; t_u: rows I + n)
    acc_g = fma(t_g, s_x[tok, k] · S[e, n // 128, k], acc_g)          (acc_u likewise, its own scale block)

then ``+ b13``, the gated activation in fp32 and the store (rounded to the params dtype, or quantised for w2 per
row of a BN = group tile): the same wgmma instructions per K step (m64nBNk32 e4m3, fresh accumulator,
``max_num_imprecise_acc`` = BK), the same scale product, fma order and epilogue functions, so
:func:`moekit.ops._triton.grouped_gemm.w13_kernel` for fp8 block weights bit for bit.

The schedule is :mod:`.fp8_w2_ws`'s: each of ``NC`` consumers (1 or 2) has its own producer partition and ring
of ``STAGES`` slots, and the programs are persistent (one per SM; program ``p`` of ``P`` takes tiles ``p, p +
P, ...`` in the grouped order of :func:`.common.pid_to_tile`, consumer ``c`` the program's tiles ``p + c·P, p +
(c + NC)·P, ...``; each tile's expert from the block -> expert table, :func:`.common.block_tile`; row blocks past
the last expert skipped by both partitions of a pair):

- producer ``c`` waits ``empty[s]``, gathers the step's token rows (a row block's rows are scattered tokens, so
  no TMA: ``cp.async``, 16-byte chunks, zero-filled past H and for the block's padding rows) and the scales
  (``s_x`` of each row, ``S`` of the gate and the up block once per row) into the slot, makes ``full[s]`` wait
  for every thread's copies (``cp.async.mbarrier.arrive``), then ``expect``s the two weight tiles' bytes and
  issues their TMA loads (gate rows ``e·N1 + n``, up rows ``e·N1 + I + n``) onto ``full[s]``;
- consumer ``c`` (one warpgroup per 64 rows) waits ``full[s]``, fences the gathered rows into the async proxy,
  reads the step's scales from the slot (its K loop loads nothing from global memory), runs step k's two wgmmas
  while it promotes step k - 1 (in pairs of steps, as in :mod:`.fp8_w2_ws`), frees slot ``s`` once its wgmmas
  are waited for, and runs the epilogue of :func:`.fp8_w13.fp8_w13_kernel` (:func:`.common.w13_store`).

The gather is the producer's cost: BM rows x 128 bytes per step, BM·8 copies of 16 bytes. A one-warp producer (as
in the w2, whose operands all come by TMA) would issue 16 copies per lane and step for BM 64 and hold 16 row
pointers (32 registers) beside its loop state, more than the 40 registers such a warp gets; a 4-warp producer
per consumer would make NC = 2 three warpgroups besides the consumers. So a producer has ``BM / 32`` warps (BM
64: 2 warps, BM 128: 4): 8 copies of 16 bytes per thread and step plus 3 scale copies, 8 row pointers. The two
2-warp producers of NC = 2 share one warpgroup, so the SM's 64 K registers split as 232 per consumer thread
(two warpgroups) and :data:`PRODUCER_REGS` = 48 per producer thread. Per K step a consumer's two m64n64k128
wgmmas take ~256 cycles of the tensor cores at the fp8 peak, ~512 when two consumers share them; in that time
each of the SM's four schedulers issues one warp of each consumer (~142 instructions per step, below) and one
producer warp (~104): ~390 of ~512 issue slots, so the gather should keep up, with little slack (not measured
apart; the kernel as a whole was measured slower, below).
A producer waits for its tile's slots (``sorted``) once per tile (the next tile's expert is looked up at a
tile's start, so that lands meanwhile); the ring (4 slots with NC = 2, BN 64) covers that wait.

Registers (ptxas for sm_90, checked by ``tests/ops/test_gluon_fp8.py``): a consumer holds six [64, BN] fp32
tiles per warpgroup (acc_g, acc_u, the two products being promoted, the two in flight), 192 registers per thread
at BN 64 (so BN <= 64), and gets 232 (the default partition 224 beside a second consumer); no spills, no
serialised wgmma. Its K loop issues ~142 instructions per step (the one-warpgroup kernel's ~198, which also
gathers and loads its scales), a producer thread ~104 (11 copies, 4 partition barriers Triton puts around the
copies' arrival and the single-thread expect / TMA issues).

Measured on the H200 (docs/kernels.md, round 15): the same bits as the Triton and one-warpgroup kernels (23 GPU
tests), but slower than the one-warpgroup w13 at every compute-bound point but one (DeepSeek-V3 T = 16384: step
20405 -> 21869 µs with two consumers, w13 11225 -> 13309; gpt-oss T = 4096: -5 %, then -2 % in a second run).
Opt-in, in no table. The likely bound is the producers' gather; fp8 activations written in the sorted row order
would let them load a row tile by TMA.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .common import block_tile, tile_rows, tile_walk, w13_store

#: registers per thread of the producers' warpgroup (two 2-warp producers, or one of 2 or 4 warps, padded)
PRODUCER_REGS = gl.constexpr(48)
#: registers per thread of the second consumer (NC = 2); the default partition gets what Triton leaves it (224)
CONSUMER_REGS = gl.constexpr(232)


@gluon.jit
def _produce(x_ptr, w_desc, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, xs_ptr, ws_ptr, blk_ptr,
             counts_ptr, row_start_ptr, sorted_ptr, H, I, N1, E_local, K, num_pid_m, NBN, stride_xt, stride_xst,
             stride_wse, stride_wsn, ws_shard, C_ID: gl.constexpr, NC: gl.constexpr, BM: gl.constexpr,
             BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
             EVEN_K: gl.constexpr, NW: gl.constexpr):
    """Producer ``C_ID`` (``NW`` = BM / 32 warps): every load of consumer ``C_ID``'s K steps, slot by slot."""
    RING: gl.constexpr = C_ID * STAGES
    TK: gl.constexpr = BK // 16  # threads along a row: 16 bytes each
    A_L: gl.constexpr = gl.BlockedLayout([1, 16], [32 // TK, TK], [NW, 1], [1, 0])
    ROW_L: gl.constexpr = gl.BlockedLayout([BM // (32 * NW)], [32], [NW], [0])
    nbytes: gl.constexpr = 2 * w_desc.block_type.nbytes
    nk = gl.cdiv(H, BK)
    num_tiles = num_pid_m * NBN
    t_first, stride = tile_walk(C_ID, NC)
    ra = gl.arange(0, BM, layout=gl.SliceLayout(1, A_L))
    offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, A_L))
    r = gl.arange(0, BM, layout=ROW_L)
    pid_m, pid_n, e, first, n_e = block_tile(t_first, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, NBN,
                                             E_local, GROUP_M, BM)
    g = 0  # this ring's steps so far (the consumer counts alike)
    for t in range(t_first, num_tiles, stride):
        pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m,
                                                NBN, E_local, GROUP_M, BM)
        if e < E_local:
            # the rows' tokens, in the copy layout (16-byte chunks) and one row per thread (the scales)
            valid_a = (pid_m - first) * BM + ra < n_e
            tok_a = gl.load(sorted_ptr + pid_m * BM + ra, mask=valid_a, other=0) // K
            a_ptrs = x_ptr + tok_a.to(gl.int64)[:, None] * stride_xt + offs_k[None, :]
            valid = (pid_m - first) * BM + r < n_e
            tok = gl.load(sorted_ptr + pid_m * BM + r, mask=valid, other=0) // K
            xs_rows = xs_ptr + tok.to(gl.int64) * stride_xst
            # S[e, n-block, k] of the gate and the up columns for every row (the consumer multiplies row by row)
            ws_g = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn + r * 0
            ws_u = ws_g + ws_shard * stride_wsn
            row_g = e * N1 + pid_n * BN
            for k in range(nk):
                s = RING + g % STAGES
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # the wgmmas that read it are done
                bar = full.index(s)
                if EVEN_K:
                    mask = valid_a[:, None]
                else:
                    mask = valid_a[:, None] & (offs_k[None, :] < H - k * BK)
                async_copy.async_copy_global_to_shared(a_smem.index(s), a_ptrs + k * BK, mask=mask)
                async_copy.async_copy_global_to_shared(sa_smem.index(s), xs_rows + k, mask=valid)
                async_copy.async_copy_global_to_shared(sg_smem.index(s), ws_g + k)
                async_copy.async_copy_global_to_shared(su_smem.index(s), ws_u + k)
                async_copy.mbarrier_arrive(bar, increment_count=False)  # one of full[s]'s arrivals, once landed
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(w_desc, [row_g, k * BK], bar, w_smem.index(2 * s))
                tma.async_copy_global_to_shared(w_desc, [row_g + I, k * BK], bar, w_smem.index(2 * s + 1))
                g += 1
        pid_m, pid_n, e, first, n_e = pm1, pn1, e1, first1, n_e1


@gluon.jit
def _mma2(a_smem, w_smem, sa_smem, sg_smem, su_smem, full, g, zero, RING: gl.constexpr, STAGES: gl.constexpr,
          BK: gl.constexpr, ROW_L: gl.constexpr):
    """Wait for ring step ``g``'s rows, tiles and scales, start its gate and up wgmmas (fresh accumulators):
    (the two tokens, the rows' gate and up scales ``s_x · S``)."""
    s = RING + g % STAGES
    mbarrier.wait(full.index(s), (g // STAGES) & 1)
    fence_async_shared()  # the rows the producer's cp.async wrote (generic proxy) are read by the wgmma (async)
    sa = sa_smem.index(s).load(ROW_L)
    sg = sg_smem.index(s).load(ROW_L)
    su = su_smem.index(s).load(ROW_L)
    tg = warpgroup_mma(a_smem.index(s), w_smem.index(2 * s).permute((1, 0)), zero, use_acc=False,
                       max_num_imprecise_acc=BK, is_async=True)
    tu = warpgroup_mma(a_smem.index(s), w_smem.index(2 * s + 1).permute((1, 0)), zero, use_acc=False,
                       max_num_imprecise_acc=BK, is_async=True)
    return tg, tu, sa * sg, sa * su


@gluon.jit
def _release(empty, g, RING: gl.constexpr, STAGES: gl.constexpr):
    """Ring step ``g``'s wgmmas were waited for by every warp of the consumer: its slot may be refilled."""
    gl.thread_barrier()
    mbarrier.arrive(empty.index(RING + g % STAGES), count=1)


@gluon.jit
def _turn(tg, tu, pg, pu, acc_g, acc_u, j, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, zero,
          RING: gl.constexpr, STAGES: gl.constexpr, BK: gl.constexpr, ROW_L: gl.constexpr):
    """Wait for ring step ``j``'s wgmmas, start step j + 1's, free step j's slot and promote step j (scales
    ``pg``, ``pu``) while j + 1 runs: (step j + 1's tokens and scales, acc_g, acc_u)."""
    # the accumulators pass through the wait: the promotion before stays before it (as in fp8_w2_ws)
    cg, cu, acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(tg, tu, acc_g, acc_u))
    tg1, tu1, pg1, pu1 = _mma2(a_smem, w_smem, sa_smem, sg_smem, su_smem, full, j + 1, zero, RING, STAGES, BK, ROW_L)
    _release(empty, j, RING, STAGES)
    return tg1, tu1, pg1, pu1, gl.fma(cg, pg[:, None], acc_g), gl.fma(cu, pu[:, None], acc_u)


@gluon.jit
def _last(tg, tu, pg, pu, acc_g, acc_u, j, empty, RING: gl.constexpr, STAGES: gl.constexpr):
    """The tile's last step ``j``: wait for its wgmmas, free its slot, promote it."""
    cg, cu, acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(tg, tu, acc_g, acc_u))
    _release(empty, j, RING, STAGES)
    return gl.fma(cg, pg[:, None], acc_g), gl.fma(cu, pu[:, None], acc_u)


@gluon.jit
def _steps(tg, tu, pg, pu, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, g, nk, zero, RING: gl.constexpr,
           STAGES: gl.constexpr, BK: gl.constexpr, ROW_L: gl.constexpr):
    """One tile's K loop from ring step ``g`` (its first wgmmas already started), steps in pairs (the in-flight
    tokens alternate between two names, so none is carried into a register that must move): (acc_g, acc_u)."""
    acc_g = gl.zeros_like(zero)
    acc_u = gl.zeros_like(zero)
    for k in range(1, nk - 1, 2):
        tg1, tu1, pg1, pu1, acc_g, acc_u = _turn(tg, tu, pg, pu, acc_g, acc_u, g + k - 1, a_smem, w_smem, sa_smem,
                                                 sg_smem, su_smem, full, empty, zero, RING, STAGES, BK, ROW_L)
        tg, tu, pg, pu, acc_g, acc_u = _turn(tg1, tu1, pg1, pu1, acc_g, acc_u, g + k, a_smem, w_smem, sa_smem,
                                             sg_smem, su_smem, full, empty, zero, RING, STAGES, BK, ROW_L)
    if nk % 2 == 0:  # two steps left (nk - 2 in flight), else one
        tg1, tu1, pg1, pu1, acc_g, acc_u = _turn(tg, tu, pg, pu, acc_g, acc_u, g + nk - 2, a_smem, w_smem, sa_smem,
                                                 sg_smem, su_smem, full, empty, zero, RING, STAGES, BK, ROW_L)
        acc_g, acc_u = _last(tg1, tu1, pg1, pu1, acc_g, acc_u, g + nk - 1, empty, RING, STAGES)
    else:
        acc_g, acc_u = _last(tg, tu, pg, pu, acc_g, acc_u, g + nk - 1, empty, RING, STAGES)
    return acc_g, acc_u


@gluon.jit
def _consume(a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, b1_ptr, inter_ptr, is_ptr, out_ptr, blk_ptr,
             counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN, limit, stride_be, stride_ir, stride_isr,
             C_ID: gl.constexpr, NC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
             GROUP_M: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
             HAS_LIMIT: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr, NW: gl.constexpr):
    """Consumer ``C_ID`` (``NW`` warps): the wgmmas, promotions and epilogues of its tiles. The next tile's expert
    is looked up while a tile's first wgmmas run (its loads land during the K loop, which loads nothing); the
    epilogue loads the bias (HAS_BIAS)."""
    RING: gl.constexpr = C_ID * STAGES
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 32])
    row_l: gl.constexpr = gl.SliceLayout(1, mma_l)
    nk = gl.cdiv(H, BK)
    num_tiles = num_pid_m * NBN
    t_first, stride = tile_walk(C_ID, NC)
    zero = gl.zeros([BM, BN], gl.float32, layout=mma_l)
    pid_m, pid_n, e, first, n_e = block_tile(t_first, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, NBN,
                                             E_local, GROUP_M, BM)
    g = 0  # this ring's steps so far (the producer counts alike)
    for t in range(t_first, num_tiles, stride):
        live = e < E_local
        acc_g = zero
        acc_u = zero
        if live:
            tg, tu, pg, pu = _mma2(a_smem, w_smem, sa_smem, sg_smem, su_smem, full, g, zero, RING, STAGES, BK, row_l)
            pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr,
                                                    num_pid_m, NBN, E_local, GROUP_M, BM)
            acc_g, acc_u = _steps(tg, tu, pg, pu, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, g, nk, zero,
                                  RING, STAGES, BK, row_l)
            g += nk
        else:
            pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr,
                                                    num_pid_m, NBN, E_local, GROUP_M, BM)
        if live:
            rows, valid = tile_rows(pid_m, first, n_e, BM, row_l)
            w13_store(acc_g, acc_u, e, rows, valid, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, I, limit, stride_be,
                      stride_ir, stride_isr, BN, gl.SliceLayout(0, mma_l), ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0)
        pid_m, pid_n, e, first, n_e = pm1, pn1, e1, first1, n_e1
    return ()


@gluon.jit
def fp8_w13_ws_kernel(
    x_ptr, w_desc, xs_ptr, ws_ptr, b1_ptr, inter_ptr, is_ptr, out_ptr, counts_ptr, row_start_ptr, sorted_ptr,
    blk_ptr, H, I, N1, E_local, K, num_pid_m, limit,
    stride_xt, stride_xst, stride_wse, stride_wsn, ws_shard, stride_be, stride_ir, stride_isr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
    HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr, NC: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Persistent grid (P,), P <= num_pid_m · cdiv(I, BN) (one program per SM). Arguments as
    :func:`.fp8_w13.fp8_w13_kernel`, and ``blk``: [num_pid_m] int32, each row block's expert
    (``_triton.align.block_expert_kernel``); ``NC``: consumers (1 or 2), each with its own producer (BM / 32
    warps) and ring of ``STAGES`` slots. ``num_warps`` = BM / 16 (the default partition: consumer 0); BM 128 only
    with NC = 1; BN <= 64. ``BLOCK_E`` is unused."""
    scale_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per slot: [BM] fp32
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv)
    a_smem = gl.allocate_shared_memory(gl.float8e4nv, [NC * STAGES, BM, BK], a_sl)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [2 * NC * STAGES, BN, BK], w_desc.layout)
    sa_smem = gl.allocate_shared_memory(gl.float32, [NC * STAGES, BM], scale_l)
    sg_smem = gl.allocate_shared_memory(gl.float32, [NC * STAGES, BM], scale_l)
    su_smem = gl.allocate_shared_memory(gl.float32, [NC * STAGES, BM], scale_l)
    full = gl.allocate_shared_memory(gl.int64, [NC * STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NC * STAGES, 1], mbarrier.MBarrierLayout())
    PW: gl.constexpr = BM // 32  # producer warps
    for s in gl.static_range(NC * STAGES):
        # full: the producer's expect (1 arrival, then the TMA bytes) and each producer thread's copies (one
        # arrival per thread, made when its copies have landed)
        mbarrier.init(full.index(s), count=1 + 32 * PW)
        mbarrier.init(empty.index(s), count=1)
    C0: gl.constexpr = 0
    C1: gl.constexpr = 1
    WG: gl.constexpr = 4
    NBN = gl.cdiv(I, BN)
    # every argument written into the call: a tuple held in a variable loses its constexprs (w4_ws.py)
    if NC == 1:
        gl.warp_specialize([
            (_consume, (a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, b1_ptr, inter_ptr, is_ptr, out_ptr,
             blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN, limit, stride_be, stride_ir,
             stride_isr, C0, NC, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0, num_warps)),
            (_produce, (x_ptr, w_desc, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, xs_ptr, ws_ptr,
             blk_ptr, counts_ptr, row_start_ptr, sorted_ptr, H, I, N1, E_local, K, num_pid_m, NBN, stride_xt,
             stride_xst, stride_wse, stride_wsn, ws_shard, C0, NC, BM, BN, BK, QBN, GROUP_M, STAGES, EVEN_K, PW)),
        ], [PW], [PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consume, (a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, b1_ptr, inter_ptr, is_ptr, out_ptr,
             blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN, limit, stride_be, stride_ir,
             stride_isr, C0, NC, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0, num_warps)),
            (_consume, (a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, b1_ptr, inter_ptr, is_ptr, out_ptr,
             blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN, limit, stride_be, stride_ir,
             stride_isr, C1, NC, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0, WG)),
            (_produce, (x_ptr, w_desc, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, xs_ptr, ws_ptr,
             blk_ptr, counts_ptr, row_start_ptr, sorted_ptr, H, I, N1, E_local, K, num_pid_m, NBN, stride_xt,
             stride_xst, stride_wse, stride_wsn, ws_shard, C0, NC, BM, BN, BK, QBN, GROUP_M, STAGES, EVEN_K, PW)),
            (_produce, (x_ptr, w_desc, a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty, xs_ptr, ws_ptr,
             blk_ptr, counts_ptr, row_start_ptr, sorted_ptr, H, I, N1, E_local, K, num_pid_m, NBN, stride_xt,
             stride_xst, stride_wse, stride_wsn, ws_shard, C1, NC, BM, BN, BK, QBN, GROUP_M, STAGES, EVEN_K, PW)),
        ], [4, PW, PW], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
