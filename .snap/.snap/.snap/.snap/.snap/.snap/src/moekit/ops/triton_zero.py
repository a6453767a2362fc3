"""Triton zero experts and output combination: the Triton kernel table's ``zero_slots`` and ``zero_combine``
(math and torch twins in :mod:`.zero_experts`, which these match bit for bit).

    zero_slots_triton   -> torch.ops.moekit.zero_slots (custom op)   -> zero_slots_impl   -> zero_slots_kernel
    zero_combine_triton -> torch.ops.moekit.zero_combine (custom op) -> zero_combine_impl -> zero_combine_kernel

One launch each, where the twins run ~8 and ~4 small torch kernels (LongCat-Flash's decode: H200 round 36). Inputs are
validated by the callers (the router and the runner); unit-stride rows are made here.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ._device import KERNEL_OPTIONS, interpreting
from ._eager import direct_call_ok, unit_rows
from ._triton.zero import zero_combine_kernel, zero_slots_kernel

#: columns per program
ZERO_BH = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def zero_slots_triton(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`.zero_experts.zero_slots_torch` on Triton: ``(masked weights [T, K] float32, masked ids [T, K],
    s [T] float32)``."""
    fn = zero_slots_impl if direct_call_ok(topk_weights) else zero_slots_op
    return fn(_rows(topk_weights), _rows(topk_ids), int(num_experts))


@torch.library.custom_op("moekit::zero_slots", mutates_args=())
def zero_slots_op(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.library`` op around :func:`zero_slots_impl` (torch.compile traces it, CUDA graphs capture it)."""
    return zero_slots_impl(*unit_rows(topk_weights, topk_ids), num_experts)


@zero_slots_op.register_fake
def _zero_slots_fake(topk_weights, topk_ids, num_experts):
    c = torch.contiguous_format  # what the launcher returns, whatever the inputs' strides
    return (torch.empty_like(topk_weights, dtype=torch.float32, memory_format=c),
            torch.empty_like(topk_ids, memory_format=c),
            topk_weights.new_empty(topk_weights.shape[:1], dtype=torch.float32))


def zero_slots_impl(w, ids, num_experts):
    t, k = w.shape
    w_out = torch.empty(t, k, dtype=torch.float32, device=w.device)
    ids_out = torch.empty_like(ids, memory_format=torch.contiguous_format)
    s = torch.empty(t, dtype=torch.float32, device=w.device)
    if t == 0:
        return w_out, ids_out, s
    zero_slots_kernel[(t,)](
        w, ids, w_out, ids_out, s, k, num_experts, w.stride(0), ids.stride(0), w_out.stride(0), ids_out.stride(0),
        KP=triton.next_power_of_2(k), num_warps=1, **KERNEL_OPTIONS)
    return w_out, ids_out, s


def zero_combine_triton(routed: torch.Tensor, x: torch.Tensor | None, zero_scale: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """:func:`.zero_experts.zero_combine_torch` on Triton: ``((routed + x · zero_scale) · scale)`` rounded once."""
    fn = zero_combine_impl if direct_call_ok(routed) else zero_combine_op
    if zero_scale is None:
        return fn(_rows(routed), None, None, float(scale))
    return fn(_rows(routed), _rows(x), zero_scale.contiguous(), float(scale))


@torch.library.custom_op("moekit::zero_combine", mutates_args=())
def zero_combine_op(routed: torch.Tensor, x: Optional[torch.Tensor], zero_scale: Optional[torch.Tensor],
                    scale: float) -> torch.Tensor:
    """``torch.library`` op around :func:`zero_combine_impl`."""
    return zero_combine_impl(*unit_rows(routed, x, zero_scale), scale)


@zero_combine_op.register_fake
def _zero_combine_fake(routed, x, zero_scale, scale):
    return torch.empty_like(routed, memory_format=torch.contiguous_format)


#: the combination's launch options: no fp fusion, so ``routed + x · s`` rounds the product first, as the twin does
_COMBINE_OPTIONS = {**KERNEL_OPTIONS, "enable_fp_fusion": False}


def zero_combine_impl(routed, x, zero_scale, scale):
    t, h = routed.shape
    out = torch.empty(t, h, dtype=routed.dtype, device=routed.device)
    if t == 0:
        return out
    bh = min(ZERO_BH, triton.next_power_of_2(max(h, 1)))
    has_zero = zero_scale is not None
    xr, s = (x, zero_scale) if has_zero else (routed, routed)
    zero_combine_kernel[(t, triton.cdiv(h, bh))](
        routed, xr, s, out, h, scale, routed.stride(0), xr.stride(0), out.stride(0), HAS_ZERO=has_zero, BH=bh,
        INTERP=interpreting(), num_warps=4, **_COMBINE_OPTIONS)
    return out
