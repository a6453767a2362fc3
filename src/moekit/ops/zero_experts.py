"""Zero (identity) experts of LongCat-Flash.

``zero[t] = x[t] · Σ_{j: ids[t, j] >= E} w[t, j]`` (sum in float32), and the zero slots are rewritten
to ``id 0, weight 0.0`` so the expert kernels never see an id ``>= E``.
"""

from __future__ import annotations

import torch

ZERO_EXPERT_TYPES = ("identity",)


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
    is_zero = topk_ids >= num_experts
    scale = torch.where(is_zero, topk_weights.float(), torch.zeros((), device=topk_weights.device)).sum(-1)
    return (hidden_states.float() * scale.unsqueeze(-1)).to(out_dtype or hidden_states.dtype)


def mask_zero_experts(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite slots with ``id >= num_experts`` to ``id 0, weight 0.0`` (new tensors)."""
    is_zero = topk_ids >= num_experts
    return topk_weights.masked_fill(is_zero, 0.0), topk_ids.masked_fill(is_zero, 0)
