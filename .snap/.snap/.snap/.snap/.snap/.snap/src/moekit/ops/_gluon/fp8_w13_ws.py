"""fp8 block-scaled w13 GEMM, warp-specialised and persistent (Hopper wgmma, Gluon).

The math and the bits are :func:`.fp8_w13.fp8_w13_kernel`'s. Per output tile (the BM sorted rows of one expert
block, BN gate columns and the same BN up columns) and K step ``k`` of BK = 128 (one scale block)::

    t_g = x_q[tok(rows), k·BK:(k+1)·BK] · Wq[e, n, k·BK:(k+1)·BK]ᵀ     (fp8 wgmma, fp32, fresh; t_u: rows I + n)
    acc_g = fma(t_g, s_x[tok, k] · S[e, n // 128, k], acc_g)          (acc_u likewise, its own scale block)

then ``+ b13``, the gated activation in fp32 and the store (rounded to the params dtype, or quantised for w2 per
row of a BN = group tile): the same wgmma instructions per K step (m64nBNk32 e4m3, fresh accumulator,
``max_num_imprecise_acc`` = BK), the same scale product, fma order and epilogue functions, so
:func:`moekit.ops._triton.grouped_gemm.w13_kernel` for fp8 block weights bit for bit.

The rows come by TMA: the input quantiser writes each token's fp8 row at the sorted rows of its slots
(:func:`moekit.ops._triton.quant.act_quant_sorted_kernel`, ``x_q [rows, H]``, the scales transposed ``[⌈H/BK⌉,
rows]``), so a row block is one [BM, BK] box (zero-filled past H; a block's padding rows are never written and
their products never stored).

The schedule is :mod:`.fp8_w2_ws`'s, the programs persistent (one per SM; program ``p`` of ``P`` takes tiles ``p,
p + P, ...`` in the grouped order of :func:`.common.pid_to_tile`; each tile's expert from the block -> expert
table, :func:`.common.block_tile`; row blocks past the last expert skipped). Three forms:

- ``NC`` = 1 or 2 consumers with BLOCK_M 64 (or one 8-warp consumer with BLOCK_M 128), each with its own one-warp
  producer and ring of ``STAGES`` slots; consumer ``c`` takes the program's tiles ``p + c·P, p + (c + NC)·P, ...``;
- ``NC`` = 2 with BLOCK_M 128 (:func:`moekit.ops.gluon_experts.fp8_w13_ws_coop`): both consumers on every tile of
  the program, rows [0, 64) and [64, 128), one ring and producer: a weight tile crosses L2 once per 128 rows (as
  for the 8-warp consumer) while the two warpgroups wait, issue and promote independently.

- a producer waits ``empty[s]`` (every consumer of the slot released it), copies the step's scales by
  ``cp.async`` (``s_x`` of the block's rows, contiguous in the transposed scales; ``S`` of the gate and the up
  block once per row) with ``full[s]`` waiting for every lane's copies (``cp.async.mbarrier.arrive``), then
  ``expect``s the row tile's and the two weight tiles' bytes and issues their TMA loads onto ``full[s]``;
- a consumer (one warpgroup per 64 rows) waits ``full[s]``, reads its rows' scales from the slot (its K loop loads
  nothing from global memory), runs step k's two wgmmas on its rows of the tile while it promotes step k - 1 (in
  pairs of steps, as in :mod:`.fp8_w2_ws`), frees slot ``s`` once its wgmmas are waited for, and runs the epilogue
  of :func:`.fp8_w13.fp8_w13_kernel` (:func:`.common.w13_store`) for its rows.

Registers (ptxas for sm_90, checked by ``tests/ops/test_gluon_fp8.py``): a consumer holds six [64, BN] fp32 tiles
per warpgroup (acc_g, acc_u, the two products being promoted, the two in flight), 192 registers per thread at BN 64
(so BN <= 64), and gets 232 (the default partition 224 beside a second consumer); :data:`PRODUCER_REGS` = 48 per
producer thread; no spills, no serialised wgmma. A consumer's K loop issues ~135 instructions per step, a producer's
~35-45 (round 15's producers gathered the rows by ``cp.async``: ~104 with two or four warps each).

Measured on the H200 (docs/kernels.md, rounds 15 and 16): the same bits as the Triton and one-warpgroup kernels,
but no faster where it matters. The w13 kernel alone, µs, one-warpgroup -> 2 consumers (BLOCK_M 64) / 2 consumers
on 128-row tiles (round 16, ``-r16-profile-ws13tma.log``, ``-r16-profile-coop.log``): DeepSeek-V3 T = 16384 11590
-> 14043 / 12665 (round 15's gathering producers: 13309), T = 4096 3153 -> 3638 / 3755; gpt-oss T = 16384 3478 ->
3408 / 3228; Mixtral T = 16384 (BLOCK_M 128) 10214 -> 10247 (coop); Qwen3 T = 16384 1175 -> 1109 / 1063. The step
also pays the sorted quantiser (DeepSeek-V3 T = 16384: 463 µs; it writes each token's row K = 8 times).
So the row gather was not the bound, and neither one tile per two warpgroups nor TMA-fed consumers make the
DeepSeek-V3 w13 faster. Nsight Compute on one 8192-token chunk (round 16):
- this kernel (cooperative) reads 19.2 GB from DRAM, the one-warpgroup kernel 11.3;
- the L2 hit rate is 39 % against 65 %;
- 40 % of its issue gap is the consumer's barrier before each slot release.
The sorted rows, one copy per slot, lose the L2 reuse a gathered token row has across the experts it picks. In
the H200 fp8 table only at gpt-oss T = 16384 (with the warp-specialised w2, BLOCK_M 128: -7.5 % step); the tuner
tries it elsewhere (``"gluon_ws"`` 0 / 2).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .common import block_tile, ring_barriers, tile_walk, w13_store
from .compat import cp_async_load, cta_barrier, tma_load

#: registers per thread of the producers' warpgroup (two 2-warp producers, or one of 2 or 4 warps, padded)
PRODUCER_REGS = gl.constexpr(48)
#: registers per thread of the second consumer (NC = 2); the default partition gets what Triton leaves it (224)
CONSUMER_REGS = gl.constexpr(232)


@gluon.jit
def _produce(ring, args, C_ID: gl.constexpr, NC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
             BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """Producer ``C_ID`` (one warp): every load of consumer ``C_ID``'s K steps, slot by slot. ``ring``, ``args``: the
    kernel's shared-memory ring and the producers' arguments (:func:`fp8_w13_ws_kernel`)."""
    a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty = ring
    (a_desc, w_desc, xs_ptr, ws_ptr, blk_ptr, counts_ptr, row_start_ptr, H, I, N1, E_local, num_pid_m, NBN,
     stride_xsk, stride_wse, stride_wsn, ws_shard) = args
    RING: gl.constexpr = C_ID * STAGES
    ROW_L: gl.constexpr = gl.BlockedLayout([BM // 32], [32], [1], [0])
    nbytes: gl.constexpr = a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
    nk = gl.cdiv(H, BK)
    num_tiles = num_pid_m * NBN
    t_first, stride = tile_walk(C_ID, NC)
    r = gl.arange(0, BM, layout=ROW_L)
    pid_m, pid_n, e, first, n_e = block_tile(t_first, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, NBN,
                                             E_local, GROUP_M, BM)
    g = 0  # this ring's steps so far (the consumer counts alike)
    for t in range(t_first, num_tiles, stride):
        pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m,
                                                NBN, E_local, GROUP_M, BM)
        if e < E_local:
            row0 = pid_m * BM
            xs_rows = xs_ptr + row0 + r  # s_x of the tile's sorted rows, step k at + k · stride_xsk
            # S[e, n-block, k] of the gate and the up columns for every row (the consumer multiplies row by row)
            ws_g = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn + r * 0
            ws_u = ws_g + ws_shard * stride_wsn
            row_g = e * N1 + pid_n * BN
            for k in range(nk):
                s = RING + g % STAGES
                mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)  # the wgmmas that read it are done
                bar = full.index(s)
                cp_async_load(sa_smem.index(s), xs_rows + k * stride_xsk)
                cp_async_load(sg_smem.index(s), ws_g + k)
                cp_async_load(su_smem.index(s), ws_u + k)
                async_copy.mbarrier_arrive(bar, increment_count=False)  # one of full[s]'s arrivals, once landed
                mbarrier.expect(bar, nbytes)
                tma_load(a_desc, [row0, k * BK], bar, a_smem.index(s))
                tma_load(w_desc, [row_g, k * BK], bar, w_smem.index(2 * s))
                tma_load(w_desc, [row_g + I, k * BK], bar, w_smem.index(2 * s + 1))
                g += 1
        pid_m, pid_n, e, first, n_e = pm1, pn1, e1, first1, n_e1


@gluon.jit
def _mma2(ring, g, zero, RING: gl.constexpr, STAGES: gl.constexpr, BK: gl.constexpr, ROW_L: gl.constexpr,
          ROW0: gl.constexpr, BMC: gl.constexpr, SWAP: gl.constexpr = False):
    """Wait for ring step ``g``'s rows, tiles and scales, start its gate and up wgmmas (fresh accumulators) on the
    consumer's rows [ROW0, ROW0 + BMC) of the slot: (the two tokens, the rows' gate and up scales ``s_x · S``).
    ``SWAP``: the weight rows on the wgmma's M side (:mod:`.fp8_w13_dec`: accumulators [BN, BM], ``ROW_L`` along
    their columns)."""
    a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty = ring
    s = RING + g % STAGES
    mbarrier.wait(full.index(s), (g // STAGES) & 1)  # rows and weight tiles by TMA, the scales by cp.async
    sa = sa_smem.index(s).slice(ROW0, BMC).load(ROW_L)
    sg = sg_smem.index(s).slice(ROW0, BMC).load(ROW_L)
    su = su_smem.index(s).slice(ROW0, BMC).load(ROW_L)
    a = a_smem.index(s).slice(ROW0, BMC)
    if SWAP:
        tg = warpgroup_mma(w_smem.index(2 * s), a.permute((1, 0)), zero, use_acc=False, max_num_imprecise_acc=BK,
                           is_async=True)
        tu = warpgroup_mma(w_smem.index(2 * s + 1), a.permute((1, 0)), zero, use_acc=False,
                           max_num_imprecise_acc=BK, is_async=True)
    else:
        tg = warpgroup_mma(a, w_smem.index(2 * s).permute((1, 0)), zero, use_acc=False, max_num_imprecise_acc=BK,
                           is_async=True)
        tu = warpgroup_mma(a, w_smem.index(2 * s + 1).permute((1, 0)), zero, use_acc=False,
                           max_num_imprecise_acc=BK, is_async=True)
    return tg, tu, sa * sg, sa * su


@gluon.jit
def _promote2(cg, cu, pg, pu, acc_g, acc_u, SWAP: gl.constexpr):
    """``acc + c · p`` for the gate and the up product, the scale per accumulator row (per column with ``SWAP``)."""
    if SWAP:
        return gl.fma(cg, pg[None, :], acc_g), gl.fma(cu, pu[None, :], acc_u)
    else:
        return gl.fma(cg, pg[:, None], acc_g), gl.fma(cu, pu[:, None], acc_u)


@gluon.jit
def _release(ring, g, RING: gl.constexpr, STAGES: gl.constexpr):
    """Ring step ``g``'s wgmmas were waited for by every warp of the consumer: its slot may be refilled."""
    empty = ring[6]  # (a, w, s_x, S gate, S up, full, empty)
    cta_barrier()
    mbarrier.arrive(empty.index(RING + g % STAGES), count=1)


@gluon.jit
def _turn(tg, tu, pg, pu, acc_g, acc_u, j, ring, zero, RING: gl.constexpr, STAGES: gl.constexpr, BK: gl.constexpr,
          ROW_L: gl.constexpr, ROW0: gl.constexpr, BMC: gl.constexpr, SWAP: gl.constexpr = False):
    """Wait for ring step ``j``'s wgmmas, start step j + 1's, free step j's slot and promote step j (scales
    ``pg``, ``pu``) while j + 1 runs: (step j + 1's tokens and scales, acc_g, acc_u)."""
    # the accumulators pass through the wait: the promotion before stays before it (as in fp8_w2_ws)
    cg, cu, acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(tg, tu, acc_g, acc_u))
    tg1, tu1, pg1, pu1 = _mma2(ring, j + 1, zero, RING, STAGES, BK, ROW_L, ROW0, BMC, SWAP)
    _release(ring, j, RING, STAGES)
    acc_g, acc_u = _promote2(cg, cu, pg, pu, acc_g, acc_u, SWAP)
    return tg1, tu1, pg1, pu1, acc_g, acc_u


@gluon.jit
def _last(tg, tu, pg, pu, acc_g, acc_u, j, ring, RING: gl.constexpr, STAGES: gl.constexpr,
          SWAP: gl.constexpr = False):
    """The tile's last step ``j``: wait for its wgmmas, free its slot, promote it."""
    cg, cu, acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(tg, tu, acc_g, acc_u))
    _release(ring, j, RING, STAGES)
    return _promote2(cg, cu, pg, pu, acc_g, acc_u, SWAP)


@gluon.jit
def _steps(tg, tu, pg, pu, ring, g, nk, zero, RING: gl.constexpr, STAGES: gl.constexpr, BK: gl.constexpr,
           ROW_L: gl.constexpr, ROW0: gl.constexpr, BMC: gl.constexpr, SWAP: gl.constexpr = False):
    """One tile's K loop from ring step ``g`` (its first wgmmas already started), steps in pairs (the in-flight
    tokens alternate between two names, so none is carried into a register that must move): (acc_g, acc_u)."""
    acc_g = gl.zeros_like(zero)
    acc_u = gl.zeros_like(zero)
    for k in range(1, nk - 1, 2):
        tg1, tu1, pg1, pu1, acc_g, acc_u = _turn(tg, tu, pg, pu, acc_g, acc_u, g + k - 1, ring, zero, RING, STAGES,
                                                 BK, ROW_L, ROW0, BMC, SWAP)
        tg, tu, pg, pu, acc_g, acc_u = _turn(tg1, tu1, pg1, pu1, acc_g, acc_u, g + k, ring, zero, RING, STAGES, BK,
                                             ROW_L, ROW0, BMC, SWAP)
    if nk % 2 == 0:  # two steps left (nk - 2 in flight), else one
        tg1, tu1, pg1, pu1, acc_g, acc_u = _turn(tg, tu, pg, pu, acc_g, acc_u, g + nk - 2, ring, zero, RING, STAGES,
                                                 BK, ROW_L, ROW0, BMC, SWAP)
        acc_g, acc_u = _last(tg1, tu1, pg1, pu1, acc_g, acc_u, g + nk - 1, ring, RING, STAGES, SWAP)
    else:
        acc_g, acc_u = _last(tg, tu, pg, pu, acc_g, acc_u, g + nk - 1, ring, RING, STAGES, SWAP)
    return acc_g, acc_u


@gluon.jit
def _consume(ring, args, C_ID: gl.constexpr, NC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
             BK: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr,
             HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr,
             NW: gl.constexpr, ROW0: gl.constexpr, BMC: gl.constexpr):
    """Consumer ``C_ID`` (``NW`` warps): the wgmmas, promotions and epilogues of its tiles' rows [ROW0, ROW0 + BMC)
    (all BM of them, or one half of a tile shared with a second consumer). The next tile's expert is looked up
    while a tile's first wgmmas run (its loads land during the K loop, which loads nothing); the epilogue loads the
    bias (HAS_BIAS). ``ring``, ``args``: the kernel's shared-memory ring and the consumers' arguments."""
    (b1_ptr, inter_ptr, is_ptr, out_ptr, blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN, limit,
     stride_be, stride_ir, stride_isr) = args
    RING: gl.constexpr = C_ID * STAGES
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 32])
    row_l: gl.constexpr = gl.SliceLayout(1, mma_l)
    nk = gl.cdiv(H, BK)
    num_tiles = num_pid_m * NBN
    t_first, stride = tile_walk(C_ID, NC)
    zero = gl.zeros([BMC, BN], gl.float32, layout=mma_l)
    r = ROW0 + gl.arange(0, BMC, layout=row_l)
    pid_m, pid_n, e, first, n_e = block_tile(t_first, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, NBN,
                                             E_local, GROUP_M, BM)
    g = 0  # this ring's steps so far (the producer counts alike)
    for t in range(t_first, num_tiles, stride):
        live = e < E_local
        acc_g = zero
        acc_u = zero
        if live:
            tg, tu, pg, pu = _mma2(ring, g, zero, RING, STAGES, BK, row_l, ROW0, BMC)
            pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr,
                                                    num_pid_m, NBN, E_local, GROUP_M, BM)
            acc_g, acc_u = _steps(tg, tu, pg, pu, ring, g, nk, zero, RING, STAGES, BK, row_l, ROW0, BMC)
            g += nk
        else:
            pm1, pn1, e1, first1, n_e1 = block_tile(t + stride, num_tiles, blk_ptr, counts_ptr, row_start_ptr,
                                                    num_pid_m, NBN, E_local, GROUP_M, BM)
        if live:
            rows, valid = pid_m * BM + r, (pid_m - first) * BM + r < n_e
            w13_store(acc_g, acc_u, e, rows, valid, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, I, limit, stride_be,
                      stride_ir, stride_isr, BN, gl.SliceLayout(0, mma_l), ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0)
        pid_m, pid_n, e, first, n_e = pm1, pn1, e1, first1, n_e1
    return ()


@gluon.jit
def fp8_w13_ws_kernel(
    a_desc, w_desc, xs_ptr, ws_ptr, b1_ptr, inter_ptr, is_ptr, out_ptr, counts_ptr, row_start_ptr, blk_ptr,
    H, I, N1, E_local, num_pid_m, limit,
    stride_xsk, stride_wse, stride_wsn, ws_shard, stride_be, stride_ir, stride_isr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    STAGES: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, REQ: gl.constexpr,
    UE8M0: gl.constexpr, NC: gl.constexpr, num_warps: gl.constexpr,
):
    """Persistent grid (P,), P <= num_pid_m · cdiv(I, BN) (one program per SM). ``a_desc``: TMA over the
    activations quantised into the sorted rows (``x_q`` of row r's token at row r: [num_pid_m · BM, H] e4m3,
    block [BM, BK]; padding rows never stored to), ``xs``: their scales transposed, ``xs[k, r]`` (k-stride
    ``stride_xsk``); ``blk``: [num_pid_m] int32, each row block's expert (``_triton.align.block_expert_kernel``);
    the rest as :func:`.fp8_w13.fp8_w13_kernel`. ``NC``: consumers (1 or 2), each with its own one-warp producer
    and ring of ``STAGES`` slots. ``num_warps`` = BM / 16 (the default partition: consumer 0); BM 128 only with
    NC = 1; BN <= 64."""
    scale_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per slot: [BM] fp32
    COOP: gl.constexpr = NC == 2 and BM == 128  # two consumers share each tile (64 rows each) and one ring
    NR: gl.constexpr = 1 if COOP else NC  # rings (and producers)
    a_smem = gl.allocate_shared_memory(gl.float8e4nv, [NR * STAGES, BM, BK], a_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [2 * NR * STAGES, BN, BK], w_desc.layout)
    sa_smem = gl.allocate_shared_memory(gl.float32, [NR * STAGES, BM], scale_l)
    sg_smem = gl.allocate_shared_memory(gl.float32, [NR * STAGES, BM], scale_l)
    su_smem = gl.allocate_shared_memory(gl.float32, [NR * STAGES, BM], scale_l)
    # full: the producer's expect (1 arrival, then the TMA bytes) and each producer thread's scale copies (one
    # arrival per thread, made when its copies have landed); empty: each consumer reading the slot
    full, empty = ring_barriers(NR * STAGES, 1 + 32, NC // NR)
    C0: gl.constexpr = 0
    C1: gl.constexpr = 1
    WG: gl.constexpr = 4
    HALF: gl.constexpr = BM // 2
    PW: gl.constexpr = 1  # producer warps
    NBN = gl.cdiv(I, BN)
    # the tensors travel in tuples; the constexprs are written into each call (a tuple held in a variable loses its
    # constexprs, w4_ws.py)
    ring = (a_smem, w_smem, sa_smem, sg_smem, su_smem, full, empty)
    cargs = (b1_ptr, inter_ptr, is_ptr, out_ptr, blk_ptr, counts_ptr, row_start_ptr, H, I, E_local, num_pid_m, NBN,
             limit, stride_be, stride_ir, stride_isr)
    pargs = (a_desc, w_desc, xs_ptr, ws_ptr, blk_ptr, counts_ptr, row_start_ptr, H, I, N1, E_local, num_pid_m, NBN,
             stride_xsk, stride_wse, stride_wsn, ws_shard)
    if COOP:  # one tile walk (NC 1 in the walk), consumer c the rows [64c, 64c + 64) of each tile
        gl.warp_specialize([
            (_consume, (ring, cargs, C0, NR, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0,
                        num_warps, C0, HALF)),
            (_consume, (ring, cargs, C0, NR, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0, WG,
                        HALF, HALF)),
            (_produce, (ring, pargs, C0, NR, BM, BN, BK, QBN, GROUP_M, STAGES)),
        ], [4, PW], [CONSUMER_REGS, PRODUCER_REGS])
    elif NC == 1:
        gl.warp_specialize([
            (_consume, (ring, cargs, C0, NC, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0,
                        num_warps, C0, BM)),
            (_produce, (ring, pargs, C0, NC, BM, BN, BK, QBN, GROUP_M, STAGES)),
        ], [PW], [PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consume, (ring, cargs, C0, NC, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0,
                        num_warps, C0, BM)),
            (_consume, (ring, cargs, C1, NC, BM, BN, BK, GROUP_M, STAGES, ACT, HAS_BIAS, HAS_LIMIT, REQ, UE8M0, WG,
                        C0, BM)),
            (_produce, (ring, pargs, C0, NC, BM, BN, BK, QBN, GROUP_M, STAGES)),
            (_produce, (ring, pargs, C1, NC, BM, BN, BK, QBN, GROUP_M, STAGES)),
        ], [4, PW, PW], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])
