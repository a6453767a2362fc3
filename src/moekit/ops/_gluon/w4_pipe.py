"""The register-operand 4-bit GEMMs (:mod:`.w4_rega`) with each step's decode under the previous wgmma (Gluon).

The math, the tiles and the bits are :mod:`.w4_rega`'s (config ``"gluon_rega": 3``). What differs is the order in
which a program issues its work. :mod:`.w4_rega` decodes a fragment, issues its wgmma and waits for it before
anything else runs (round 15: ptxas hands an in-flight A fragment's registers to later values, and the HGMMAs carry
no read scoreboard). With one program per SM (the 128-row tiles: two [64, 128] accumulators per warpgroup) the
tensor cores then idle while a step decodes, and the decode's issue idles while they run.

Here every fragment multiplies the token block in two halves, each half its own accumulator [BN, BM / 2] and its own
wgmma group (N = BM / 2: the same k16 products summed in the same order for every output element, so the same bits):

    issue  lo(f_k)                     # f_k: step k's fragment
    decode f_next                      # overlaps lo(f_k); f_k stays live (hi reads it next)
    issue  hi(f_k), lo(f_next)
    wait   until one group is left     # lo(f_k), hi(f_k) retired; lo(f_next) runs on

so a fragment's registers stay live (a later wgmma reads them) while any wgmma reading them is in flight, and after
its last wgmma only the next one's issue comes before the wait that retires it: nothing can be given its registers
(checked on the compiled loop by ``compile_sm90.inflight_fragment_writes``). w13 runs gate and up as consecutive
fragments (four accumulators: gate, up x the two halves), w2 one fragment per step.

The ring: ``STAGES`` >= 3 slots. A step's one barrier makes step k + 1's copies visible (its decode is next) and
shows every warp past the wait that retired step k - 1's wgmmas, whose slot it then refills with step k + STAGES - 1.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .common import pid_to_tile
from .w4 import (_a_layout, _acc_layout, _block_rows, _issue_step, _nvmma, _p_layout, _pack, _PLAIN, _token_operand,
                 _w2_store, _w13_store, _w_ptrs, _x_operand)
from .w4_rega import _frag, _frag_scales, _ready


@gluon.jit
def _half(x_slot, h: gl.constexpr, BM: gl.constexpr):
    """Token rows ``h · BM / 2`` .. of a ring slot's activation tile [BM, BK], as the wgmma's B operand [BK, BM / 2]."""
    return x_slot.slice(h * (BM // 2), BM // 2, dim=0).permute((1, 0))


@gluon.jit
def _issue(w, x_slot, h: gl.constexpr, acc, BM: gl.constexpr):
    """Start ``acc += w · x_halfᵀ`` (one wgmma group, A from registers); returns the in-flight accumulator."""
    return warpgroup_mma(w, _half(x_slot, h, BM), acc, is_async=True)


@gluon.jit
def _next_step(STAGES: gl.constexpr):
    """Step k + 1's copies have landed for every thread and are visible to the wgmma; every warp is past the wait
    that retired step k - 1's wgmmas (its slot may be refilled)."""
    async_copy.wait_group(STAGES - 3)
    gl.thread_barrier()
    fence_async_shared()


@gluon.jit
def w4rp_w13_kernel(
    x_ptr, w1_ptr, ws_ptr, b1_ptr, inter_ptr, counts_ptr, row_start_ptr, sorted_ptr,
    H, I, E_local, K, num_pid_m, limit,
    stride_xt, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_ir,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr,
    HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, num_warps: gl.constexpr,
    SWORD: gl.constexpr = False,
):
    """Grid (num_pid_m · cdiv(I, BN),). Arguments as :func:`.w4_rega.w4ra_w13_kernel`; fragments in the order
    gate k, up k, gate k + 1 (module docstring)."""
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, num_warps)
    A_L: gl.constexpr = _a_layout(BK, num_warps)
    HL: gl.constexpr = _acc_layout(BM // 2, BN, True, num_warps)  # each half's accumulator; the fragments' parent
    NG: gl.constexpr = BK // G
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(I, BN), GROUP_M)
    e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, num_warps)
    if e < E_local:
        x_ptrs, x_mask, offs_v = _token_operand(x_ptr, sorted_ptr, pid_m, ra, valid_a, K, stride_xt, BM, BK, A_L)
        KP = H // PACK
        NKG = H // G
        g_ptrs, w_mask, vid = _w_ptrs(w1_ptr + e.to(gl.int64) * stride_we, pid_n * BN, I, stride_wn, NG, G // PACK,
                                      32 // PACK, P_L, BN)
        u_ptrs = g_ptrs + I.to(gl.int64) * stride_wn
        ws_g = ws_ptr + e.to(gl.int64) * stride_wse
        ws_u = ws_g + I.to(gl.int64) * stride_wsn
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w1_ptr.dtype.element_ty, [2 * STAGES, BN, NG, G // PACK], _PLAIN)
        nk = gl.cdiv(H, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 2)
        n0 = pid_n * BN
        sg1 = _frag_scales(ws_g, n0, I, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        su0 = _frag_scales(ws_u, n0, I, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        su1 = _frag_scales(ws_u, n0, I, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        g_lo = gl.zeros([BN, BM // 2], gl.float32, layout=HL)
        g_hi = gl.zeros_like(g_lo)
        u_lo = gl.zeros_like(g_lo)
        u_hi = gl.zeros_like(g_lo)
        _ready(STAGES)  # step 0
        fg = _frag(p_smem.index(0), sg1, QUANT, BN, BK, G, HL, num_warps, SWORD)
        sg1 = _frag_scales(ws_g, n0, I, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        # at the top of step k nothing is in flight: fg = gate k's fragment; su0 / su1 = up k / k + 1's scales, sg1 =
        # gate k + 1's
        for k in range(nk - 1):
            su2 = _frag_scales(ws_u, n0, I, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            sg2 = _frag_scales(ws_g, n0, I, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            slot = k % STAGES
            g_lo = _issue(fg, x_smem.index(slot), 0, g_lo, BM)
            fu = _frag(p_smem.index(2 * slot + 1), su0, QUANT, BN, BK, G, HL, num_warps, SWORD)  # under gate's lo
            g_hi = _issue(fg, x_smem.index(slot), 1, g_hi, BM)
            u_lo = _issue(fu, x_smem.index(slot), 0, u_lo, BM)
            g_lo, g_hi, u_lo = warpgroup_mma_wait(num_outstanding=1, deps=(g_lo, g_hi, u_lo))  # gate k retired
            _next_step(STAGES)
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, k + STAGES - 1, nk,
                        STAGES, BK, PACK, EVEN_K, 2)
            fgn = _frag(p_smem.index(2 * ((k + 1) % STAGES)), sg1, QUANT, BN, BK, G, HL, num_warps, SWORD)  # under up's lo
            u_hi = _issue(fu, x_smem.index(slot), 1, u_hi, BM)
            g_lo, g_hi, u_lo, u_hi = warpgroup_mma_wait(num_outstanding=0, deps=(g_lo, g_hi, u_lo, u_hi))
            fg = fgn
            su0, su1, sg1 = su1, su2, sg2
        slot = (nk - 1) % STAGES
        g_lo = _issue(fg, x_smem.index(slot), 0, g_lo, BM)
        fu = _frag(p_smem.index(2 * slot + 1), su0, QUANT, BN, BK, G, HL, num_warps, SWORD)
        g_hi = _issue(fg, x_smem.index(slot), 1, g_hi, BM)
        u_lo = _issue(fu, x_smem.index(slot), 0, u_lo, BM)
        u_hi = _issue(fu, x_smem.index(slot), 1, u_hi, BM)
        g_lo, g_hi, u_lo, u_hi = warpgroup_mma_wait(num_outstanding=0, deps=(g_lo, g_hi, u_lo, u_hi))
        async_copy.wait_group(0)

        _w13_store(g_lo, u_lo, e, pid_m, pid_n, first, n_e, b1_ptr, inter_ptr, I, stride_be, stride_ir, limit, BM,
                   BN, True, HL, ACT, HAS_BIAS, HAS_LIMIT, 1)
        _w13_store(g_hi, u_hi, e, pid_m, pid_n, first, n_e, b1_ptr, inter_ptr, I, stride_be, stride_ir, limit, BM,
                   BN, True, HL, ACT, HAS_BIAS, HAS_LIMIT, 2)


@gluon.jit
def w4rp_w2_sum_kernel(
    inter_ptr, w2_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_ir, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    ON_INPUT: gl.constexpr, EVEN_K: gl.constexpr, num_warps: gl.constexpr, SWORD: gl.constexpr = False,
):
    """Grid (num_pid_m · NBN,). Arguments as :func:`.w4_rega.w4ra_w2_sum_kernel`; one fragment per step (module
    docstring)."""
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, num_warps)
    A_L: gl.constexpr = _a_layout(BK, num_warps)
    HL: gl.constexpr = _acc_layout(BM // 2, BN, True, num_warps)  # each half's accumulator; the fragments' parent
    NG: gl.constexpr = BK // G
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, NBN, GROUP_M)
    e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, num_warps)
    if e < E_local:
        x_ptrs, x_mask, offs_v = _x_operand(inter_ptr, pid_m * BM + ra, valid_a, stride_ir, BK, A_L)
        KP = I // PACK
        NKG = I // G
        w_ptrs, w_mask, vid = _w_ptrs(w2_ptr + e.to(gl.int64) * stride_we, pid_n * BN, H, stride_wn, NG, G // PACK,
                                      32 // PACK, P_L, BN)
        ws_e = ws_ptr + e.to(gl.int64) * stride_wse
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w2_ptr.dtype.element_ty, [STAGES, BN, NG, G // PACK], _PLAIN)
        nk = gl.cdiv(I, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 1)
        n0 = pid_n * BN
        s0 = _frag_scales(ws_e, n0, H, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        s1 = _frag_scales(ws_e, n0, H, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        lo = gl.zeros([BN, BM // 2], gl.float32, layout=HL)
        hi = gl.zeros_like(lo)
        _ready(STAGES)  # step 0
        f = _frag(p_smem.index(0), s0, QUANT, BN, BK, G, HL, num_warps, SWORD)
        # at the top of step k nothing is in flight: f = its fragment, s1 = step k + 1's scales. The loop-carried
        # fragment may be copied between registers there (step k + 1's is decoded while step k's is live), safe with
        # nothing in flight
        for k in range(nk - 1):
            s2 = _frag_scales(ws_e, n0, H, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            slot = k % STAGES
            lo = _issue(f, x_smem.index(slot), 0, lo, BM)
            _next_step(STAGES)
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, k + STAGES - 1,
                        nk, STAGES, BK, PACK, EVEN_K, 1)
            fn = _frag(p_smem.index((k + 1) % STAGES), s1, QUANT, BN, BK, G, HL, num_warps, SWORD)  # under lo
            hi = _issue(f, x_smem.index(slot), 1, hi, BM)
            lo, hi = warpgroup_mma_wait(num_outstanding=0, deps=(lo, hi))
            f = fn
            s1 = s2
        slot = (nk - 1) % STAGES
        lo = _issue(f, x_smem.index(slot), 0, lo, BM)
        hi = _issue(f, x_smem.index(slot), 1, hi, BM)
        lo, hi = warpgroup_mma_wait(num_outstanding=0, deps=(lo, hi))
        async_copy.wait_group(0)

        _w2_store(lo, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
                  stride_pr, BM, BN, True, HL, HAS_BIAS, ON_INPUT, 1)
        _w2_store(hi, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
                  stride_pr, BM, BN, True, HL, HAS_BIAS, ON_INPUT, 2)
