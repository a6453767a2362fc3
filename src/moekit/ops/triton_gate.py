"""The router gate on Triton (:mod:`._triton.gate`): ``logits = x · Wᵀ (+ b)``, float32 sums, batch invariant.

    router_gate_triton -> torch.ops.moekit.router_gate (custom op, registered here) -> router_gate_impl -> gate_kernel

Against cuBLAS (``F.linear``) it gives up a little speed at large T (H200, DeepSeek-V3's gate 7168 -> 256;
numbers in docs/kernels.md) for two properties: a row's logits are the same bits whatever else is in the
batch (the tile shapes change with T, the H loop's step and order never do), so a layer's internal bucket
graphs may hold the gate (:mod:`moekit.experts.graphed_plan`); and float32 logits of bf16 operands come
without upcast copies (one launch, or two when H is cut into chunks: :func:`gate_chunks`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ._device import KERNEL_OPTIONS, interpreting
from ._eager import direct_call_ok, unit_rows
from ._triton.gate import gate_kernel, gate_sum_kernel
from .grad import wants_grad

#: the H step of every gate launch and the columns of one chunk of H (fixed: the order of a row's sums, SPEC §9)
GATE_BK = 64
GATE_KS = 1024
#: rows per launch pair when H is cut into chunks (their fp32 partials: S x GATE_ROWS x N x 4 bytes, e.g. 470 MB
#: for DeepSeek-V3's gate)
GATE_ROWS = 65536
_HALF = (torch.bfloat16, torch.float16)


def router_gate_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: [T, H] float; weight: [N, H] float; bias: [N] float or None -> [T, N] ``out_dtype`` (validated by
    the caller: same device, matching widths). The ``moekit::router_gate`` custom op when traced or when autograd
    tracks the call (the op's backward: :func:`_gate_backward`)."""
    fn = router_gate_impl if direct_call_ok(x) and not wants_grad(x, weight, bias) else router_gate_op
    return fn(x if x.stride(-1) == 1 else x.contiguous(), weight if weight.stride(-1) == 1 else weight.contiguous(),
              bias if bias is None or bias.is_contiguous() else bias.contiguous(), out_dtype)  # (round 65: a strided
    # bias was read with unit stride on the direct path: inference, the experts chosen wrong)


@torch.library.custom_op("moekit::router_gate", mutates_args=())
def router_gate_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``torch.library`` op around :func:`router_gate_impl` (torch.compile traces it, CUDA graphs capture it)."""
    return router_gate_impl(*unit_rows(x, weight, bias), out_dtype)


@router_gate_op.register_fake
def _router_gate_fake(x, weight, bias, out_dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


def _gate_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gate_backward(ctx, grad):
    """The kernel has no backward of its own (round 59; before, the op had none: under autograd the router of every
    Triton layer got no gradient): ``F.linear``'s on operands cast to the output dtype, as the torch gate computes it
    (``F.linear(x.float(), w.float(), b.float())`` for float32 logits of bf16 operands): dx = dy · W,
    dW = dyᵀ · x (the GEMM F.linear's backward runs; round 65: (xᵀ · dy)ᵀ sums in another order on an AMD CPU),
    db = Σ_t dy, each cast back to its operand's dtype. grad: [T, N] out_dtype."""
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = grad.mm(weight.to(grad.dtype)).to(x.dtype) if need[0] else None
    dw = grad.t().mm(x.to(grad.dtype)).to(weight.dtype) if need[1] else None  # (F.linear's order: round 65)
    db = grad.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
    return dx, dw, db, None


router_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


def router_gate_impl(x, weight, bias, out_dtype):
    """Launch the gate kernel(s) (rows of unit column stride): one GEMM pass, or ``S`` chunks of H into fp32
    partials and the chunk-order sum (:func:`gate_chunks`), over at most ``GATE_ROWS`` rows at a time (the
    partials' memory stays bounded on huge batches; a row's bits do not depend on the others)."""
    t, h = x.shape
    n = weight.shape[0]
    out = torch.empty(t, n, dtype=out_dtype, device=x.device)
    if t == 0 or n == 0:
        return out
    splits = gate_chunks(h)
    ieee = not (x.dtype == weight.dtype and x.dtype in _HALF)
    interp = interpreting()
    part = None if splits == 1 else torch.empty(splits, min(t, GATE_ROWS), n, dtype=torch.float32, device=x.device)
    b = bias if bias is not None else weight
    step = GATE_ROWS if splits > 1 else t
    for r0 in range(0, t, step):
        rows = min(t - r0, step)
        xr, yr = x[r0:r0 + rows], out[r0:r0 + rows]
        dst = yr if splits == 1 else part
        bm, bn = _tiles(rows)
        gate_kernel[(triton.cdiv(rows, bm), triton.cdiv(n, bn), splits)](
            xr, weight, b, dst, rows, n, h, GATE_KS, xr.stride(0), weight.stride(0),
            dst.stride(0) if splits > 1 else 0, dst.stride(-2), BM=bm, BN=bn, BK=GATE_BK,
            HAS_BIAS=bias is not None and splits == 1, IEEE=ieee, INTERP=interp, num_warps=4, num_stages=3,
            **KERNEL_OPTIONS,
        )
        if splits > 1:
            br = min(256, triton.next_power_of_2(n))
            gate_sum_kernel[(rows, triton.cdiv(n, br))](
                part, b, yr, n, splits, part.stride(0), part.stride(1), yr.stride(0),
                BN=br, HAS_BIAS=bias is not None, INTERP=interp, num_warps=1 if br <= 128 else 2, **KERNEL_OPTIONS,
            )
    return out


def gate_chunks(h: int) -> int:
    """S: H in ``S`` chunks of ``GATE_KS`` columns (the last shorter); a function of H alone (the order of a
    row's sums may not depend on T). At decode the chunks multiply the programs reading the weight:
    DeepSeek-V3's 7168 -> 256 at T = 1 runs 16 x 7 programs of 1024 columns instead of 16 of 7168."""
    return triton.cdiv(h, GATE_KS)


def _tiles(t: int) -> tuple[int, int]:
    """(BM, BN) by T: small tiles while few rows (more programs reading the weight at decode)."""
    if t <= 16:
        return 16, 16
    if t <= 64:
        return (32 if t <= 32 else 64), 16
    return 64, 32
