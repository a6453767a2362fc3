"""Launchers of the Gluon kernels (:mod:`._gluon`) inside :func:`.triton_experts.fused_experts_impl`.

A Gluon kernel replaces a Triton kernel only where it computes the same bits (its module says how) and only
when the config asks for it (``cfg["w13"]["gluon"] = 1``, ``cfg["w2"]["gluon"] = 1``), like ``"tma"``: on CPU,
under the interpreter, on a GPU other than an NVIDIA sm_90 (Hopper: wgmma), without Gluon, or for tiles it does
not cover (:func:`fp8_w13_ok`, :func:`fp8_w2_ok`), the Triton kernel runs. Its warps follow its tile: BLOCK_M / 16
(one warpgroup per 64 rows). The tuner and the GPU tests compare the two bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

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


def launch_fp8_w2_sum(launch, p, q, inter_q, as_, w2, b2, tw, counts, row_start, sorted_slot, part, h, inter, k,
                      on_input: bool) -> None:
    """``part[slot] = (Σ_k promote(x_q · Wqᵀ)) (+ b2) (· w)`` for every live slot row: the SUM_PASS w2.
    inter_q: [rows, I] e4m3; as_: [rows, cdiv(I, bk)] fp32 (w2's input scales); the rest as the Triton w2."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon.fp8_w2 import fp8_w2_sum_kernel

    bm, bn, bk = p.bm, p.bn2, p.bk2
    e_local = w2.shape[0]
    a_desc = TensorDescriptor.from_tensor(inter_q, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk],
                                                                                                 gl.float8e4nv))
    w_desc = TensorDescriptor.from_tensor(w2.view(-1, inter), [bn, bk],
                                          gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    ws = q.ws2
    stages = max(2, min(int(p.w2_kw["num_stages"]), (200 * 1024) // ((bm + bn) * bk)))
    launch(fp8_w2_sum_kernel, p.grid2, a_desc, w_desc, as_, ws["ws_ptr"], b2 if b2 is not None else w2, tw, counts,
           row_start, sorted_slot, part, h, inter, e_local, k, p.num_pid_m, p.nbn,
           as_.stride(0), ws["stride_wse"], ws["stride_wsn"], b2.stride(0) if b2 is not None else 0, tw.stride(0),
           part.stride(0), BM=bm, BN=bn, BK=bk, QBN=int(ws["ws_qbn"]), GROUP_M=int(p.w2_kw["GROUP_M"]),
           BLOCK_E=p.w2_kw["BLOCK_E"], STAGES=stages, HAS_BIAS=b2 is not None, ON_INPUT=on_input,
           num_warps=bm // 16)


def fp8_w13_ok(p, q, w1: torch.Tensor, tma: bool, interp: bool) -> bool:
    """As :func:`fp8_w2_ok` for w13 (gated, fused epilogue, the w2 input stored in the params dtype or quantised
    per row of a BN = group tile), with weight rows by TMA (config ``"tma"``)."""
    if not p.w13_gluon or q is None or q.spec.code != FP8_BLOCK or interp or not tma or not _device_ok(w1):
        return False
    kw = p.w13_kw
    return (q.common["FP8_ACC"] == p.bk13 == q.spec.block_k
            and q.ws13["ws_qbn"] % p.bn13 == 0 and p.bm in (64, 128) and not kw["SWAP"] and not kw["INLINE"])


def launch_fp8_w13(launch, p, q, xq, w1, b1, inter_buf, out, counts, row_start, sorted_slot, h, inter, k,
                   w13_kw: dict) -> None:
    """``inter[r] = act(promote(x_q[tok(r)] · W13qᵀ) (+ b13))``, rounded or quantised (``w13_kw["REQ"]`` 0 / 1)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gluon.fp8_w13 import fp8_w13_kernel

    bm, bn, bk = p.bm, p.bn13, p.bk13
    w_desc = TensorDescriptor.from_tensor(w1.view(-1, h), [bn, bk],
                                          gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    ws = q.ws13
    req = int(w13_kw.get("REQ", 0))
    is_ = w13_kw["is_ptr"] if req else inter_buf
    stages = max(2, min(int(w13_kw["num_stages"]), (200 * 1024) // ((bm + 2 * bn) * bk)))
    launch(fp8_w13_kernel, p.grid13, xq, w_desc, w13_kw["xs_ptr"], ws["ws_ptr"], b1 if b1 is not None else w1,
           inter_buf, is_, out, counts, row_start, sorted_slot, h, inter, w1.shape[1], w1.shape[0], k, p.num_pid_m,
           p.limit_arg, xq.stride(0), w13_kw["stride_xst"], ws["stride_wse"], ws["stride_wsn"], ws["ws_shard"],
           b1.stride(0) if b1 is not None else 0, inter_buf.stride(0), int(w13_kw.get("stride_isr", 0)),
           BM=bm, BN=bn, BK=bk, QBN=int(ws["ws_qbn"]), GROUP_M=int(w13_kw["GROUP_M"]), BLOCK_E=w13_kw["BLOCK_E"],
           STAGES=stages, ACT=w13_kw["ACT"], HAS_BIAS=b1 is not None, HAS_LIMIT=w13_kw["HAS_LIMIT"],
           EVEN_K=w13_kw["EVEN_K"], REQ=req, UE8M0=bool(w13_kw.get("UE8M0", False)), num_warps=bm // 16)
