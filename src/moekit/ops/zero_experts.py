"""Zero (identity) experts of LongCat-Flash, and the routed output's final combination.

``s[t] = Σ_{j: ids[t, j] >= E} w[t, j]`` (float32, summed in slot order j = 0, 1, ..., K - 1), and the zero
slots are rewritten to ``id 0, weight 0.0`` so the expert kernels never see an id ``>= E``. The zero-expert
contribution ``zero[t] = x[t] · s[t]`` (float32) is never kept: the runner computes it inside the final
combination, rounding once: ``out[t] = ((routed[t] + x[t] · s[t]) · routed_scaling_factor)`` in float32 (the product
rounded to float32 before the add, no fused multiply-add), cast to the routed dtype. So a layer with zero experts keeps
``[T]`` floats for them, not ``[T, H]``; the Triton kernel writes the output in one pass, the torch twin runs in row
blocks whose float32 temporaries stay under :data:`COMBINE_WORKSPACE_BYTES`.

The functions here are the torch twins (the CPU path and the oracle) of the Triton kernels in
:mod:`moekit.ops._triton.zero`, which give the same bits.
"""

from __future__ import annotations

import torch

from ._eager import rounded
from .activation import acc_dtype

ZERO_EXPERT_TYPES = ("identity",)


def zero_scale_torch(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_weights: [T, K] float32; topk_ids: [T, K] int -> s: [T] float32, the zero slots' weights summed in
    slot order (one add per slot, so the Triton kernel can give the same bits)."""
    is_zero = topk_ids >= num_experts
    w = topk_weights.float()
    s = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    none = torch.zeros((), dtype=torch.float32, device=w.device)
    for j in range(w.shape[1]):
        s = s + torch.where(is_zero[:, j], w[:, j], none)
    return s


def zero_experts_compute_torch(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """hidden_states: [T, H]; topk_weights: [T, K] float32; topk_ids: [T, K] int.

    returns zero: [T, H] in ``out_dtype`` (default: dtype of hidden_states), computed in float32.
    """
    scale = zero_scale_torch(topk_weights, topk_ids, num_experts)
    return (hidden_states.float() * scale.unsqueeze(-1)).to(out_dtype or hidden_states.dtype)


def mask_zero_experts(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite slots with ``id >= num_experts`` to ``id 0, weight 0.0`` (new tensors)."""
    is_zero = topk_ids >= num_experts
    return topk_weights.masked_fill(is_zero, 0.0), topk_ids.masked_fill(is_zero, 0)


def zero_slots_torch(topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's zero-expert step: ``(topk_weights, topk_ids)`` with the zero slots masked, and ``s`` [T]
    float32, the zero slots' weight sum (module docstring). topk_weights: [T, K] float32; topk_ids: [T, K] int."""
    s = zero_scale_torch(topk_weights, topk_ids, num_experts)
    w, ids = mask_zero_experts(topk_weights, topk_ids, num_experts)
    return w, ids, s


def zero_combine_torch(routed: torch.Tensor, x: torch.Tensor | None, zero_scale: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """``((routed + x · zero_scale) · scale)`` in float32, rounded once to ``routed``'s dtype. routed: [T, H] float;
    x: [T, H] float, the experts' input (ignored without ``zero_scale``); zero_scale: [T] float32 (the zero slots'
    weight sum) or None; scale: the routed scaling factor applied to the output (1.0: none)."""
    rows = max(1, COMBINE_WORKSPACE_BYTES // (16 * max(1, routed.shape[-1])))  # f32 routed, x·s, sum, scaled
    if routed.shape[0] <= rows or torch.compiler.is_compiling():
        return _combine(routed, x, zero_scale, scale)
    out = torch.empty_like(routed)  # (review of round 67: [T, H] f32 temporaries, 6 GB at T = 262144, H = 2048)
    for lo in range(0, routed.shape[0], rows):  # elementwise: the same bits in row blocks
        hi = lo + rows
        out[lo:hi] = _combine(routed[lo:hi], None if x is None else x[lo:hi],
                              None if zero_scale is None else zero_scale[lo:hi], scale)
    return out


#: bound on the torch combine's float32 temporaries (it runs in row blocks above it)
COMBINE_WORKSPACE_BYTES = 256 * 1024 * 1024


def _combine(routed, x, zero_scale, scale: float) -> torch.Tensor:
    acc = routed.to(acc_dtype(routed.dtype))
    if zero_scale is not None:
        acc = acc + x.to(acc.dtype) * zero_scale.unsqueeze(-1)
    return rounded(acc * scale, routed.dtype)  # (kept under torch.compile: what follows would fuse it away)
