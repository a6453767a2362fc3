"""Launchers of the Gluon 4-bit GEMMs (mxfp4, int4 groups) inside :func:`.triton_experts.fused_experts_impl`.

The 4-bit kernels come in three forms, all with the Triton kernels' bits: decoded into shared memory
(:mod:`._gluon.w4`, ``"gluon": 1``), and for swapped tiles the decoded weights as the wgmma's register operand
(:mod:`._gluon.w4_rega`, ``"gluon_rega": 1``: the H200 4-bit table's decode buckets and, with 64 / 128 token rows,
its compute-bound ones) or a warp-specialised, persistent
form (:mod:`._gluon.w4_ws`, ``"gluon_ws": slots``: one program per SM, measured slower, in no table).

As every Gluon kernel (:mod:`.gluon_experts`), each runs only where the config asks for it and it computes the
Triton kernel's bits (:func:`w4_ok`); the device checks are :mod:`.gluon_experts`' (looked up there at each call).
"""

from __future__ import annotations

import functools

import torch

from . import gluon_experts as _gx

#: the weight-only 4-bit formats' codes (:class:`.triton_experts_quant.QuantSpec`)
MXFP4, INT4 = 3, 4
#: shared memory a Gluon 4-bit program may take for three, two or one programs per SM
_SMEM_THREE, _SMEM_TWO, _SMEM_ONE = 74 * 1024, 112 * 1024, 224 * 1024
#: ring slots at most (more were slower on the H200: docs/kernels.md round 10)
_W4_MAX_STAGES = 6


def _w4_stages(fixed: int, per_stage: int, two: bool) -> int:
    """Ring slots of a Gluon 4-bit kernel: three programs per SM with 3 slots when they fit and not ``two`` (one
    decoded tile in flight), else as many slots as fit two programs per SM if 3 do, else one program per SM."""
    if not two and fixed + 3 * per_stage <= _SMEM_THREE:
        return 3
    n = (_SMEM_TWO - fixed) // per_stage
    return max(2, min(_W4_MAX_STAGES, n if n >= 3 else (_SMEM_ONE - fixed) // per_stage))


def w4_ok(p, q, which: str, w: torch.Tensor, x: torch.Tensor, interp: bool) -> bool:
    """The plan asked for the Gluon 4-bit ``which`` ("w13" / "w2") and it computes the Triton kernel's bits here:
    mxfp4 or int4 with bf16 scales (the packed-bf16 decode of the Triton kernels, ``PTX``), bf16 activations,
    whole groups per K step, packed rows that start 16-byte aligned, wgmma-shaped tiles (the weight rows on the M
    side when swapped: BN 64 / 128; else BLOCK_M 64 / 128); w13 gated, fused and without the weight on the input."""
    want = p.w13_gluon if which == "w13" else p.w2_gluon
    if not want or q is None or q.spec.code not in (MXFP4, INT4) or interp or not _gx._device_ok(w):
        return False
    kw = p.w13_kw if which == "w13" else p.w2_kw
    if x.dtype != torch.bfloat16 or not q.common["PTX"] or (which == "w13" and kw["ON_INPUT"]):
        return False
    ws = (q.ws13 if which == "w13" else q.ws2)["ws_ptr"]
    if q.spec.code == INT4 and ws.dtype != torch.bfloat16:
        return False
    g, bk, bm, bn = q.spec.block_k, kw["BK"], p.bm, kw["BN"]
    k_len = w.shape[2] * q.pack
    row_bytes = w.shape[2] * w.element_size()
    if kw["SWAP"]:  # 128 token rows: the register-operand form only (:data:`_REGA_MAX_BM`)
        rega = p.gluon_rega[0 if which == "w13" else 1]
        shape_ok = bn in (64, 128) and (bm in (16, 32, 64) or (bm == 128 and rega))
    else:  # w13's two [BM, BN] accumulators: BN <= BM (BLOCK_M 64 with BN 128 spills)
        shape_ok = bm in (64, 128) and 16 <= bn <= (bm if which == "w13" else 256)
    return (shape_ok and bk % g == 0 and bk in (64, 128) and k_len % 8 == 0 and row_bytes % 16 == 0
            and w.is_contiguous() and w.data_ptr() % 16 == 0 and ws.is_contiguous()
            and _form_ok(p, which, q.spec.relaid))


def _ws_smem(which: str, bm: int, bn: int, bk: int, stages: int, d: int) -> int:
    """Shared memory of a warp-specialised Gluon 4-bit kernel in bytes: the token-row ring, ``d`` decoded slots and
    the two decoders' packed rings."""
    tiles = 2 if which == "w13" else 1
    return stages * bm * bk * 2 + d * tiles * bn * bk * 2 + 2 * stages * tiles * bn * bk // 2


def _w4_smem(which: str, bm: int, bn: int, bk: int, wbuf: int) -> tuple[int, int]:
    """Shared memory of a Gluon 4-bit kernel in bytes: (decoded bf16 weight tiles, one ring slot: activation rows
    + packed weights at half a byte per weight); ``wbuf`` 0: none decoded (the register-operand form)."""
    tiles = 2 if which == "w13" else 1  # gate and up
    return tiles * wbuf * bn * bk * 2, bm * bk * 2 + tiles * bn * bk // 2


#: the register-operand form's token rows per tile at most (the wgmma's N side; 128: w13 runs gate, then up, one
#: fragment live). Round 14 capped it at 32 after BLOCK_M 64 gave wrong rows: the kernels then wrote the registers of
#: an in-flight wgmma's A fragment (round 15, docs/kernels.md), fixed since
_REGA_MAX_BM = 128


def _form_ok(p, which: str, relaid: bool = False) -> bool:
    """The asked form's own limits (``relaid``: the packed words in :mod:`.w4_layout`'s layout, which only the
    register-operand kernels read). Register operand (:mod:`._gluon.w4_rega`): swapped tiles of at most
    :data:`_REGA_MAX_BM` token rows, not with ``gluon_ws``. Warp-specialised (:mod:`._gluon.w4_ws`): swapped BN 64
    tiles (one warpgroup per partition: BN 128's eight-warp partitions spill), 2-8 decoded slots. Every form: its
    rings in one program's shared memory."""
    i = 0 if which == "w13" else 1
    kw, d = (p.w13_kw if i == 0 else p.w2_kw), p.gluon_ws[i]
    bm, bn, bk, swap = p.bm, kw["BN"], kw["BK"], bool(kw["SWAP"])
    if relaid and not p.gluon_rega[i]:  # re-laid words: the register-operand form (and the Triton kernels) only
        return False
    if p.gluon_rega[i]:
        fixed, per_stage = _w4_smem(which, bm, bn, bk, 0)
        return swap and bm <= _REGA_MAX_BM and not d and fixed + 2 * per_stage <= _SMEM_ONE
    if d:
        return swap and bn == 64 and 2 <= d <= 8 and _ws_smem(which, bm, bn, bk, _WS_STAGES, d) <= _SMEM_ONE
    fixed, per_stage = _w4_smem(which, bm, bn, bk, p.gluon_wbuf[i])
    return fixed + 2 * per_stage <= _SMEM_ONE


#: packed / token-row ring slots of the warp-specialised 4-bit kernels (each decoder and the MMA partition)
_WS_STAGES = 3
#: registers per decoder thread: an even share of the SM's 64 K for one program of three 4-warp partitions
_WS_DEC_REGS = 160


@functools.lru_cache(maxsize=2)
def _w4_kernels(which: str) -> tuple:
    """(shared-memory, register-operand, warp-specialised) Gluon 4-bit kernels of ``which``: imported once, on the
    first call (the modules need Gluon, which :func:`.gluon_experts.gluon_available` checks first)."""
    from ._gluon import w4, w4_rega, w4_ws

    if which == "w13":
        return w4.w4_w13_kernel, w4_rega.w4ra_w13_kernel, w4_ws.w4ws_w13_kernel
    return w4.w4_w2_sum_kernel, w4_rega.w4ra_w2_sum_kernel, w4_ws.w4ws_w2_sum_kernel


def _launch_w4(launch, kernels: tuple, p, q, which: str, grid: tuple, device: torch.device, args: tuple,
               epilogue: dict) -> None:
    """Launch the asked form of a Gluon 4-bit GEMM (``kernels``: its shared-memory, register-operand and
    warp-specialised kernels, which take the same ``args``): its tiles, format and warps (one warpgroup per 64
    rows of the wgmma's M side), then the form's own ring slots and keys; the warp-specialised form is persistent,
    one program per SM at most."""
    i = 0 if which == "w13" else 1
    kw = p.w13_kw if i == 0 else p.w2_kw
    bm, bn, bk, swap = p.bm, kw["BN"], kw["BK"], bool(kw["SWAP"])
    const = dict(BM=bm, BN=bn, BK=bk, G=q.spec.block_k, QUANT=q.spec.code, GROUP_M=int(kw["GROUP_M"]),
                 BLOCK_E=kw["BLOCK_E"], num_warps=(bn if swap else bm) // 16, **epilogue)
    smem_kernel, rega_kernel, ws_kernel = kernels
    if p.gluon_rega[i]:
        stages = p.gluon_stages[i] or _w4_stages(*_w4_smem(which, bm, bn, bk, 0), two=False)
        serial = dict(SERIAL=p.gluon_rega[i] == 2) if which == "w13" else {}
        ws = (q.ws13 if i == 0 else q.ws2)["ws_ptr"]
        # mxfp4, whole K steps of four groups, scale rows of whole 4-byte words: a row's step scales as one u32
        sword = (q.spec.code == MXFP4 and kw["EVEN_K"] and bk // q.spec.block_k == 4 and ws.stride(1) % 4 == 0
                 and ws.data_ptr() % 4 == 0)
        regs = {"maxnreg": p.gluon_maxnreg[i]} if p.gluon_maxnreg[i] else {}
        launch(rega_kernel, grid, *args, STAGES=stages, SWORD=sword, EARLY=p.gluon_early[i], RELAID=q.spec.relaid,
               **serial, **regs, **const)
    elif p.gluon_ws[i]:
        launch(ws_kernel, (min(grid[0], _gx._sm_count(device.index)),), *args, STAGES=_WS_STAGES, D=p.gluon_ws[i],
               DEC_REGS=_WS_DEC_REGS, **const)
    else:
        wbuf = p.gluon_wbuf[i]
        stages = p.gluon_stages[i] or _w4_stages(*_w4_smem(which, bm, bn, bk, wbuf), two=wbuf == 2)
        launch(smem_kernel, grid, *args, STAGES=stages, SWAP=swap, WBUF=wbuf, **const)


def launch_w4_w13(launch, p, q, x, w1, b1, inter_buf, counts, row_start, sorted_slot, h, inter, k) -> None:
    """``inter[r] = act(x[tok(r)] · decode(W13)ᵀ (+ b13))`` rounded to bf16 (:func:`._gluon.w4.w4_w13_kernel`, or
    the register-operand / warp-specialised form the plan asks for)."""
    kw, ws = p.w13_kw, q.ws13
    args = (x, w1, ws["ws_ptr"], b1 if b1 is not None else x, inter_buf, counts, row_start, sorted_slot, h, inter,
            w1.shape[0], k, p.num_pid_m, p.limit_arg, x.stride(0), w1.stride(0), w1.stride(1), ws["stride_wse"],
            ws["stride_wsn"], b1.stride(0) if b1 is not None else 0, inter_buf.stride(0))
    _launch_w4(launch, _w4_kernels("w13"), p, q, "w13", p.grid13, x.device, args,
               dict(ACT=kw["ACT"], HAS_BIAS=b1 is not None, HAS_LIMIT=kw["HAS_LIMIT"], EVEN_K=kw["EVEN_K"]))


def launch_w4_w2_sum(launch, p, q, inter_buf, w2, b2, tw, counts, row_start, sorted_slot, part, h, inter, k,
                     on_input: bool) -> None:
    """``part[slot] = (inter[r] · decode(W2)ᵀ (+ b2)) (· w)`` rounded to bf16 (:func:`._gluon.w4.w4_w2_sum_kernel`,
    or the form the plan asks for): the SUM_PASS w2."""
    kw, ws = p.w2_kw, q.ws2
    args = (inter_buf, w2, ws["ws_ptr"], b2 if b2 is not None else inter_buf, tw, counts, row_start, sorted_slot,
            part, h, inter, w2.shape[0], k, p.num_pid_m, p.nbn, inter_buf.stride(0), w2.stride(0), w2.stride(1),
            ws["stride_wse"], ws["stride_wsn"], b2.stride(0) if b2 is not None else 0, tw.stride(0), part.stride(0))
    _launch_w4(launch, _w4_kernels("w2"), p, q, "w2", p.grid2, inter_buf.device, args,
               dict(HAS_BIAS=b2 is not None, ON_INPUT=on_input, EVEN_K=kw["EVEN_K"]))
