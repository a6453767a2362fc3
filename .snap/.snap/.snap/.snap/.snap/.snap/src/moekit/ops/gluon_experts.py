"""Launchers of the Gluon fp8 block GEMMs (:mod:`._gluon`) inside :func:`.triton_experts.fused_experts_impl`, and
what every Gluon launcher asks first (:func:`gluon_available`; the 4-bit GEMMs' launchers: :mod:`.gluon_w4`).

A Gluon kernel replaces a Triton kernel only where it computes the same bits (its module says how) and only when the
config asks for it (``cfg["w13"]["gluon"] = 1``, ``cfg["w2"]["gluon"] = 1``), like ``"tma"``: on CPU, under the
interpreter, on a GPU other than an NVIDIA sm_90 (Hopper: wgmma), without Gluon, or for tiles it does not cover
(:func:`fp8_w13_ok`, :func:`fp8_w2_ok`, :func:`fp8_w2_dec_ok`, :func:`.gluon_w4.w4_ok`), the Triton kernel runs. Its
warps follow its tile: BLOCK_M / 16 (one warpgroup per 64 rows; swapped 4-bit tiles: BN / 16). The tuner and the GPU
tests compare the two bit for bit.

The fp8 block GEMMs also come warp-specialised and persistent (:mod:`._gluon.fp8_w2_ws`, :mod:`._gluon.fp8_w13_ws`,
``"w2" / "w13": {"gluon": 1, "gluon_ws": n}`` with n = 1 or 2 consumer warpgroups, each fed by its own producer,
or for w13 with BLOCK_M 128 and n = 2 both on every tile (:func:`fp8_w13_ws_coop`); one program per SM; the same
bits; :func:`fp8_w2_ws_ok` / :func:`fp8_w13_ws_ok` say where they run, elsewhere the one-warpgroup Gluon GEMM does).
They find a tile's expert in a block -> expert table (:func:`launch_block_table`, one small launch after the align
kernel, only when one of them runs). The warp-specialised w13 reads its rows by TMA from the input quantised into
the sorted rows (``_triton.quant.act_quant_sorted_kernel``, run by the caller when :func:`fp8_w13_ws_ok` and
:func:`fp8_w13_ws_rows_ok` hold). ``"w13": {"gluon_stack": 1}`` runs the one-warpgroup w13 with one wgmma for the
gate and up rows (:mod:`._gluon.fp8_w13`). At decode (swapped tiles) ``"gluon_dec"`` asks for the Gluon decode GEMMs
(:func:`fp8_w2_dec_ok`, :func:`fp8_w13_dec_ok`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import triton

#: the fp8 block format's code (:class:`.triton_experts_quant.QuantSpec`): the K step is one scale block
FP8_BLOCK = 1


@functools.lru_cache(maxsize=None)
def gluon_available(index: int) -> bool:
    """Gluon imports and device ``index`` is an NVIDIA sm_90 (the kernels use Hopper's wgmma; a ROCm build reports
    its gfx major as the capability, e.g. 9 for MI300, so HIP is excluded first)."""
    if torch.version.hip is not None or importlib.util.find_spec("triton.experimental.gluon") is None:
        return False
    return torch.cuda.get_device_capability(index)[0] == 9


def _device_ok(t: torch.Tensor) -> bool:
    """``t`` lives on a GPU the Gluon kernels compile for (:func:`gluon_available`)."""
    return t.device.type == "cuda" and gluon_available(t.device.index if t.device.index is not None
                                                       else torch.cuda.current_device())


def fp8_w2_ok(p, q, w2: torch.Tensor, interp: bool) -> bool:
    """The plan asked for the Gluon w2 and it computes the Triton kernel's bits here: fp8 block weights with the
    K step = one scale block, one dot per step (``fp8_acc`` = BK), one weight scale per tile (BN divides the
    scale block), tiles on wgmma's M side (BLOCK_M 64 / 128) and TMA-able rows."""
    if not p.w2_gluon or q is None or q.spec.code != FP8_BLOCK or interp or not _device_ok(w2):
        return False
    kw = q.common
    return (kw["FP8_ACC"] == p.bk2 == q.spec.block_k
            and q.ws2["ws_qbn"] % p.bn2 == 0 and p.bm in (64, 128) and (w2.shape[2] * w2.element_size()) % 16 == 0
            and not p.w2_kw["SWAP"])


#: shared memory of the warp-specialised fp8 w2's rings (every consumer's), of the 227 KB an H200 block may take
_FP8_WS_SMEM = 220 * 1024
#: ring slots per consumer at most
_FP8_WS_MAX_STAGES = 8


def fp8_w2_ws_stages(bm: int, bn: int, bk: int, nc: int) -> int:
    """Ring slots per consumer of the warp-specialised fp8 w2: as many slots (a [BM, BK] and a [BN, BK] fp8 tile,
    two fp32 scales per row) as fit ``nc`` rings in :data:`_FP8_WS_SMEM` (at most :data:`_FP8_WS_MAX_STAGES`)."""
    return min(_FP8_WS_MAX_STAGES, _FP8_WS_SMEM // (nc * ((bm + bn) * bk + 8 * bm)))


def fp8_w2_ws_ok(p) -> bool:
    """The plan asks for the warp-specialised fp8 w2 (w2 config ``"gluon_ws"``: its consumer count) and the kernel
    covers the tile: 1 or 2 consumers, BLOCK_M 64 (one warpgroup per consumer) or 128 with one consumer (8 warps;
    two would need twice the registers of an SM), BN 32-128 (three [BM, BN] fp32 accumulators per thread at most
    fit the registers), and two ring slots per consumer at least. Outside these the one-warpgroup Gluon w2 runs
    (:func:`fp8_w2_ok` holds first)."""
    nc, bm, bn = p.gluon_ws[1], p.bm, p.bn2
    return (nc in (1, 2) and (bm == 64 or (bm == 128 and nc == 1)) and bn in (32, 64, 128)
            and fp8_w2_ws_stages(bm, bn, p.bk2, nc) >= 2)


def launch_fp8_w2_sum(launch, p, q, inter_q, as_, w2, b2, tw, counts, row_start, sorted_slot, blk, blk_ready: bool,
                      part, h, inter, k, on_input: bool) -> None:
    """``part[slot] = (Σ_k promote(x_q · Wqᵀ)) (+ b2) (· w)`` for every live slot row: the SUM_PASS w2.
    inter_q: [rows, I] e4m3; as_: [rows, cdiv(I, bk)] fp32 (w2's input scales); the rest as the Triton w2.
    With ``"gluon_ws"`` inside :func:`fp8_w2_ws_ok`: the warp-specialised kernel, one program per SM at most, with
    the block -> expert table ``blk`` (written here unless ``blk_ready``: the warp-specialised w13 wrote it)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon.fp8_w2 import fp8_w2_sum_kernel
    from ._gluon.fp8_w2_ws import fp8_w2_ws_sum_kernel

    bm, bn, bk = p.bm, p.bn2, p.bk2
    e_local = w2.shape[0]
    a_desc = TensorDescriptor.from_tensor(inter_q, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk],
                                                                                                 gl.float8e4nv))
    w_desc = TensorDescriptor.from_tensor(w2.view(-1, inter), [bn, bk],
                                          gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    ws = q.ws2
    head = (a_desc, w_desc, as_, ws["ws_ptr"], b2 if b2 is not None else w2, tw, counts, row_start, sorted_slot)
    tail = (part, h, inter, e_local, k, p.num_pid_m, p.nbn, as_.stride(0), ws["stride_wse"], ws["stride_wsn"],
            b2.stride(0) if b2 is not None else 0, tw.stride(0), part.stride(0))
    const = dict(BM=bm, BN=bn, BK=bk, QBN=int(ws["ws_qbn"]), GROUP_M=int(p.w2_kw["GROUP_M"]),
                 BLOCK_E=p.w2_kw["BLOCK_E"], HAS_BIAS=b2 is not None, ON_INPUT=on_input, num_warps=bm // 16)
    if fp8_w2_ws_ok(p):
        nc = p.gluon_ws[1]
        if not blk_ready:
            launch_block_table(launch, p, counts, row_start, blk, e_local)
        grid = (min(p.num_pid_m * p.nbn, _sm_count(inter_q.device.index)),)
        launch(fp8_w2_ws_sum_kernel, grid, *head, blk, *tail, STAGES=fp8_w2_ws_stages(bm, bn, bk, nc), NC=nc,
               **const)
        return
    stages = max(2, min(int(p.w2_kw["num_stages"]), (200 * 1024) // ((bm + bn) * bk)))
    nt = max(1, min(p.gluon_nt, p.nbn))
    launch(fp8_w2_sum_kernel, (p.num_pid_m * triton.cdiv(p.nbn, nt),), *head, *tail, STAGES=stages, NT=nt, **const)


#: registers per thread of the Gluon fp8 decode w2: 72 lets 7 programs of 4 warps share an SM, as the Triton w2's 71
#: do (ptxas takes 80 unbounded: 6 per SM, and DeepSeek-V3's 896 programs at T = 1 ran in two waves, 43 vs 36 µs;
#: at 72 one word spills, outside the K loop)
_FP8_DEC_REGS = 72
#: registers per thread of its warp-specialised form's 8 warps (the consumer warpgroup, the producer's padded one):
#: two programs per SM (the producer warps give theirs back, so the consumer may take up to ~200)
_FP8_DEC_WS_REGS = 128


def fp8_w2_dec_ok(p, q, w2: torch.Tensor, interp: bool) -> bool:
    """The plan asked for the Gluon fp8 decode w2 (w2 config ``"gluon_dec"``: the fused top-k sum over the inline
    layout or, past it, the align kernel's, :mod:`._gluon.fp8_w2_dec`) and it computes the Triton kernel's bits
    here: fp8 block weights with the K step = one scale block (``fp8_acc`` = BK), swapped tiles of 64 or 128 weight
    rows (one weight scale per tile: BN divides the scale block) and 16-64 token rows, TMA-able rows (with the plan's
    ``"pdl"`` it is launched as a programmatic dependent and requests its first weight tiles before its grid wait).
    ``"gluon_dec": 2`` asks for its warp-specialised form (:mod:`._gluon.fp8_w2_dec_ws`), under the same conditions."""
    if not p.w2_gluon_dec or q is None or q.spec.code != FP8_BLOCK or interp or not _device_ok(w2):
        return False
    kw = q.common
    return (kw["FP8_ACC"] == p.bk2 == q.spec.block_k and q.ws2["ws_qbn"] % p.bn2 == 0 and p.bn2 in (64, 128)
            and p.bm in (16, 32, 64) and p.w2_kw["SWAP"]
            and (w2.shape[2] * w2.element_size()) % 16 == 0)


def launch_fp8_w2_dec(launch, p, q, inter_q, as_, w2, b2, out, tw, ids, emap, part, sem, layout, h, inter, k, t,
                      on_input: bool, pdl: bool = False) -> None:
    """``out[t] = Σ_k (promote(x_q · Wqᵀ) (+ b2)) (· w)`` over the live slots of a decode batch, the Triton
    decode w2's bits (:mod:`._gluon.fp8_w2_dec`). inter_q: [rows, I] e4m3 in the plan's layout; as_: [rows,
    cdiv(I, bk)] fp32; part: [T·K, H] fp32; sem: the (token, column tile) semaphores the inline w13 (or the align
    kernel) zeroed; layout: the align kernel's (counts, row_start, sorted, live), read past the inline layout.
    ``p.gluon_nt`` (w2 config ``"gluon_nt"``) column tiles per program; ``pdl``: a programmatic dependent launch."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon.fp8_w2_dec import fp8_w2_dec_kernel
    from ._gluon.fp8_w2_dec_ws import fp8_w2_dec_ws_kernel

    bm, bn, bk = p.bm, p.bn2, p.bk2
    a_desc = TensorDescriptor.from_tensor(inter_q, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk],
                                                                                                 gl.float8e4nv))
    w_desc = TensorDescriptor.from_tensor(w2.view(-1, inter), [bn, bk],
                                          gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    ws, kw = q.ws2, p.w2_kw
    stages = max(2, min(int(kw["num_stages"]), (200 * 1024) // ((bm + bn) * bk)))
    args = (a_desc, w_desc, as_, ws["ws_ptr"], b2 if b2 is not None else w2, out, tw, ids, emap, part, sem, *layout,
            h, inter, w2.shape[0], p.e_global, k, t * k, p.num_pid_m, p.nbn,
            as_.stride(0), ws["stride_wse"], ws["stride_wsn"], b2.stride(0) if b2 is not None else 0, out.stride(0),
            tw.stride(0), ids.stride(0), part.stride(0))
    consts = dict(BM=bm, BN=bn, BK=bk, QBN=int(ws["ws_qbn"]), GROUP_M=int(kw["GROUP_M"]), SP=int(kw["SP"]),
                  STAGES=stages, HAS_BIAS=b2 is not None, ON_INPUT=on_input, HAS_MAP=bool(kw["HAS_MAP"]),
                  SKIP_ZERO=bool(kw["SKIP_ZERO"]), INLINE=p.align == "inline", BLOCK_E=int(kw["BLOCK_E"]), num_warps=4,
                  **({"PDL": True, "launch_pdl": True} if pdl else {}))
    if p.w2_gluon_dec == 2:  # the loads in a producer warp, one column tile per program (gluon_dec_value)
        launch(fp8_w2_dec_ws_kernel, (p.num_pid_m * p.nbn,), *args, maxnreg=_FP8_DEC_WS_REGS, **consts)
        return
    nt = max(1, min(p.gluon_nt, p.nbn))
    launch(fp8_w2_dec_kernel, (p.num_pid_m * triton.cdiv(p.nbn, nt),), *args, NT=nt, maxnreg=_FP8_DEC_REGS, **consts)


#: registers per thread of the Gluon fp8 decode w13's 8 warps (the consumer warpgroup, the producer's padded one) by
#: BN: 128 at BN 128 (its 3 ring slots take 113 KB of shared memory: two programs per SM; at 80, ptxas spills), 72 at
#: BN 64 (three per SM where 3 slots, 60 KB, leave room; the consumer raised to 104-120 by setmaxnreg, no spill)
_FP8_DEC13_REGS = {64: 72, 128: 128}
#: shared memory the decode w13's ring and epilogue may take (of the 227 KB an H200 block may): 6 slots at BLOCK_M 16, BN
#: 128 (218 KB; the epilogue's [BM, BN] fp32 layout change takes its own BM · BN · 4 bytes)
_FP8_DEC13_SMEM = 224 * 1024


def fp8_w13_dec_ok(p, q, w1: torch.Tensor, interp: bool) -> bool:
    """The plan asked for the Gluon fp8 decode w13 (w13 config ``"gluon_dec": 1``, :mod:`._gluon.fp8_w13_dec`) and it
    computes the Triton w13's bits here: fp8 block weights with the K step = one scale block (``fp8_acc`` = BK),
    swapped tiles of 64 or 128 weight rows (one weight scale per tile: BN divides the scale block) and 16 token rows
    (with 32 or 64 its six accumulators spill: 88-3008 bytes in ptxas for sm_90), TMA-able weight rows. With the
    plan's ``"pdl"`` it is launched as a programmatic dependent of the input quantiser and requests its first weight
    tiles before its grid wait."""
    if not p.w13_gluon_dec or q is None or q.spec.code != FP8_BLOCK or interp or not _device_ok(w1):
        return False
    return (q.common["FP8_ACC"] == p.bk13 == q.spec.block_k and q.ws13["ws_qbn"] % p.bn13 == 0
            and p.bn13 in (64, 128) and p.bm == 16 and p.w13_kw["SWAP"] and (w1.shape[2] * w1.element_size()) % 16 == 0)


def launch_fp8_w13_dec(launch, p, q, xq, w1, b1, inter_buf, out, tw, ids, emap, sem, layout, h, inter, k, t,
                       w13_kw: dict, pdl: bool = False) -> None:
    """``inter[r] = act(promote(x_q[tok(r)] · W13qᵀ) (+ b13))``, quantised per row of a BN = group tile (``REQ`` 1)
    or rounded (``REQ`` 0), over the decode plan's rows: the inline layout (program 0 also zeroes w2's semaphores and
    the output rows of tokens with no live slot) or, past it, the align kernel's ``layout`` = (counts, row_start,
    sorted). xq: [T, H] e4m3 with ``w13_kw["xs_ptr"]`` [T, cdiv(H, bk)]; ``pdl``: a programmatic dependent launch."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon.fp8_w13_dec import fp8_w13_dec_kernel

    bm, bn, bk = p.bm, p.bn13, p.bk13
    w_desc = TensorDescriptor.from_tensor(w1.view(-1, h), [bn, bk],
                                          gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    ws, kw = q.ws13, w13_kw
    req = int(kw.get("REQ", 0))
    per_slot = (bm + 2 * bn) * bk + 12 * bm  # the row tile, the gate and up tiles, three scales per row
    stages = max(2, min(int(kw["num_stages"]), (_FP8_DEC13_SMEM - 4 * bm * bn) // per_slot))
    launch(fp8_w13_dec_kernel, p.grid13, xq, w_desc, kw["xs_ptr"], ws["ws_ptr"], b1 if b1 is not None else w1,
           inter_buf, kw["is_ptr"] if req else inter_buf, out, ids, tw, emap, sem, *layout,
           h, inter, w1.shape[1], w1.shape[0], p.e_global, k, t, p.nbn, p.num_pid_m, p.limit_arg,
           xq.stride(0), kw["stride_xst"], ws["stride_wse"], ws["stride_wsn"], ws["ws_shard"],
           b1.stride(0) if b1 is not None else 0, inter_buf.stride(0), int(kw.get("stride_isr", 0)), ids.stride(0),
           tw.stride(0), out.stride(0),
           BM=bm, BN=bn, BK=bk, QBN=int(ws["ws_qbn"]), GROUP_M=int(kw["GROUP_M"]), SP=int(kw["SP"]), TP=int(kw["TP"]),
           STAGES=stages, ACT=kw["ACT"], HAS_BIAS=b1 is not None, HAS_LIMIT=kw["HAS_LIMIT"], REQ=req,
           UE8M0=bool(kw.get("UE8M0", False)), HAS_MAP=bool(kw["HAS_MAP"]), SKIP_ZERO=bool(kw["SKIP_ZERO"]),
           COMBINE=bool(kw["COMBINE"]), EVEN_K=bool(kw["EVEN_K"]), INLINE=p.align == "inline",
           BLOCK_E=int(kw["BLOCK_E"]), num_warps=4, maxnreg=_FP8_DEC13_REGS[bn],
           **({"PDL": True, "launch_pdl": True} if pdl else {}))


def fp8_w13_ok(p, q, w1: torch.Tensor, tma: bool, interp: bool) -> bool:
    """As :func:`fp8_w2_ok` for w13 (gated, fused epilogue, the w2 input stored in the params dtype or quantised
    per row of a BN = group tile), with weight rows by TMA (config ``"tma"``)."""
    if not p.w13_gluon or q is None or q.spec.code != FP8_BLOCK or interp or not tma or not _device_ok(w1):
        return False
    kw = p.w13_kw
    return (q.common["FP8_ACC"] == p.bk13 == q.spec.block_k
            and q.ws13["ws_qbn"] % p.bn13 == 0 and p.bm in (64, 128) and not kw["SWAP"] and not kw["INLINE"])


def fp8_w13_ws_coop(bm: int, nc: int) -> bool:
    """The warp-specialised fp8 w13 with two consumers on one 128-row tile (64 rows each, one ring and producer,
    each weight tile loaded once for both): BLOCK_M 128 with ``"gluon_ws": 2``."""
    return bm == 128 and nc == 2


def fp8_w13_ws_stages(bm: int, bn: int, bk: int, nc: int) -> int:
    """Ring slots per ring of the warp-specialised fp8 w13: as many slots (a [BM, BK] and two [BN, BK] fp8
    tiles, three fp32 scales per row) as fit its rings (one per consumer, one shared by two on a 128-row tile:
    :func:`fp8_w13_ws_coop`) in :data:`_FP8_WS_SMEM` (at most :data:`_FP8_WS_MAX_STAGES`)."""
    rings = 1 if fp8_w13_ws_coop(bm, nc) else nc
    return min(_FP8_WS_MAX_STAGES, _FP8_WS_SMEM // (rings * ((bm + 2 * bn) * bk + 12 * bm)))


def fp8_w13_ws_ok(p) -> bool:
    """The plan asks for the warp-specialised fp8 w13 (w13 config ``"gluon_ws"``: its consumer count) and the
    kernel covers the tile: 1 or 2 consumers; BLOCK_M 64 (each consumer its own tiles) or 128 (one 8-warp consumer,
    or two sharing each tile: :func:`fp8_w13_ws_coop`); BN 16-64 (six [64, BN] fp32 tiles per consumer thread fit
    its 232 registers up to BN 64), BK 64 / 128, two ring slots at least. Outside these the one-warpgroup Gluon w13
    runs (:func:`fp8_w13_ok` holds first)."""
    nc, bm, bn, bk = p.gluon_ws[0], p.bm, p.bn13, p.bk13
    return (nc in (1, 2) and bm in (64, 128) and bn in (16, 32, 64) and bk in (64, 128)
            and fp8_w13_ws_stages(bm, bn, bk, nc) >= 2)


def fp8_w13_ws_rows_ok(h: int) -> bool:
    """The warp-specialised fp8 w13 loads its sorted rows by TMA: their stride (H bytes) must be a multiple of
    16. Elsewhere the one-warpgroup Gluon w13 runs (a documented limit of the ``"gluon_ws"`` form, as
    :func:`fp8_w13_ws_ok`'s)."""
    return h % 16 == 0


def launch_block_table(launch, p, counts, row_start, blk, e_local: int) -> None:
    """``blk[b]`` = the expert of row block ``b`` (``E_local`` past the last), for the persistent kernels
    (:func:`._triton.align.block_expert_kernel`; after the align kernel, on the device: graph-safe)."""
    from ._triton.align import block_expert_kernel

    block_e = int(p.w13_kw["BLOCK_E"])
    block_b = max(16, min(256, 8192 // block_e))  # a [BLOCK_B, BLOCK_E] comparison per program
    launch(block_expert_kernel, (triton.cdiv(p.num_pid_m, block_b),), counts, row_start, blk, p.num_pid_m, e_local,
           BM=p.bm, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=4)


def launch_fp8_w13(launch, p, q, xq, w1, b1, inter_buf, out, counts, row_start, sorted_slot, blk, h, inter, k,
                   w13_kw: dict, sorted_rows: bool) -> bool:
    """``inter[r] = act(promote(x_q[tok(r)] · W13qᵀ) (+ b13))``, rounded or quantised (``w13_kw["REQ"]`` 0 / 1).
    ``sorted_rows`` (:func:`fp8_w13_ws_ok` and :func:`fp8_w13_ws_rows_ok` held, and the input quantiser wrote
    ``xq`` in the sorted rows, its scales transposed): the block -> expert table into ``blk`` ([num_pid_m] int32),
    then the warp-specialised kernel, one program per SM at most. Returns whether it wrote ``blk``."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon.fp8_w13 import fp8_w13_kernel
    from ._gluon.fp8_w13_ws import fp8_w13_ws_kernel

    bm, bn, bk = p.bm, p.bn13, p.bk13
    w_desc = TensorDescriptor.from_tensor(w1.view(-1, h), [bn, bk],
                                          gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    ws = q.ws13
    req = int(w13_kw.get("REQ", 0))
    # the arguments both kernels take: after the rows' operand (x_q and its descriptor), ...
    bufs = (w13_kw["xs_ptr"], ws["ws_ptr"], b1 if b1 is not None else w1, inter_buf,
            w13_kw["is_ptr"] if req else inter_buf, out, counts, row_start)
    sizes = (h, inter, w1.shape[1], w1.shape[0])
    # ... and after the rows' strides
    strides = (ws["stride_wse"], ws["stride_wsn"], ws["ws_shard"], b1.stride(0) if b1 is not None else 0,
               inter_buf.stride(0), int(w13_kw.get("stride_isr", 0)))
    const = dict(BM=bm, BN=bn, BK=bk, QBN=int(ws["ws_qbn"]), GROUP_M=int(w13_kw["GROUP_M"]), ACT=w13_kw["ACT"],
                 HAS_BIAS=b1 is not None, HAS_LIMIT=w13_kw["HAS_LIMIT"], REQ=req,
                 UE8M0=bool(w13_kw.get("UE8M0", False)))
    if sorted_rows:  # TMA zero-fills past H; each tile's expert comes from the table
        nc = p.gluon_ws[0]
        launch_block_table(launch, p, counts, row_start, blk, w1.shape[0])
        a_desc = TensorDescriptor.from_tensor(xq, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk],
                                                                                                 gl.float8e4nv))
        grid = (min(p.grid13[0], _sm_count(xq.device.index)),)
        warps = 4 if fp8_w13_ws_coop(bm, nc) else bm // 16  # coop: the default partition is one 64-row consumer
        launch(fp8_w13_ws_kernel, grid, a_desc, w_desc, *bufs, blk, *sizes, p.num_pid_m, p.limit_arg,
               w13_kw["stride_xst"], *strides, STAGES=fp8_w13_ws_stages(bm, bn, bk, nc), NC=nc, num_warps=warps,
               **const)
        return True
    stages = max(2, min(int(w13_kw["num_stages"]), (200 * 1024) // ((bm + 2 * bn) * bk)))
    launch(fp8_w13_kernel, p.grid13, xq, w_desc, *bufs, sorted_slot, *sizes, k, p.num_pid_m, p.limit_arg,
           xq.stride(0), w13_kw["stride_xst"], *strides, BLOCK_E=w13_kw["BLOCK_E"], EVEN_K=w13_kw["EVEN_K"],
           STAGES=stages, STACK=p.gluon_stack, num_warps=bm // 16, **const)
    return False


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (the persistent kernels' program count)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
