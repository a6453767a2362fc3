"""mxfp4 / int4 (weight-only) grouped GEMMs with the weight tile decoded into shared memory (Hopper wgmma, Gluon).

Per output tile (rows of one expert block, BN weight rows), K step ``k`` of BK::

    W   = decode(packed[e, n, k·BK:(k+1)·BK], scales)       bf16 [BN, BK], exact value rounded once
    acc = acc + x[rows, k·BK:(k+1)·BK] · Wᵀ                  (bf16 wgmma m64, fp32 accumulator, k16 in order)

then the epilogue of :func:`moekit.ops._triton.grouped_gemm.w13_kernel` (bias, gated activation, rounded to
bf16) or of ``w2_kernel``'s SUM_PASS branch (bias, router weight, the slot row rounded to bf16).

The idea: the Triton kernels decode the tile in registers and then move it into the MMA operand layout
(through shared memory, with barriers per 16 k), and at decode they stream packed weights at ~1.4 TB/s on the
H200 (round 6 read their SASS as instruction-bound). Here each thread copies 16 packed bytes per group with
``cp.async`` into a ring of ``STAGES`` slots, reads back exactly the bytes it copied, decodes them with the
Triton kernels' packed-bf16 PTX (:data:`.._triton.w4_decode.E2M1_BF16_ASM` / ``INT4_BF16_ASM``: the same values) and
stores the bf16 tile once into an NVMMA-swizzled buffer that the wgmma reads directly (``WBUF`` such buffers in
flight). The activation rows arrive by ``cp.async`` too.

Measured (H200, docs/kernels.md round 10): the same speed as the Triton kernels within about ±10 %, never
clearly faster, so no shipped table asks for it. Fewer instructions did not help: the decoded tile is four
times the packed bytes and crosses shared memory twice (stored, then read by the wgmma), and the step is a
dependent chain that few warps per SM cannot hide. What would: the decoded tile as wgmma's register operand.

``SWAP`` (decode tiles): the weight rows are wgmma's M side (``acc [BN, BM]``, one warpgroup per 64 weight rows,
the tokens are the narrow N side), else the token rows are (``acc [BM, BN]``, one warpgroup per 64 rows).
Either way every output element is the same k16 products summed in the same order as the Triton kernels'
wgmma / mma.sync dots of the decoded tile (kWidth 2, the k order of :func:`.._triton.w4_decode._k_order_barrier`),
and the epilogue calls the same functions: the same bits (checked on the H200 by the GPU tests).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .._triton.epilogue import activate
from .._triton.quant import MXFP4, to_dt
from .._triton.w4_decode import E2M1_BF16_ASM, INT4_BF16_ASM
from .common import block_expert, pid_to_tile
from .compat import cta_barrier
from .w4_ring import _PLAIN, _a_layout, _issue_step, _p_layout, _pack, _s_ptrs, _scales, _w_ptrs

@gluon.jit
def _decode(p, s, QUANT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """Packed ``p`` [BN, NG, W] (uint8: two e2m1 codes; int32: eight int4) and raw scales ``s`` [BN, NG] ->
    bf16 [BN, BK], k = group · G + position: :func:`.._triton.w4_decode._decode_bf16`'s PTX and element order."""
    if QUANT == MXFP4:
        sb = s.to(gl.int32)
        sc = gl.where(sb == 0, 0x40, sb << 7).to(gl.int16).to(gl.bfloat16, bitcast=True)
        pb, sc3 = gl.broadcast(p, gl.expand_dims(sc, 2))
        lo, hi = gl.inline_asm_elementwise(E2M1_BF16_ASM, "=r,=r,=r,=r,r,r,r", [pb, sc3],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
        w = gl.reshape(gl.join(lo, hi), [BN, BK])
    else:
        pb, s3 = gl.broadcast(p, gl.expand_dims(s, 2))
        q0, q1, q2, q3, q4, q5, q6, q7 = gl.inline_asm_elementwise(
            INT4_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [pb, s3], dtype=(gl.bfloat16, ) * 8, is_pure=True,
            pack=1)
        q = gl.join(gl.join(gl.join(q0, q4), gl.join(q2, q6)), gl.join(gl.join(q1, q5), gl.join(q3, q7)))
        w = gl.reshape(q, [BN, BK])
    return w


@gluon.jit
def _mma(x_tile, w_tile, acc, SWAP: gl.constexpr):
    """Start ``acc += x · wᵀ`` (or ``w · xᵀ`` swapped) on the tensor cores; returns the in-flight token."""
    if SWAP:
        return warpgroup_mma(w_tile, x_tile.permute((1, 0)), acc, is_async=True)
    else:
        return warpgroup_mma(x_tile, w_tile.permute((1, 0)), acc, is_async=True)


@gluon.constexpr_function
def _nvmma(R, C):
    """The swizzled shared layout a wgmma reads a bf16 [R, C] operand tile from."""
    return gl.NVMMASharedLayout.get_default_for([R, C], gl.bfloat16)


@gluon.constexpr_function
def _acc_layout(BM, BN, SWAP, num_warps):
    """The wgmma accumulator: [BN, BM] with the weight rows on the M side (``SWAP``), else [BM, BN]."""
    if SWAP:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])
    else:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])


@gluon.jit
def _rows_cols(pid_m, pid_n, first, n_e, BM: gl.constexpr, BN: gl.constexpr, SWAP: gl.constexpr,
               ACC_L: gl.constexpr):
    """The accumulator's row indices, their liveness and its column indices, each 2-D (broadcastable to it)."""
    if SWAP:
        r = gl.arange(0, BM, layout=gl.SliceLayout(0, ACC_L))
        c = gl.arange(0, BN, layout=gl.SliceLayout(1, ACC_L))
        rows = pid_m * BM + r[None, :]
        valid = (pid_m - first) * BM + r[None, :] < n_e
        cols = pid_n * BN + c[:, None]
    else:
        r = gl.arange(0, BM, layout=gl.SliceLayout(1, ACC_L))
        c = gl.arange(0, BN, layout=gl.SliceLayout(0, ACC_L))
        rows = pid_m * BM + r[:, None]
        valid = (pid_m - first) * BM + r[:, None] < n_e
        cols = pid_n * BN + c[None, :]
    return rows, valid, cols


@gluon.jit
def _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM: gl.constexpr, BLOCK_E: gl.constexpr,
                A_L: gl.constexpr, num_warps: gl.constexpr):
    """Row block ``pid_m``'s expert, first block and live rows (:func:`.common.block_expert`), and its row offsets
    with their liveness in the activation-copy layout."""
    e, first, n_e = block_expert(counts_ptr, row_start_ptr, pid_m, E_local, BM, BLOCK_E, num_warps)
    ra = gl.arange(0, BM, layout=gl.SliceLayout(1, A_L))
    return e, first, n_e, ra, (pid_m - first) * BM + ra < n_e


@gluon.jit
def _x_operand(x_ptr, rows_or_tok, valid_a, stride_xt, BK: gl.constexpr, A_L: gl.constexpr):
    """Pointers [BM, BK] to the activation rows at k = 0, the row mask and each element's 16-byte vector index."""
    offs_k = gl.arange(0, BK, layout=gl.SliceLayout(0, A_L))
    ptrs = x_ptr + rows_or_tok.to(gl.int64)[:, None] * stride_xt + offs_k[None, :]
    return ptrs, valid_a[:, None], (offs_k // 8)[None, :]


@gluon.jit
def _token_operand(x_ptr, sorted_ptr, pid_m, ra, valid_a, K, stride_xt, BM: gl.constexpr, BK: gl.constexpr,
                   A_L: gl.constexpr):
    """:func:`_x_operand` of w13: the token rows of row block ``pid_m``'s slots (slot // K)."""
    tok_a = gl.load(sorted_ptr + pid_m * BM + ra, mask=valid_a, other=0) // K
    return _x_operand(x_ptr, tok_a, valid_a, stride_xt, BK, A_L)


@gluon.jit
def _w13_store(acc_g, acc_u, e, pid_m, pid_n, first, n_e, b1_ptr, inter_ptr, I, stride_be, stride_ir, limit,
               BM: gl.constexpr, BN: gl.constexpr, SWAP: gl.constexpr, ACC_L: gl.constexpr, ACT: gl.constexpr,
               HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr):
    """w13's epilogue (:func:`.._triton.grouped_gemm.w13_kernel`'s) for tile (``pid_m``, ``pid_n``) of expert ``e``
    (its row blocks from ``first``, ``n_e`` live rows): ``+ b13``, the gated activation in fp32, the store rounded
    to the intermediate's dtype."""
    rows, valid, cols = _rows_cols(pid_m, pid_n, first, n_e, BM, BN, SWAP, ACC_L)
    nmask = cols < I
    if HAS_BIAS:
        b_base = b1_ptr + e.to(gl.int64) * stride_be
        acc_g += gl.load(b_base + cols, mask=nmask, other=0.0).to(gl.float32)
        acc_u += gl.load(b_base + I + cols, mask=nmask, other=0.0).to(gl.float32)
    h = activate(acc_g, acc_u, limit, ACT, HAS_LIMIT)
    out_ptrs = inter_ptr + rows.to(gl.int64) * stride_ir + cols
    gl.store(out_ptrs, to_dt(h, inter_ptr.dtype.element_ty, False), mask=valid & nmask)


@gluon.jit
def _w2_store(acc, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
              stride_pr, BM: gl.constexpr, BN: gl.constexpr, SWAP: gl.constexpr, ACC_L: gl.constexpr,
              HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr):
    """w2's SUM_PASS epilogue (``w2_kernel``'s) for tile (``pid_m``, ``pid_n``) as :func:`_w13_store`: ``+ b2``, the
    router weight (unless applied on the input), the slot row rounded to bf16 into ``part``."""
    rows, valid, cols = _rows_cols(pid_m, pid_n, first, n_e, BM, BN, SWAP, ACC_L)
    nmask = cols < H
    if HAS_BIAS:
        acc += gl.load(b2_ptr + e.to(gl.int64) * stride_be + cols, mask=nmask, other=0.0).to(gl.float32)
    slot = gl.load(sorted_ptr + rows, mask=valid, other=0)
    if not ON_INPUT:
        tok = slot // K
        kk = slot - tok * K
        acc = acc * gl.load(tw_ptr + tok.to(gl.int64) * stride_twt + kk, mask=valid, other=0.0).to(gl.float32)
    p_ptrs = part_ptr + slot.to(gl.int64) * stride_pr + cols
    gl.store(p_ptrs, to_dt(acc, part_ptr.dtype.element_ty, False), mask=valid & nmask)


@gluon.jit
def w4_w13_kernel(
    x_ptr, w1_ptr, ws_ptr, b1_ptr, inter_ptr, counts_ptr, row_start_ptr, sorted_ptr,
    H, I, E_local, K, num_pid_m, limit,
    stride_xt, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_ir,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr,
    HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, SWAP: gl.constexpr,
    WBUF: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid (num_pid_m · cdiv(I, BN),). x: [T, H] bf16; w1: [E, 2I, H / PACK] packed (uint8 mxfp4 / int32 int4,
    gate rows then up rows, every row 16-byte aligned); ws: [E, 2I, H / G] raw scales (uint8 e8m0 / bf16);
    inter: [rows, I] bf16 (sorted row layout)."""
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, num_warps)
    A_L: gl.constexpr = _a_layout(BK, num_warps)
    ACC_L: gl.constexpr = _acc_layout(BM, BN, SWAP, num_warps)
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(I, BN), GROUP_M)
    e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, num_warps)
    if e < E_local:
        x_ptrs, x_mask, offs_v = _token_operand(x_ptr, sorted_ptr, pid_m, ra, valid_a, K, stride_xt, BM, BK, A_L)
        KP = H // PACK
        w_base = w1_ptr + e.to(gl.int64) * stride_we
        g_ptrs, w_mask, vid = _w_ptrs(w_base, pid_n * BN, I, stride_wn, BK // G, G // PACK, 32 // PACK, P_L, BN)
        u_ptrs = g_ptrs + I.to(gl.int64) * stride_wn
        ws_base = ws_ptr + e.to(gl.int64) * stride_wse
        sg_ptrs, s_mask, g2 = _s_ptrs(ws_base, pid_n * BN, I, stride_wsn, BK // G, P_L, BN)
        su_ptrs = sg_ptrs + I.to(gl.int64) * stride_wsn
        NKG = H // G

        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w1_ptr.dtype.element_ty, [2 * STAGES, BN, BK // G, G // PACK], _PLAIN)
        w_smem = gl.allocate_shared_memory(gl.bfloat16, [2 * WBUF, BN, BK], _nvmma(BN, BK))  # (gate, up) × WBUF
        nk = gl.cdiv(H, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 2)
        # the group scales, in registers two K steps ahead (four ahead measured slower on the H200: DeepSeek-V3
        # mxfp4 T = 1 w13 86.6 -> 97.4 µs)
        sg0 = _scales(sg_ptrs, s_mask, g2, 0, NKG, BK // G)
        su0 = _scales(su_ptrs, s_mask, g2, 0, NKG, BK // G)
        sg1 = _scales(sg_ptrs, s_mask, g2, 1, NKG, BK // G)
        su1 = _scales(su_ptrs, s_mask, g2, 1, NKG, BK // G)
        if SWAP:
            acc_g = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
        else:
            acc_g = gl.zeros([BM, BN], gl.float32, layout=ACC_L)
        acc_u = gl.zeros_like(acc_g)
        for k in range(nk):
            sg2 = _scales(sg_ptrs, s_mask, g2, k + 2, NKG, BK // G)
            su2 = _scales(su_ptrs, s_mask, g2, k + 2, NKG, BK // G)
            async_copy.wait_group(STAGES - 2)  # this thread's copies of step k have landed
            slot = k % STAGES
            wg = _decode(p_smem.index(2 * slot).load(P_L), sg0, QUANT, BN, BK)
            wu = _decode(p_smem.index(2 * slot + 1).load(P_L), su0, QUANT, BN, BK)
            b = (k % WBUF) * 2
            w_smem.index(b).store(wg)
            w_smem.index(b + 1).store(wu)
            fence_async_shared()
            cta_barrier()  # every thread's rows and decoded weights of step k are in shared memory
            acc_g = _mma(x_smem.index(slot), w_smem.index(b), acc_g, SWAP)
            acc_u = _mma(x_smem.index(slot), w_smem.index(b + 1), acc_u, SWAP)
            # step k - 1's are done (WBUF 2: step k's stay in flight; 1: its buffers are rewritten next step)
            acc_g, acc_u = warpgroup_mma_wait(num_outstanding=2 * (WBUF - 1), deps=(acc_g, acc_u))
            cta_barrier()  # ... in every warpgroup: its slot and weight buffers may be refilled
            kn = k + STAGES - 1
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, kn, nk, STAGES, BK,
                        PACK, EVEN_K, 2)
            sg0, su0, sg1, su1 = sg1, su1, sg2, su2
        acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, acc_u))
        async_copy.wait_group(0)

        _w13_store(acc_g, acc_u, e, pid_m, pid_n, first, n_e, b1_ptr, inter_ptr, I, stride_be, stride_ir, limit, BM,
                   BN, SWAP, ACC_L, ACT, HAS_BIAS, HAS_LIMIT)


@gluon.jit
def w4_w2_sum_kernel(
    inter_ptr, w2_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_ir, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    ON_INPUT: gl.constexpr, EVEN_K: gl.constexpr, SWAP: gl.constexpr, WBUF: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid (num_pid_m · NBN,). inter: [rows, I] bf16; w2: [E, H, I / PACK] packed; ws: [E, H, I / G];
    part: [T·K, H] bf16 (the slot rows; the top-k sum is the separate pass)."""
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, num_warps)
    A_L: gl.constexpr = _a_layout(BK, num_warps)
    ACC_L: gl.constexpr = _acc_layout(BM, BN, SWAP, num_warps)
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, NBN, GROUP_M)
    e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, num_warps)
    if e < E_local:
        x_ptrs, x_mask, offs_v = _x_operand(inter_ptr, pid_m * BM + ra, valid_a, stride_ir, BK, A_L)
        KP = I // PACK
        w_ptrs, w_mask, vid = _w_ptrs(w2_ptr + e.to(gl.int64) * stride_we, pid_n * BN, H, stride_wn, BK // G,
                                      G // PACK, 32 // PACK, P_L, BN)
        s_ptrs, s_mask, g2 = _s_ptrs(ws_ptr + e.to(gl.int64) * stride_wse, pid_n * BN, H, stride_wsn, BK // G, P_L,
                                     BN)
        NKG = I // G

        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w2_ptr.dtype.element_ty, [STAGES, BN, BK // G, G // PACK], _PLAIN)
        w_smem = gl.allocate_shared_memory(gl.bfloat16, [WBUF, BN, BK], _nvmma(BN, BK))
        nk = gl.cdiv(I, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 1)
        s0 = _scales(s_ptrs, s_mask, g2, 0, NKG, BK // G)  # two K steps ahead, as in w4_w13_kernel
        s1 = _scales(s_ptrs, s_mask, g2, 1, NKG, BK // G)
        if SWAP:
            acc = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
        else:
            acc = gl.zeros([BM, BN], gl.float32, layout=ACC_L)
        for k in range(nk):
            s2 = _scales(s_ptrs, s_mask, g2, k + 2, NKG, BK // G)
            async_copy.wait_group(STAGES - 2)
            slot = k % STAGES
            w = _decode(p_smem.index(slot).load(P_L), s0, QUANT, BN, BK)
            w_smem.index(k % WBUF).store(w)
            fence_async_shared()
            cta_barrier()
            acc = _mma(x_smem.index(slot), w_smem.index(k % WBUF), acc, SWAP)
            acc = warpgroup_mma_wait(num_outstanding=WBUF - 1, deps=(acc, ))
            cta_barrier()
            kn = k + STAGES - 1
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, kn, nk, STAGES, BK,
                        PACK, EVEN_K, 1)
            s0, s1 = s1, s2
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        async_copy.wait_group(0)

        _w2_store(acc, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
                  stride_pr, BM, BN, SWAP, ACC_L, HAS_BIAS, ON_INPUT)
