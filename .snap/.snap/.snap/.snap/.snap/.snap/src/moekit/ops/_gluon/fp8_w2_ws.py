"""fp8 block-scaled w2 GEMM, warp-specialised and persistent (Hopper wgmma, Gluon).

The math and the bits are :func:`.fp8_w2.fp8_w2_sum_kernel`'s. Per output tile (the BM sorted rows of one
expert block, BN columns) and K step ``k`` of BK = 128 (one scale block)::

    t_k  = x_q[rows, k·BK:(k+1)·BK] · Wq[e, cols, k·BK:(k+1)·BK]ᵀ          (fp8 wgmma, fp32, fresh)
    acc  = fma(t_k, s_x[row, k] · S[e, col // 128, k], acc)                   (fp32, CUDA cores, k in order)

then ``+ b2[e, col]`` and ``· w[tok, kk]`` (unless ON_INPUT), stored to ``part[slot]`` (fp32): the same wgmma
instructions per K step (fresh accumulator, ``max_num_imprecise_acc`` = BK), the same scale product and fma, the
same epilogue, so the SUM_PASS branch of :func:`moekit.ops._triton.grouped_gemm.w2_kernel` bit for bit.

The schedule is what differs. In :mod:`.fp8_w2` one warpgroup per CTA issues its own TMA loads, waits on its
scale loads and promotes in one serial chain (H200, DeepSeek-V3 T = 16384: ~40 % tensor-pipe activity, long
scoreboard the largest stall: docs/kernels.md round 12). Here the chain is cut into partitions that meet at
mbarriers, each consumer with its own producer and ring of ``STAGES`` slots:

- producer ``c`` (one warp) only loads: for each K step of consumer ``c``'s tiles it waits ``empty[s]``, copies
  the step's scales (``s_x`` of the tile's rows, and ``S`` once per row) into the slot with ``cp.async`` and
  makes ``full[s]`` wait for them, then ``expect``s both tiles' bytes and issues the TMA loads of the A tile
  [BM, BK] and the weight tile [BN, BK] onto ``full[s]``;
- consumer ``c`` (one warpgroup per 64 rows: BM 64, 4 warps; BM 128, only with NC = 1, the default partition's
  8 warps) waits ``full[s]``, reads the step's scales from the slot (shared memory: no global load in its K loop
  at all), runs step k's wgmma while it promotes step k - 1 (steps in pairs with two fixed accumulators, as in
  :mod:`.fp8_w2`, so ptxas does not serialise the wgmmas), frees slot ``s`` (``empty[s]``) once the wgmma that
  read it is waited for, and stores the tile. Its few global loads per tile (the next tile's expert and slot
  rows, the router weights) are issued at the tile's start, so they land during its K loop.

The scales come through the ring rather than as register prefetches in the consumer: ptxas gives all of a
partition's global loads one scoreboard and moves a weight scale (a warp-uniform value) into a uniform register
right after its load, so a consumer's prefetched loads were waited for one step after issue, or at once (SASS,
compiled for sm_90 on CPU). ``NC`` = 2 gives each consumer its own producer warp and ring: a warp waits on one
mbarrier at a time (Gluon has no try-wait to poll two rings), so one producer for two rings would run both
consumers at the pace of the slower and hold one consumer's loads while the other runs its epilogue; with a pair
per consumer the pipelines are independent, and one consumer's epilogue overlaps the other's K loop.

The programs are persistent: program ``p`` of ``P`` (one per SM) takes tiles ``p, p + P, ...`` in the grouped
order of :func:`.common.pid_to_tile`, consumer (and producer) ``c`` the program's tiles ``p + c·P, p + (c +
NC)·P, ...``. A tile's expert comes from the block -> expert table that ``_triton.align.block_expert_kernel``
writes after the align kernel (:func:`.common.block_tile`: one load, then the expert's first block and rows);
each partition looks the next tile up when a tile starts, so the loads land while it runs. Row blocks past the
last expert (expert ``E_local``) are skipped by both partitions of a pair alike (the same tile sequence, the same
table).

Registers (ptxas for sm_90, checked by ``tests/ops/test_gluon_fp8.py``): a consumer holds three [64, BN] fp32
accumulators per warpgroup (the running sum, the product being promoted, the wgmma in flight) and gets 232 per
thread (uses ~222), a producer warp 40 (uses ~30-36); no spills, no serialised wgmma.

Measured on the H200 (docs/kernels.md, round 14; µs of the w2 kernel, the one-warpgroup Gluon w2 of the shipped
fp8 table -> one / two consumers): the same bits (every case of the Gluon tests, the shipped fp8 tables alone vs
in batches), faster for gpt-oss-120b T = 4096 (530 -> 509 / 473, twice; shipped in that bucket with two
consumers) and Mixtral T = 1024 (355 -> 333 / 327, not shipped: 2 % of the step), slower at DeepSeek-V3 (T = 16384
6390 -> 7916 / 7389, T = 4096 1762 -> 2297 / 2027) and Qwen3 (T = 16384 767 -> 846 / 838). The one per-tile cost
this schedule did not hide was the expert lookup (a scan over the experts in 32-wide chunks, which the producer
ran before a tile's first loads: 8 chunks for 256 experts); DeepSeek-V3's loss at T = 16384, ~1.8 µs per tile
over 869 tiles per program, fits it (not measured apart). Since round 15 the block -> expert table replaces that
scan (the same tiles, experts and bits; not yet measured on the GPU).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .common import block_tile, ring_barriers, tile_rows, tile_walk, w2_part_store
from .compat import cp_async_load, cta_barrier, tma_load

#: registers per thread of a producer warp (its warpgroup is padded with idle warps that get as many)
PRODUCER_REGS = gl.constexpr(40)
#: registers per thread of the second consumer (NC = 2); the default partition gets what is left (also 232)
CONSUMER_REGS = gl.constexpr(232)


@gluon.jit
def _produce(ring, args, C_ID: gl.constexpr, NC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
             BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, NW: gl.constexpr):
    """Producer ``C_ID``: every load of consumer ``C_ID``'s K steps, into its ring slot by slot. The next tile's
    expert is looked up when a tile starts (its loads land while this tile's steps are issued). ``ring``, ``args``:
    the kernel's shared-memory ring and the producers' arguments (:func:`fp8_w2_ws_sum_kernel`)."""
    a_smem, w_smem, sa_smem, sw_smem, full, empty = ring
    (a_desc, w_desc, as_ptr, ws_ptr, blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN, stride_asr,
     stride_wse, stride_wsn) = args
    RING: gl.constexpr = C_ID * STAGES
    ROW_L: gl.constexpr = gl.BlockedLayout([BM // (32 * NW)], [32], [NW], [0])
    nbytes: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
    nk = gl.cdiv(I, BK)
    num_tiles = num_pid_m * NBN
    t_first, stride = tile_walk(C_ID, NC)
    pid_m, pid_n, e, first, n_e = block_tile(t_first, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, NBN,
                                             E_local, GROUP_M, BM)
    g = 0  # this ring's steps so far (the consumer counts alike)
    for t in range(t_first, num_tiles, stride):
        pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m,
                                                NBN, E_local, GROUP_M, BM)
        if e < E_local:
            rows, valid = tile_rows(pid_m, first, n_e, BM, ROW_L)
            as_rows = as_ptr + rows.to(gl.int64) * stride_asr
            # S[e, n-block, k] for every row (the consumer multiplies row by row, as step_scale does)
            ws_rows = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn + rows * 0
            row_w = e * H + pid_n * BN
            for k in range(nk):
                s = RING + g % STAGES
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # the wgmma that read it is done
                bar = full.index(s)
                cp_async_load(sa_smem.index(s), as_rows + k, mask=valid)
                cp_async_load(sw_smem.index(s), ws_rows + k)
                async_copy.mbarrier_arrive(bar, increment_count=False)  # one of full[s]'s arrivals, once landed
                mbarrier.expect(bar, nbytes)
                tma_load(a_desc, [pid_m * BM, k * BK], bar, a_smem.index(s))
                tma_load(w_desc, [row_w, k * BK], bar, w_smem.index(s))
                g += 1
        pid_m, pid_n, e, first, n_e = pm1, pn1, e1, first1, n_e1


@gluon.jit
def _mma(a_smem, w_smem, sa_smem, sw_smem, full, g, zero, RING: gl.constexpr, STAGES: gl.constexpr,
         BK: gl.constexpr, ROW_L: gl.constexpr, SWAP: gl.constexpr = False):
    """Wait for ring step ``g``'s tiles and scales, start its wgmma (fresh accumulator): (token, s_x rows, S).
    ``SWAP``: the weight rows on the wgmma's M side (:mod:`.fp8_w2_dec_ws`: accumulator [BN, BM], ``ROW_L`` along
    its columns)."""
    s = RING + g % STAGES
    mbarrier.wait(full.index(s), (g // STAGES) & 1)
    sa = sa_smem.index(s).load(ROW_L)
    sw = sw_smem.index(s).load(ROW_L)
    if SWAP:
        t = warpgroup_mma(w_smem.index(s), a_smem.index(s).permute((1, 0)), zero, use_acc=False,
                          max_num_imprecise_acc=BK, is_async=True)
    else:
        t = warpgroup_mma(a_smem.index(s), w_smem.index(s).permute((1, 0)), zero, use_acc=False,
                          max_num_imprecise_acc=BK, is_async=True)
    return t, sa, sw


@gluon.jit
def _promote(c, sa, sw, acc, SWAP: gl.constexpr):
    """``acc + c · (s_x · S)``, the scale per accumulator row (per column with ``SWAP``)."""
    if SWAP:
        acc = gl.fma(c, (sa * sw)[None, :], acc)
    else:
        acc = gl.fma(c, (sa * sw)[:, None], acc)
    return acc


@gluon.jit
def _release(empty, g, RING: gl.constexpr, STAGES: gl.constexpr):
    """Ring step ``g``'s wgmma was waited for by every warp of the consumer: its slot may be refilled."""
    cta_barrier()
    mbarrier.arrive(empty.index(RING + g % STAGES), count=1)


@gluon.jit
def _turn(t, sa, sw, acc, j, a_smem, w_smem, sa_smem, sw_smem, full, empty, zero, RING: gl.constexpr,
          STAGES: gl.constexpr, BK: gl.constexpr, ROW_L: gl.constexpr, SWAP: gl.constexpr = False):
    """Wait for ring step ``j``'s wgmma (token ``t``), start step j + 1's, free step j's slot and promote step j
    (``sa · sw``, read from the slot before) while j + 1 runs: (step j + 1's token and scales, acc)."""
    # acc passes through the wait: the promotion before stays before it (LLVM would sink it past the next
    # wgmma, keeping two finished products live: more registers than a consumer has)
    c, acc = warpgroup_mma_wait(num_outstanding=0, deps=(t, acc))
    t_next, sa_next, sw_next = _mma(a_smem, w_smem, sa_smem, sw_smem, full, j + 1, zero, RING, STAGES, BK, ROW_L,
                                    SWAP)
    _release(empty, j, RING, STAGES)
    return t_next, sa_next, sw_next, _promote(c, sa, sw, acc, SWAP)


@gluon.jit
def _steps(t0, sa0, sw0, a_smem, w_smem, sa_smem, sw_smem, full, empty, g, nk, zero, RING: gl.constexpr,
           STAGES: gl.constexpr, BK: gl.constexpr, ROW_L: gl.constexpr, SWAP: gl.constexpr = False):
    """One tile's K loop from ring step ``g`` (its first wgmma already started: token ``t0``, scales ``sa0``,
    ``sw0``). Steps go in pairs: the tokens alternate between two names (t0 in flight across the back edge), so
    no in-flight accumulator is carried into a register that must move."""
    acc = gl.zeros_like(zero)
    for k in range(1, nk - 1, 2):
        t1, sa1, sw1, acc = _turn(t0, sa0, sw0, acc, g + k - 1, a_smem, w_smem, sa_smem, sw_smem, full, empty, zero,
                                  RING, STAGES, BK, ROW_L, SWAP)
        t0, sa0, sw0, acc = _turn(t1, sa1, sw1, acc, g + k, a_smem, w_smem, sa_smem, sw_smem, full, empty, zero,
                                  RING, STAGES, BK, ROW_L, SWAP)
    if nk % 2 == 0:  # two steps left (nk - 2 in flight), else one
        t1, sa1, sw1, acc = _turn(t0, sa0, sw0, acc, g + nk - 2, a_smem, w_smem, sa_smem, sw_smem, full, empty,
                                  zero, RING, STAGES, BK, ROW_L, SWAP)
        last, acc = warpgroup_mma_wait(num_outstanding=0, deps=(t1, acc))
        _release(empty, g + nk - 1, RING, STAGES)
        acc = _promote(last, sa1, sw1, acc, SWAP)
    else:
        last, acc = warpgroup_mma_wait(num_outstanding=0, deps=(t0, acc))
        _release(empty, g + nk - 1, RING, STAGES)
        acc = _promote(last, sa0, sw0, acc, SWAP)
    return acc


@gluon.jit
def _next(t, num_tiles, blk_ptr, counts_ptr, row_start_ptr, sorted_ptr, num_pid_m, NBN, E_local,
          GROUP_M: gl.constexpr, BM: gl.constexpr, ROW_L: gl.constexpr):
    """A consumer's next tile ``t``: :func:`.common.block_tile`'s numbers and the slot of each of its rows (loaded
    now, used when it starts)."""
    pid_m, pid_n, e, first, n_e = block_tile(t, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, NBN, E_local,
                                             GROUP_M, BM)
    rows, valid = tile_rows(pid_m, first, n_e, BM, ROW_L)
    return pid_m, pid_n, e, first, n_e, gl.load(sorted_ptr + rows, mask=valid, other=0)


@gluon.jit
def _consume(ring, args, C_ID: gl.constexpr, NC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
             BK: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
             ON_INPUT: gl.constexpr, NW: gl.constexpr):
    """Consumer ``C_ID``: the wgmmas, promotions and epilogues of its tiles (``NW`` warps). A tile's global loads
    are issued at its start and land during its K loop (which loads nothing): the router weights of its rows
    (their slots were loaded at the tile before's start), the next tile's expert (looked up while step 0's wgmma
    runs) and slot rows; only the bias (HAS_BIAS) is loaded by the epilogue. ``ring``, ``args``: the kernel's
    shared-memory ring and the consumers' arguments."""
    a_smem, w_smem, sa_smem, sw_smem, full, empty = ring
    (b2_ptr, tw_ptr, blk_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr, H, I, E_local, K, num_pid_m, NBN,
     stride_be, stride_twt, stride_pr) = args
    RING: gl.constexpr = C_ID * STAGES
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 32])
    row_l: gl.constexpr = gl.SliceLayout(1, mma_l)
    col_l: gl.constexpr = gl.SliceLayout(0, mma_l)
    nk = gl.cdiv(I, BK)
    num_tiles = num_pid_m * NBN
    t_first, stride = tile_walk(C_ID, NC)
    zero = gl.zeros([BM, BN], gl.float32, layout=mma_l)

    pid_m, pid_n, e, first, n_e, slot = _next(t_first, num_tiles, blk_ptr, counts_ptr, row_start_ptr, sorted_ptr,
                                              num_pid_m, NBN, E_local, GROUP_M, BM, row_l)
    g = 0  # this ring's steps so far (the producer counts alike)
    for t in range(t_first, num_tiles, stride):
        valid = tile_rows(pid_m, first, n_e, BM, row_l)[1]
        if not ON_INPUT:  # w[tok, kk] of the slot rows
            tok = slot // K
            wv = gl.load(tw_ptr + tok.to(gl.int64) * stride_twt + (slot - tok * K), mask=valid, other=0.0)
        else:  # the weight went onto the input: nothing to read (the epilogue ignores wv)
            wv = slot
        live = e < E_local
        acc = zero
        if live:
            t0, sa0, sw0 = _mma(a_smem, w_smem, sa_smem, sw_smem, full, g, zero, RING, STAGES, BK, row_l)
            pm1, pn1, e1, first1, n_e1, slot1 = _next(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr,
                                                      sorted_ptr, num_pid_m, NBN, E_local, GROUP_M, BM, row_l)
            acc = _steps(t0, sa0, sw0, a_smem, w_smem, sa_smem, sw_smem, full, empty, g, nk, zero, RING, STAGES, BK,
                         row_l)
            g += nk
        else:
            pm1, pn1, e1, first1, n_e1, slot1 = _next(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr,
                                                      sorted_ptr, num_pid_m, NBN, E_local, GROUP_M, BM, row_l)
        if live:
            w2_part_store(acc, e, pid_n, slot, valid, wv, b2_ptr, part_ptr, H, stride_be, stride_pr, BN, col_l,
                          HAS_BIAS, ON_INPUT)
        pid_m, pid_n, e, first, n_e, slot = pm1, pn1, e1, first1, n_e1, slot1
    return ()


@gluon.jit
def fp8_w2_ws_sum_kernel(
    a_desc, w_desc, as_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, blk_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_asr, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr,
    NC: gl.constexpr, num_warps: gl.constexpr,
):
    """Persistent grid (P,), P <= num_pid_m · NBN (one program per SM). Arguments as
    :func:`.fp8_w2.fp8_w2_sum_kernel` (a_desc: TMA over inter_q [rows, I] e4m3, block [BM, BK]; w_desc: over
    w2.view(E·H, I), block [BN, BK]; QBN % BN == 0), without ``NT``; ``NC``: consumers (1 or 2), each with its
    own producer warp and ring of ``STAGES`` slots; ``blk``: [num_pid_m] int32, each row block's expert
    (``_triton.align.block_expert_kernel``). ``num_warps`` = BM / 16 (the default partition: consumer 0); BM 128
    only with NC = 1. ``BLOCK_E`` is unused (the tiles look their expert up in ``blk``)."""
    scale_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per slot: [BM] fp32
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [NC * STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [NC * STAGES, BN, BK], w_desc.layout)
    sa_smem = gl.allocate_shared_memory(gl.float32, [NC * STAGES, BM], scale_l)
    sw_smem = gl.allocate_shared_memory(gl.float32, [NC * STAGES, BM], scale_l)
    # a slot is full after its producer's expect (1 arrival, then the TMA bytes) and each of its 32 lanes' scale
    # copies (one arrival per lane, made when the lane's copies have landed)
    full, empty = ring_barriers(NC * STAGES, 1 + 32, 1)
    C0: gl.constexpr = 0
    C1: gl.constexpr = 1
    ONE: gl.constexpr = 1
    WG: gl.constexpr = 4
    # the tensors travel in tuples; the constexprs are written into each call (a tuple held in a variable loses its
    # constexprs, w4_ws.py)
    ring = (a_smem, w_smem, sa_smem, sw_smem, full, empty)
    cargs = (b2_ptr, tw_ptr, blk_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr, H, I, E_local, K, num_pid_m,
             NBN, stride_be, stride_twt, stride_pr)
    pargs = (a_desc, w_desc, as_ptr, ws_ptr, blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN,
             stride_asr, stride_wse, stride_wsn)
    if NC == 1:
        gl.warp_specialize([
            (_consume, (ring, cargs, C0, NC, BM, BN, BK, GROUP_M, STAGES, HAS_BIAS, ON_INPUT, num_warps)),
            (_produce, (ring, pargs, C0, NC, BM, BN, BK, QBN, GROUP_M, STAGES, ONE)),
        ], [1], [PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consume, (ring, cargs, C0, NC, BM, BN, BK, GROUP_M, STAGES, HAS_BIAS, ON_INPUT, num_warps)),
            (_consume, (ring, cargs, C1, NC, BM, BN, BK, GROUP_M, STAGES, HAS_BIAS, ON_INPUT, WG)),
            (_produce, (ring, pargs, C0, NC, BM, BN, BK, QBN, GROUP_M, STAGES, ONE)),
            (_produce, (ring, pargs, C1, NC, BM, BN, BK, QBN, GROUP_M, STAGES, ONE)),
        ], [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
