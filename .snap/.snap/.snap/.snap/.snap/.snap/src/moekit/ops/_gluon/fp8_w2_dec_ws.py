"""fp8 block-scaled decode w2 with its loads in their own warp (Gluon, warp-specialised): :mod:`.fp8_w2_dec`'s bits.

Program (row block b, column tile n), K step k of BK = 128 (one scale block)::

    t_k[c, m] = Wq[e, c, k·BK:(k+1)·BK] · x_q[row m, k·BK:(k+1)·BK]        (wgmma, M = BN weight rows, N = BM)
    acc[c, m] = fma(t_k, S[e, c // QBN, k] · s_x[row m, k], acc)           (fp32, k in order)
    part[slot m, c] = (acc (+ b2[e, c])) (· w[slot m]), then the slot-order top-k sum of complete tokens

the same wgmma instructions, products, fma, epilogue and sum as :func:`.fp8_w2_dec.fp8_w2_dec_kernel` (so the
Triton decode w2's bits). What differs is who issues what. In the one-warpgroup kernel every warp runs one chain per
K step: wait for the step's tiles, start its wgmma, refill the slot of the step before (an ``mbarrier.expect`` and
two TMA copies, which Gluon lowers with three CTA barriers and a proxy fence), load the next step's scales, promote.
With one program per SM (Mixtral's 128 programs of 112 steps at T = 1) nothing hides that chain: ~125 instructions
per step at ~4.5 cycles each (round 28's Nsight reading: one warp issues every 4.5 cycles).

Here a producer warp does every load: per step it waits ``empty[s]``, copies the step's scales (``s_x`` of the
block's BM rows and ``S``, replicated per row) into the slot with ``cp.async`` (one ``full[s]`` arrival per lane once
landed), ``expect``s both tiles' bytes and issues their TMA loads onto ``full[s]``. The consumer warpgroup waits
``full[s]``, reads the scales from the slot, runs step k's wgmma while promoting step k - 1 (:mod:`.fp8_w2_ws`'s K
loop with ``SWAP``: steps in pairs, two fixed accumulators) and frees the slot once that wgmma was waited for: its K loop has no global
load and no TMA issue. ``PDL``: the producer requests its first ``STAGES`` weight tiles before the grid wait, the
activations and scales after it; the consumer waits for the grid before its first step (the semaphores and ``part``
it touches are the kernels' before it). Registers: ``.maxnreg`` 128 over the 8 warps (the producer's warpgroup is
padded with idle warps), ``setmaxnreg`` 232 for the consumer, 40 for the producer: two programs per SM, so this form
pays where one program per SM ran a long K loop (H200, round 31: Mixtral's T = 1 w2 37 -> 34 µs) and is slower where
seven shared an SM (DeepSeek-V3's 896 programs at T = 1: 35 -> 50 µs).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .common import grid_wait, pid_to_tile, ring_barriers
from .compat import cp_async_load, tma_load
from .fp8_w2_dec import _combine, block_layout, part_store
from .fp8_w2_ws import _mma, _steps

#: registers per thread of the producer warp (its warpgroup is padded with idle warps that get as many)
PRODUCER_REGS = gl.constexpr(40)


@gluon.jit
def _produce(ring, a_desc, w_desc, as_ptr, ws_ptr, e, pid_m, pid_n, H, I, stride_asr, stride_wse, stride_wsn,
             BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, STAGES: gl.constexpr,
             PDL: gl.constexpr):
    """Every load of the program's K steps, slot by slot (one warp)."""
    a_smem, w_smem, sa_smem, sw_smem, full, empty = ring
    ROW_L: gl.constexpr = gl.BlockedLayout([(BM + 31) // 32], [32], [1], [0])
    nbytes: gl.constexpr = a_desc.block_type.nbytes + w_desc.block_type.nbytes
    r = gl.arange(0, BM, layout=ROW_L)
    as_rows = as_ptr + (pid_m * BM + r).to(gl.int64) * stride_asr
    # S[e, n-block, k] once per row (the consumer multiplies column by column, as fp8_w2_dec's _scale does)
    ws_rows = ws_ptr + e.to(gl.int64) * stride_wse + ((pid_n * BN) // QBN) * stride_wsn + r * 0
    row_a = pid_m * BM
    row_w = e * H + pid_n * BN
    nk = gl.cdiv(I, BK)
    if PDL:  # the weight tiles of the first STAGES steps do not depend on the kernels before this one
        for s0 in gl.static_range(STAGES):
            if s0 < nk:
                mbarrier.expect(full.index(s0), nbytes)
                tma_load(w_desc, [row_w, s0 * BK], full.index(s0), w_smem.index(s0))
        grid_wait()
    for k in range(nk):
        s = k % STAGES
        mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)  # the wgmma that read it is done
        bar = full.index(s)
        cp_async_load(sa_smem.index(s), as_rows + k)
        cp_async_load(sw_smem.index(s), ws_rows + k)
        async_copy.mbarrier_arrive(bar, increment_count=False)  # one of full[s]'s arrivals per lane, once landed
        if PDL and k < STAGES:  # its bytes expected and its weight tile requested before the grid wait
            tma_load(a_desc, [row_a, k * BK], bar, a_smem.index(s))
        else:
            mbarrier.expect(bar, nbytes)
            tma_load(a_desc, [row_a, k * BK], bar, a_smem.index(s))
            tma_load(w_desc, [row_w, k * BK], bar, w_smem.index(s))


@gluon.jit
def _consume(ring, e, valid2, slot2, loc_j, pid_n, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, part_ptr, sem_ptr,
             live_ptr, H, I, E_local, E_global, K, S, NBN, stride_be, stride_ot, stride_twt, stride_it, stride_pr,
             BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, SP: gl.constexpr, STAGES: gl.constexpr,
             HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr, HAS_MAP: gl.constexpr, SKIP_ZERO: gl.constexpr,
             INLINE: gl.constexpr, PDL: gl.constexpr, L2: gl.constexpr, NW: gl.constexpr):
    """The wgmmas, promotions, epilogue and top-k sum of the program's tile (the default partition's warps)."""
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BM, 32])
    col_l: gl.constexpr = gl.SliceLayout(1, mma_l)  # along the weight rows (output columns)
    tok_l: gl.constexpr = gl.SliceLayout(0, mma_l)  # along the block's slot rows
    if PDL:  # the semaphores, part and out are the kernels' before this one (the ring's loads wait in the producer)
        grid_wait()
    valid = gl.convert_layout(valid2, tok_l)
    slot = gl.convert_layout(slot2, tok_l)
    zero = gl.zeros([BN, BM], gl.float32, layout=mma_l)
    a_smem, w_smem, sa_smem, sw_smem, full, empty = ring
    # fp8_w2_ws's K loop in the swapped orientation (ring 0): the scales along the accumulator's columns
    t0, sa0, sw0 = _mma(a_smem, w_smem, sa_smem, sw_smem, full, 0, zero, 0, STAGES, BK, tok_l, True)
    acc = _steps(t0, sa0, sw0, a_smem, w_smem, sa_smem, sw_smem, full, empty, 0, gl.cdiv(I, BK), zero, 0, STAGES, BK,
                 tok_l, True)
    part_store(acc, e, slot, valid, pid_n, b2_ptr, tw_ptr, part_ptr, H, K, stride_be, stride_twt, stride_pr, BN, col_l,
               HAS_BIAS, ON_INPUT)  # then the slot-order sum
    _combine(part_ptr, sem_ptr, live_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, loc_j, slot2, valid2, pid_n, H, K, NBN,
             S, E_local, E_global, stride_it, stride_twt, stride_pr, stride_ot, BM, BN, SP, HAS_MAP, SKIP_ZERO,
             INLINE, L2, NW)


@gluon.jit
def fp8_w2_dec_ws_kernel(
    a_desc, w_desc, as_ptr, ws_ptr, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, part_ptr, sem_ptr,
    counts_ptr, row_start_ptr, sorted_ptr, live_ptr,
    H, I, E_local, E_global, K, S, num_pid_m, NBN,
    stride_asr, stride_wse, stride_wsn, stride_be, stride_ot, stride_twt, stride_it, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, QBN: gl.constexpr, GROUP_M: gl.constexpr,
    SP: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr,
    HAS_MAP: gl.constexpr, SKIP_ZERO: gl.constexpr, PDL: gl.constexpr = False,
    INLINE: gl.constexpr = True, BLOCK_E: gl.constexpr = 1, num_warps: gl.constexpr = 4,
):
    """Grid (num_pid_m · NBN,): one column tile per program. Arguments as :func:`.fp8_w2_dec.fp8_w2_dec_kernel`
    (without ``NT``); ``num_warps`` = 4 (the consumer warpgroup), plus one producer warp. ``as`` holds the
    plan's padded rows (every row of a block is read; a row without a slot gives a column that is never stored)."""
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, NBN, GROUP_M)
    L2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
    e, valid2, slot2, loc_j = block_layout(ids_ptr, tw_ptr, map_ptr, counts_ptr, row_start_ptr, sorted_ptr, pid_m, S, K,
                                           E_local, E_global, stride_it, stride_twt, BM, SP, HAS_MAP, SKIP_ZERO, INLINE,
                                           BLOCK_E, L2, num_warps)
    if e < E_local:
        scale_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # per slot: [BM] fp32
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        sa_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], scale_l)
        sw_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], scale_l)
        # a slot is full after the producer's expect (1 arrival, then the TMA bytes) and each of its 32 lanes'
        # scale copies (one arrival per lane once its copies landed)
        full, empty = ring_barriers(STAGES, 1 + 32, 1)
        ring = (a_smem, w_smem, sa_smem, sw_smem, full, empty)
        gl.warp_specialize([
            (_consume, (ring, e, valid2, slot2, loc_j, pid_n, b2_ptr, out_ptr, tw_ptr, ids_ptr, map_ptr, part_ptr,
                        sem_ptr, live_ptr, H, I, E_local, E_global, K, S, NBN, stride_be, stride_ot, stride_twt,
                        stride_it, stride_pr, BM, BN, BK, SP, STAGES, HAS_BIAS, ON_INPUT, HAS_MAP, SKIP_ZERO, INLINE,
                        PDL, L2, num_warps)),
            (_produce, (ring, a_desc, w_desc, as_ptr, ws_ptr, e, pid_m, pid_n, H, I, stride_asr, stride_wse,
                        stride_wsn, BM, BN, BK, QBN, STAGES, PDL)),
        ], [1], [PRODUCER_REGS])
