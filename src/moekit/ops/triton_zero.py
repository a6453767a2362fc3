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


def zero_slots_triton(hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`.zero_experts.zero_slots_torch` on Triton: ``(masked weights [T, K] float32, masked ids [T, K],
    zero [T, H] float32)``."""
    fn = zero_slots_impl if direct_call_ok(hidden_states) else zero_slots_op
    return fn(_rows(hidden_states), _rows(topk_weights), _rows(topk_ids), int(num_experts))


@torch.library.custom_op("moekit::zero_slots", mutates_args=())
def zero_slots_op(hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.library`` op around :func:`zero_slots_impl` (torch.compile traces it, CUDA graphs capture it)."""
    return zero_slots_impl(*unit_rows(hidden_states, topk_weights, topk_ids), num_experts)


@zero_slots_op.register_fake
def _zero_slots_fake(hidden_states, topk_weights, topk_ids, num_experts):
    c = torch.contiguous_format  # what the launcher returns, whatever the inputs' strides
    return (torch.empty_like(topk_weights, dtype=torch.float32, memory_format=c),
            torch.empty_like(topk_ids, memory_format=c),
            hidden_states.new_empty(hidden_states.shape, dtype=torch.float32))


def zero_slots_impl(x, w, ids, num_experts):
    t, h = x.shape
    k = w.shape[1]
    w_out = torch.empty(t, k, dtype=torch.float32, device=w.device)
    ids_out = torch.empty_like(ids, memory_format=torch.contiguous_format)
    zero = torch.empty(t, h, dtype=torch.float32, device=x.device)
    if t == 0:
        return w_out, ids_out, zero
    bh = min(ZERO_BH, triton.next_power_of_2(max(h, 1)))
    zero_slots_kernel[(t, triton.cdiv(h, bh))](
        x, w, ids, w_out, ids_out, zero, h, k, num_experts, x.stride(0), w.stride(0), ids.stride(0),
        w_out.stride(0), ids_out.stride(0), zero.stride(0), KP=triton.next_power_of_2(k), BH=bh, num_warps=4,
        **KERNEL_OPTIONS)
    return w_out, ids_out, zero


def zero_combine_triton(routed: torch.Tensor, zero: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`.zero_experts.zero_combine_torch` on Triton: ``((routed + zero) · scale)`` rounded once."""
    fn = zero_combine_impl if direct_call_ok(routed) else zero_combine_op
    return fn(_rows(routed), None if zero is None else _rows(zero), float(scale))


@torch.library.custom_op("moekit::zero_combine", mutates_args=())
def zero_combine_op(routed: torch.Tensor, zero: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``torch.library`` op around :func:`zero_combine_impl`."""
    return zero_combine_impl(*unit_rows(routed, zero), scale)


@zero_combine_op.register_fake
def _zero_combine_fake(routed, zero, scale):
    return torch.empty_like(routed, memory_format=torch.contiguous_format)


def zero_combine_impl(routed, zero, scale):
    t, h = routed.shape
    out = torch.empty(t, h, dtype=routed.dtype, device=routed.device)
    if t == 0:
        return out
    bh = min(ZERO_BH, triton.next_power_of_2(max(h, 1)))
    z = zero if zero is not None else routed
    zero_combine_kernel[(t, triton.cdiv(h, bh))](
        routed, z, out, h, scale, routed.stride(0), z.stride(0), out.stride(0), HAS_ZERO=zero is not None, BH=bh,
        INTERP=interpreting(), num_warps=4, **KERNEL_OPTIONS)
    return out
