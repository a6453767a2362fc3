"""mxfp4 / int4 (weight-only) swapped grouped GEMMs, warp-specialised and persistent (Hopper wgmma, Gluon).

The math and the bits are :mod:`.w4`'s swapped kernels (decode tiles, T small): per output tile (BN weight rows
of one expert, the BM token rows of one row block) and K step ``k`` of BK::

    W   = decode(packed[e, n, k·BK:(k+1)·BK], scales)       bf16 [BN, BK], exact value rounded once
    acc = acc + W · x[rows, k·BK:(k+1)·BK]ᵀ                  (bf16 wgmma m64, fp32 accumulator, k16 in order)

then the same epilogues (:func:`.w4.w4_w13_kernel` / :func:`.w4.w4_w2_sum_kernel`).

The schedule is what differs. In :mod:`.w4` one warpgroup runs each K step as a dependent chain (copies land ->
decode -> store -> barrier -> wgmma -> wait), and at T = 1 the H200 ran it at ~1.4 TB/s of packed weights:
too few warps per SM to hide the chain (docs/kernels.md, round 10). Here the chain is cut into partitions that
run concurrently and meet at mbarriers:

- ``ND`` = 2 decoder partitions (``num_warps`` warps each) take the K steps in turn (step ``g`` of the program's
  global step count goes to decoder ``g % ND``). Each copies its own steps' packed tiles with ``cp.async`` into
  its own ring of ``STAGES`` slots (every thread reads back only the bytes it copied, so no barrier), decodes them
  in registers, waits until slot ``g % D`` of the decoded ring is free (``empty``), stores the bf16 tiles there
  and signals ``full``.
- The default partition (``num_warps`` warps: one warpgroup per 64 weight rows) copies the token rows into its
  own ring, waits ``full``, runs the wgmmas, and frees the decoded slot of the step before once its wgmmas are
  done. After a tile's last step it runs the epilogue while the decoders already fill the next tile's slots.

The programs are persistent: program ``p`` of ``P`` takes tiles ``p, p + P, ...`` in the grouped order of
:func:`.common.pid_to_tile`; row blocks past the last expert are skipped by every partition alike.

Measured on the H200 (docs/kernels.md, round 13): the same bits, but 1.3-1.7x slower decode steps than the Triton
tiles (three decoders no faster than two, one much slower): 4-bit decode is bound by instruction issue, and one
program per SM does not issue faster than three independent ones. In no table; kept as the warp-specialised
template (mbarrier rings between partitions, persistent tiles) for an fp8 kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .common import block_expert, pid_to_tile, ring_barriers
from .compat import cta_barrier
from .w4 import _acc_layout, _block_rows, _decode, _nvmma, _token_operand, _w2_store, _w13_store, _x_operand
from .w4_ring import _PLAIN, _a_layout, _issue_w, _issue_x, _p_layout, _pack, _s_ptrs, _scales, _w_ptrs

@gluon.jit
def _decoder(w_ptr, ws_ptr, p_smem, w_smem, full, empty, counts_ptr, row_start_ptr,
             E_local, num_pid_m, NBN, num_tiles, N, KD, UP, stride_we, stride_wn, stride_wse, stride_wsn,
             D_ID: gl.constexpr, ND: gl.constexpr, D: gl.constexpr, NT: gl.constexpr, BM: gl.constexpr,
             BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr, GROUP_M: gl.constexpr,
             BLOCK_E: gl.constexpr, STAGES: gl.constexpr, EVEN_K: gl.constexpr, NW: gl.constexpr):
    """Decoder ``D_ID``: the K steps ``g ≡ D_ID (mod ND)`` of the program's tiles, ``NT`` weight tiles each (w13:
    the gate rows n and the up rows ``UP + n``; w2: one), decoded into slot ``g % D`` of ``w_smem``."""
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, NW)
    NG: gl.constexpr = BK // G
    RING: gl.constexpr = D_ID * STAGES * NT  # this decoder's packed ring in p_smem
    KP = KD // PACK
    NKG = KD // G
    nk = gl.cdiv(KD, BK)
    g = 0  # the program's global K step at the tile's start (all partitions count alike)
    c = 0  # this decoder's own steps so far (its packed ring's position)
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = pid_to_tile(t, num_pid_m, NBN, GROUP_M)
        e, first, n_e = block_expert(counts_ptr, row_start_ptr, pid_m, E_local, BM, BLOCK_E, NW)
        if e < E_local:
            pa, w_mask, vid = _w_ptrs(w_ptr + e.to(gl.int64) * stride_we, pid_n * BN, N, stride_wn, NG, G // PACK,
                                      32 // PACK, P_L, BN)
            sa_ptrs, s_mask, g2 = _s_ptrs(ws_ptr + e.to(gl.int64) * stride_wse, pid_n * BN, N, stride_wsn, NG, P_L,
                                          BN)
            pb = pa + UP.to(gl.int64) * stride_wn
            sb_ptrs = sa_ptrs + UP.to(gl.int64) * stride_wsn
            k0 = (D_ID + ND - g % ND) % ND  # this decoder's first step of the tile
            n_own = (gl.maximum(nk - k0, 0) + ND - 1) // ND
            for st in gl.static_range(STAGES - 1):
                j = RING + NT * ((c + st) % STAGES)
                _issue_w(p_smem, j, pa, w_mask, vid, KP, k0 + st * ND, nk, BK, PACK, EVEN_K)
                if NT == 2:
                    _issue_w(p_smem, j + 1, pb, w_mask, vid, KP, k0 + st * ND, nk, BK, PACK, EVEN_K)
                async_copy.commit_group()
            sa0 = _scales(sa_ptrs, s_mask, g2, k0, NKG, NG)  # two own steps ahead, in registers
            sa1 = _scales(sa_ptrs, s_mask, g2, k0 + ND, NKG, NG)
            sb0 = sa0
            sb1 = sa1
            if NT == 2:
                sb0 = _scales(sb_ptrs, s_mask, g2, k0, NKG, NG)
                sb1 = _scales(sb_ptrs, s_mask, g2, k0 + ND, NKG, NG)
            for i in range(n_own):
                k = k0 + i * ND
                sa2 = _scales(sa_ptrs, s_mask, g2, k + 2 * ND, NKG, NG)
                sb2 = sa2
                if NT == 2:
                    sb2 = _scales(sb_ptrs, s_mask, g2, k + 2 * ND, NKG, NG)
                async_copy.wait_group(STAGES - 2)  # this thread's copies of step k have landed
                j = RING + NT * ((c + i) % STAGES)
                wa = _decode(p_smem.index(j).load(P_L), sa0, QUANT, BN, BK)
                gs = g + k
                slot = gs % D
                mbarrier.wait(empty.index(slot), ((gs // D) & 1) ^ 1)  # the wgmmas of its last use are done
                w_smem.index(NT * slot).store(wa)
                if NT == 2:
                    wb = _decode(p_smem.index(j + 1).load(P_L), sb0, QUANT, BN, BK)
                    w_smem.index(NT * slot + 1).store(wb)
                fence_async_shared()
                cta_barrier()  # every thread's decoded rows are stored
                mbarrier.arrive(full.index(slot), count=1)
                jn = RING + NT * ((c + i + STAGES - 1) % STAGES)  # the slot read one step ago (own bytes only)
                _issue_w(p_smem, jn, pa, w_mask, vid, KP, k + (STAGES - 1) * ND, nk, BK, PACK, EVEN_K)
                if NT == 2:
                    _issue_w(p_smem, jn + 1, pb, w_mask, vid, KP, k + (STAGES - 1) * ND, nk, BK, PACK, EVEN_K)
                async_copy.commit_group()
                sa0, sa1 = sa1, sa2
                sb0, sb1 = sb1, sb2
            c += n_own
            g += nk
    async_copy.wait_group(0)


@gluon.jit
def _mma_steps(x_smem, w_smem, full, empty, x_ptrs, x_mask, offs_v, KD, g, acc_a, acc_b, D: gl.constexpr,
               NT: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, EVEN_K: gl.constexpr):
    """One tile's K loop in the default partition: the token rows by cp.async (own ring), the decoded tiles from
    slot ``(g + k) % D``; ``acc_a`` (and ``acc_b`` when NT is 2) accumulate ``W · xᵀ``."""
    nk = gl.cdiv(KD, BK)
    for st in gl.static_range(STAGES - 1):
        _issue_x(x_smem, x_ptrs, x_mask, offs_v, KD, st, nk, STAGES, BK, EVEN_K)
        async_copy.commit_group()
    for k in range(nk):
        async_copy.wait_group(STAGES - 2)
        cta_barrier()  # every thread's rows of step k have landed
        fence_async_shared()  # ... and are visible to the wgmma
        gs = g + k
        slot = gs % D
        mbarrier.wait(full.index(slot), (gs // D) & 1)
        xt = x_smem.index(k % STAGES).permute((1, 0))
        acc_a = warpgroup_mma(w_smem.index(NT * slot), xt, acc_a, is_async=True)
        if NT == 2:
            acc_b = warpgroup_mma(w_smem.index(NT * slot + 1), xt, acc_b, is_async=True)
            acc_a, acc_b = warpgroup_mma_wait(num_outstanding=2, deps=(acc_a, acc_b))
        else:
            acc_a = warpgroup_mma_wait(num_outstanding=1, deps=(acc_a, ))
        cta_barrier()  # every warp is past step k - 1's wgmmas
        if k > 0:
            mbarrier.arrive(empty.index((gs + D - 1) % D), count=1)
        _issue_x(x_smem, x_ptrs, x_mask, offs_v, KD, k + STAGES - 1, nk, STAGES, BK, EVEN_K)
        async_copy.commit_group()
    if NT == 2:
        acc_a, acc_b = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a, acc_b))
    else:
        acc_a = warpgroup_mma_wait(num_outstanding=0, deps=(acc_a, ))
    async_copy.wait_group(0)
    cta_barrier()  # the x ring is free for the next tile
    mbarrier.arrive(empty.index((g + nk - 1) % D), count=1)
    return acc_a, acc_b


@gluon.jit
def _mma_w13(x_ptr, x_smem, w_smem, full, empty, b1_ptr, inter_ptr, counts_ptr, row_start_ptr, sorted_ptr,
             H, I, E_local, K, num_pid_m, NBN, num_tiles, limit, stride_xt, stride_be, stride_ir,
             D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
             BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr, HAS_BIAS: gl.constexpr,
             HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, NW: gl.constexpr):
    """The default partition of :func:`w4ws_w13_kernel`: gathered token rows, both wgmmas, the gated epilogue."""
    A_L: gl.constexpr = _a_layout(BK, NW)
    ACC_L: gl.constexpr = _acc_layout(BM, BN, True, NW)
    g = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = pid_to_tile(t, num_pid_m, NBN, GROUP_M)
        e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, NW)
        if e < E_local:
            x_ptrs, x_mask, offs_v = _token_operand(x_ptr, sorted_ptr, pid_m, ra, valid_a, K, stride_xt, BM, BK, A_L)
            acc_g = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
            acc_u = gl.zeros_like(acc_g)
            acc_g, acc_u = _mma_steps(x_smem, w_smem, full, empty, x_ptrs, x_mask, offs_v, H, g, acc_g, acc_u, D, 2,
                                      BK, STAGES, EVEN_K)
            g += gl.cdiv(H, BK)
            _w13_store(acc_g, acc_u, e, pid_m, pid_n, first, n_e, b1_ptr, inter_ptr, I, stride_be, stride_ir, limit, BM,
                       BN, True, ACC_L, ACT, HAS_BIAS, HAS_LIMIT)


@gluon.jit
def _mma_w2(inter_ptr, x_smem, w_smem, full, empty, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
            H, I, E_local, K, num_pid_m, NBN, num_tiles, stride_ir, stride_be, stride_twt, stride_pr,
            D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
            BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr,
            EVEN_K: gl.constexpr, NW: gl.constexpr):
    """The default partition of :func:`w4ws_w2_sum_kernel`: the sorted rows, the wgmma, the slot-row epilogue."""
    A_L: gl.constexpr = _a_layout(BK, NW)
    ACC_L: gl.constexpr = _acc_layout(BM, BN, True, NW)
    g = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = pid_to_tile(t, num_pid_m, NBN, GROUP_M)
        e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, NW)
        if e < E_local:
            x_ptrs, x_mask, offs_v = _x_operand(inter_ptr, pid_m * BM + ra, valid_a, stride_ir, BK, A_L)
            acc = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
            acc, _ = _mma_steps(x_smem, w_smem, full, empty, x_ptrs, x_mask, offs_v, I, g, acc, acc, D, 1, BK,
                                STAGES, EVEN_K)
            g += gl.cdiv(I, BK)
            _w2_store(acc, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
                      stride_pr, BM, BN, True, ACC_L, HAS_BIAS, ON_INPUT)


@gluon.jit
def _rings(x_dtype, w_dtype, ND: gl.constexpr, D: gl.constexpr, NT: gl.constexpr, BM: gl.constexpr,
           BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr, STAGES: gl.constexpr):
    """The shared buffers: token-row ring, decoded ring (``D`` slots of ``NT`` tiles), the decoders' packed rings,
    and the ``full`` / ``empty`` barriers of the decoded slots (initialised)."""
    x_smem = gl.allocate_shared_memory(x_dtype, [STAGES, BM, BK], _nvmma(BM, BK))
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [D * NT, BN, BK], _nvmma(BN, BK))
    p_smem = gl.allocate_shared_memory(w_dtype, [ND * STAGES * NT, BN, BK // G, G // _pack(QUANT)], _PLAIN)
    full, empty = ring_barriers(D, 1, 1)
    return x_smem, w_smem, p_smem, full, empty


@gluon.jit
def w4ws_w13_kernel(
    x_ptr, w1_ptr, ws_ptr, b1_ptr, inter_ptr, counts_ptr, row_start_ptr, sorted_ptr,
    H, I, E_local, K, num_pid_m, limit,
    stride_xt, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_ir,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr,
    HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, D: gl.constexpr, DEC_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Persistent grid (P,), P <= num_pid_m · cdiv(I, BN). Arguments as :func:`.w4.w4_w13_kernel` (swapped: BN
    weight rows, one warpgroup per 64, on the wgmma's M side); two decoder partitions of ``num_warps`` warps and
    ``DEC_REGS`` registers per thread; ``D`` decoded slots of (gate, up) tiles."""
    NBN = gl.cdiv(I, BN)
    num_tiles = num_pid_m * NBN
    NT: gl.constexpr = 2  # gate and up
    ND: gl.constexpr = 2  # decoder partitions (3 measured no faster, 1 slower: docs/kernels.md round 13)
    D0: gl.constexpr = 0
    D1: gl.constexpr = 1
    x_smem, w_smem, p_smem, full, empty = _rings(x_ptr.dtype.element_ty, w1_ptr.dtype.element_ty, ND, D, NT, BM, BN,
                                                 BK, G, QUANT, STAGES)
    # every argument written into the call: a tuple held in a variable (or added to one) loses its constexprs
    gl.warp_specialize([
        (_mma_w13, (x_ptr, x_smem, w_smem, full, empty, b1_ptr, inter_ptr, counts_ptr, row_start_ptr,
         sorted_ptr, H, I, E_local, K, num_pid_m, NBN, num_tiles, limit, stride_xt, stride_be, stride_ir, D, BM,
         BN, BK, GROUP_M, BLOCK_E, STAGES, ACT, HAS_BIAS, HAS_LIMIT, EVEN_K, num_warps)),
        (_decoder, (w1_ptr, ws_ptr, p_smem, w_smem, full, empty, counts_ptr, row_start_ptr, E_local, num_pid_m,
         NBN, num_tiles, I, H, I, stride_we, stride_wn, stride_wse, stride_wsn, D0, ND, D, NT, BM, BN, BK, G,
         QUANT, GROUP_M, BLOCK_E, STAGES, EVEN_K, num_warps)),
        (_decoder, (w1_ptr, ws_ptr, p_smem, w_smem, full, empty, counts_ptr, row_start_ptr, E_local, num_pid_m,
         NBN, num_tiles, I, H, I, stride_we, stride_wn, stride_wse, stride_wsn, D1, ND, D, NT, BM, BN, BK, G,
         QUANT, GROUP_M, BLOCK_E, STAGES, EVEN_K, num_warps)),
    ], [num_warps, num_warps], [DEC_REGS, DEC_REGS])


@gluon.jit
def w4ws_w2_sum_kernel(
    inter_ptr, w2_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_ir, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    ON_INPUT: gl.constexpr, EVEN_K: gl.constexpr, D: gl.constexpr, DEC_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Persistent grid (P,), P <= num_pid_m · NBN. Arguments as :func:`.w4.w4_w2_sum_kernel` (swapped), plus
    ``D`` / ``DEC_REGS`` as :func:`w4ws_w13_kernel`."""
    num_tiles = num_pid_m * NBN
    UP = H * 0  # no second tile
    NT: gl.constexpr = 1
    ND: gl.constexpr = 2
    D0: gl.constexpr = 0
    D1: gl.constexpr = 1
    x_smem, w_smem, p_smem, full, empty = _rings(inter_ptr.dtype.element_ty, w2_ptr.dtype.element_ty, ND, D, NT, BM,
                                                 BN, BK, G, QUANT, STAGES)
    # every argument written into the call (as in w4ws_w13_kernel)
    gl.warp_specialize([
        (_mma_w2, (inter_ptr, x_smem, w_smem, full, empty, b2_ptr, tw_ptr, counts_ptr, row_start_ptr,
         sorted_ptr, part_ptr, H, I, E_local, K, num_pid_m, NBN, num_tiles, stride_ir, stride_be, stride_twt,
         stride_pr, D, BM, BN, BK, GROUP_M, BLOCK_E, STAGES, HAS_BIAS, ON_INPUT, EVEN_K, num_warps)),
        (_decoder, (w2_ptr, ws_ptr, p_smem, w_smem, full, empty, counts_ptr, row_start_ptr, E_local, num_pid_m,
         NBN, num_tiles, H, I, UP, stride_we, stride_wn, stride_wse, stride_wsn, D0, ND, D, NT, BM, BN, BK, G,
         QUANT, GROUP_M, BLOCK_E, STAGES, EVEN_K, num_warps)),
        (_decoder, (w2_ptr, ws_ptr, p_smem, w_smem, full, empty, counts_ptr, row_start_ptr, E_local, num_pid_m,
         NBN, num_tiles, H, I, UP, stride_we, stride_wn, stride_wse, stride_wsn, D1, ND, D, NT, BM, BN, BK, G,
         QUANT, GROUP_M, BLOCK_E, STAGES, EVEN_K, num_warps)),
    ], [num_warps, num_warps], [DEC_REGS, DEC_REGS])
