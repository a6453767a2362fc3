"""Triton routing: one fused kernel for every score-based router (see :mod:`.routing` for the math).

``route_triton`` returns the same ids as :func:`~moekit.ops.routing.route_torch` (ties toward the lower
expert id) and weights within fp32 rounding, for softmax / sigmoid / sqrtsoftplus scores, a selection
bias, renormalisation, ``routed_scaling_factor`` and grouped top-k. It never synchronises with the
host. NaN policy (documented in :mod:`moekit.ops._triton.topk`): NaN selection scores count as
``-inf``; the ids are always K distinct experts in ``[0, E)``; non-finite weights propagate.
"""

from __future__ import annotations

import torch

from .routing import TopKSpec
from .triton_configs import next_pow2

#: largest expert count one program holds in registers
MAX_EXPERTS = 4096
MAX_TOP_K = 64


def route_triton(
    gating_output: torch.Tensor,
    spec: TopKSpec,
    bias: torch.Tensor | None = None,
    indices_type: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gating_output: [T, E] any float dtype; bias: [E] float or None.

    returns topk_weights [T, K] float32, topk_ids [T, K] ``indices_type`` (default int32).
    """
    if gating_output.dim() != 2:
        raise ValueError(f"router_logits must have shape [T, E], got {list(gating_output.shape)}")
    e = gating_output.shape[1]
    spec.validate(e)
    if e > MAX_EXPERTS:
        raise ValueError(f"the Triton router holds at most {MAX_EXPERTS} experts per row, got E={e}")
    if spec.top_k > MAX_TOP_K:
        raise ValueError(f"the Triton router supports top_k <= {MAX_TOP_K}, got {spec.top_k}")
    if bias is not None and bias.device != gating_output.device:
        raise ValueError(f"e_score_correction_bias is on {bias.device} but router_logits is on {gating_output.device}")
    from . import custom_ops  # noqa: F401  (registers torch.ops.moekit.*)

    return torch.ops.moekit.route(
        gating_output, bias, spec.top_k, spec.scoring_func, bool(spec.renormalize),
        float(spec.routed_scaling_factor), spec.num_expert_group, spec.topk_group,
        indices_type or torch.int32,
    )


def route_impl(gating_output, bias, top_k, scoring_func, renormalize, scale, num_groups, topk_group, ids_dtype):
    """Launch the routing kernel (validated inputs)."""
    from ._triton.topk import SCORE_CODES, route_kernel

    t, e = gating_output.shape
    w = torch.empty(t, top_k, dtype=torch.float32, device=gating_output.device)
    ids = torch.empty(t, top_k, dtype=ids_dtype, device=gating_output.device)
    if t == 0:
        return w, ids
    eg = e // num_groups
    gp, egp = next_pow2(num_groups), next_pow2(eg)
    warps = 1 if gp * egp <= 128 else 2 if gp * egp <= 512 else 4 if gp * egp <= 2048 else 8
    route_kernel[(t,)](
        gating_output, bias if bias is not None else gating_output, w, ids,
        e, top_k, eg, num_groups, topk_group, scale,
        gating_output.stride(0), w.stride(0), ids.stride(0),
        GP=gp, EGP=egp, KP=next_pow2(top_k), SCORING=SCORE_CODES[scoring_func],
        HAS_BIAS=bias is not None, GROUPED=num_groups > 1, RENORM=renormalize, num_warps=warps,
    )
    return w, ids
