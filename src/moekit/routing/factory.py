"""``create_fused_moe_router``: picks the router class in the seed's priority order.

ZeroExpertRouter (zero_expert_type) -> GroupedTopKRouter (use_grouped_topk) -> CustomRoutingRouter
(custom_routing_function) -> FusedTopKBiasRouter (bias or hash table) -> FusedTopKRouter.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import BaseRouter
from .custom import CustomRoutingRouter
from .fused_topk import FusedTopKRouter
from .fused_topk_bias import FusedTopKBiasRouter
from .grouped_topk import GroupedTopKRouter
from .zero_expert import ZeroExpertRouter


def create_fused_moe_router(
    top_k: int,
    global_num_experts: int,
    eplb_state=None,
    renormalize: bool = True,
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    custom_routing_function: Callable | None = None,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: torch.Tensor | None = None,
    num_fused_shared_experts: int = 0,
    zero_expert_type: str | None = None,
    num_logical_experts: int | None = None,
    hash_indices_table: torch.Tensor | None = None,
    enable_eplb: bool = False,
    indices_type_getter: Callable[[], torch.dtype | None] | None = None,
    *,
    kernels=None,
) -> BaseRouter:
    common = dict(eplb_state=eplb_state, enable_eplb=enable_eplb, indices_type_getter=indices_type_getter,
                  kernels=kernels)
    if zero_expert_type is not None:
        return ZeroExpertRouter(
            top_k,
            global_num_experts,
            e_score_correction_bias=e_score_correction_bias,
            num_logical_experts=num_logical_experts,
            zero_expert_type=zero_expert_type,
            scoring_func=scoring_func,
            renormalize=renormalize,
            routed_scaling_factor=routed_scaling_factor,
            **common,
        )
    if use_grouped_topk:
        return GroupedTopKRouter(
            top_k,
            global_num_experts,
            num_expert_group=num_expert_group,
            topk_group=topk_group,
            renormalize=renormalize,
            scoring_func=scoring_func,
            routed_scaling_factor=routed_scaling_factor,
            e_score_correction_bias=e_score_correction_bias,
            num_fused_shared_experts=num_fused_shared_experts,
            **common,
        )
    if custom_routing_function is not None:
        return CustomRoutingRouter(
            top_k,
            global_num_experts,
            custom_routing_function=custom_routing_function,
            renormalize=renormalize,
            routed_scaling_factor=routed_scaling_factor,
            **common,
        )
    if e_score_correction_bias is not None or hash_indices_table is not None:
        return FusedTopKBiasRouter(
            top_k,
            global_num_experts,
            e_score_correction_bias=e_score_correction_bias,
            scoring_func=scoring_func,
            renormalize=renormalize,
            routed_scaling_factor=routed_scaling_factor,
            hash_indices_table=hash_indices_table,
            **common,
        )
    return FusedTopKRouter(
        top_k,
        global_num_experts,
        renormalize=renormalize,
        scoring_func=scoring_func,
        routed_scaling_factor=routed_scaling_factor,
        **common,
    )
