"""``torch.library`` custom ops of the Triton backend (namespace ``moekit``), with fake kernels, so
that ``torch.compile(layer, fullgraph=True)`` traces through them without graph breaks and a
compiled or eager layer forward can be captured in a CUDA graph.

- ``moekit::fused_experts(x, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
  w1_bias, w2_bias, expert_map, swiglu_limit) -> out [T, H]``
- ``moekit::route(logits, bias, top_k, scoring_func, renormalize, routed_scaling_factor,
  num_expert_group, topk_group, ids_dtype) -> (topk_weights [T, K] f32, topk_ids [T, K])``

Callers validate (``fused_experts_triton`` / ``route_triton``); the ops only launch kernels.
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("moekit::fused_experts", mutates_args=())
def fused_experts_op(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    apply_router_weight_on_input: bool,
    w1_bias: Optional[torch.Tensor],
    w2_bias: Optional[torch.Tensor],
    expert_map: Optional[torch.Tensor],
    swiglu_limit: Optional[float],
) -> torch.Tensor:
    from .triton_experts import fused_experts_impl

    return fused_experts_impl(
        hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
        w1_bias, w2_bias, expert_map, swiglu_limit,
    )


@fused_experts_op.register_fake
def _fused_experts_fake(hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
                        w1_bias, w2_bias, expert_map, swiglu_limit):
    return torch.empty_like(hidden_states)


@torch.library.custom_op("moekit::route", mutates_args=())
def route_op(
    gating_output: torch.Tensor,
    bias: Optional[torch.Tensor],
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    ids_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_routing import route_impl

    return route_impl(
        gating_output, bias, top_k, scoring_func, renormalize, routed_scaling_factor, num_expert_group,
        topk_group, ids_dtype,
    )


@route_op.register_fake
def _route_fake(gating_output, bias, top_k, scoring_func, renormalize, routed_scaling_factor, num_expert_group,
                topk_group, ids_dtype):
    t = gating_output.shape[0]
    w = gating_output.new_empty((t, top_k), dtype=torch.float32)
    return w, gating_output.new_empty((t, top_k), dtype=ids_dtype)
