"""``create_fused_moe_router``: picks the router class in the seed's priority order."""

from __future__ import annotations

from typing import Callable

import torch

from ..ops.kernels import Kernels
from .base import BaseRouter, IndicesTypeGetter
from .custom import CustomRoutingRouter
from .fused_topk import FusedTopKRouter
from .fused_topk_bias import FusedTopKBiasRouter
from .grouped_topk import GroupedTopKRouter
from .zero_expert import ZeroExpertRouter


def check_router_selectors(*, zero_expert_type=None, use_grouped_topk=False, custom_routing_function=None,
                           hash_indices_table=None, num_expert_group=None, topk_group=None, scoring_func="softmax",
                           e_score_correction_bias=None, **_others) -> None:
    """Refuse routing arguments that the priority order of :func:`create_fused_moe_router` would drop silently:
    two router selectors at once, ``scoring_func`` with a custom function, a selection bias with a custom
    function or a hash table, grouping without ``use_grouped_topk``. ``ValueError`` naming them."""
    given = {
        "zero_expert_type": zero_expert_type is not None,
        "use_grouped_topk": bool(use_grouped_topk),
        "custom_routing_function": custom_routing_function is not None,
        "hash_indices_table": hash_indices_table is not None,
    }
    chosen = [name for name, on in given.items() if on]
    if len(chosen) > 1:
        raise ValueError(
            f"routing arguments {chosen} cannot be combined: each selects a different router "
            "(zero experts, grouped top-k, custom function, hash routing); pass one of them"
        )
    if custom_routing_function is not None and scoring_func != "softmax":
        raise ValueError(
            f"scoring_func={scoring_func!r} has no effect with custom_routing_function (the function computes "
            "the weights itself); leave scoring_func at its default"
        )
    if e_score_correction_bias is not None and (custom_routing_function is not None or hash_indices_table is not None):
        picker = "custom_routing_function" if custom_routing_function is not None else "hash_indices_table"
        raise ValueError(f"e_score_correction_bias has no effect with {picker} (it picks the experts); pass one")
    check_grouping_flag(use_grouped_topk, num_expert_group, topk_group)


def check_grouping_flag(use_grouped_topk, num_expert_group, topk_group) -> None:
    """Grouping (``num_expert_group`` or ``topk_group`` above 1) needs ``use_grouped_topk``: no router takes it
    otherwise, so it would be dropped silently (``ValueError``)."""
    if not use_grouped_topk and (num_expert_group not in (None, 0, 1) or topk_group not in (None, 0, 1)):
        raise ValueError(
            f"num_expert_group={num_expert_group}, topk_group={topk_group} need use_grouped_topk=True; "
            "without it the grouping would be ignored"
        )


def create_fused_moe_router(
    top_k: int, global_num_experts: int, eplb_state=None, renormalize: bool = True, use_grouped_topk: bool = False,
    num_expert_group: int | None = None, topk_group: int | None = None,
    custom_routing_function: Callable | None = None, scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None,
    num_fused_shared_experts: int = 0, zero_expert_type: str | None = None, num_logical_experts: int | None = None,
    hash_indices_table: torch.Tensor | None = None, enable_eplb: bool = False,
    indices_type_getter: IndicesTypeGetter | None = None, *, kernels: Kernels | None = None,
) -> BaseRouter:
    """The first that applies: :class:`ZeroExpertRouter` if ``zero_expert_type`` ->
    :class:`GroupedTopKRouter` if ``use_grouped_topk`` -> :class:`CustomRoutingRouter` if
    ``custom_routing_function`` -> :class:`FusedTopKBiasRouter` if ``e_score_correction_bias`` or
    ``hash_indices_table`` -> :class:`FusedTopKRouter`.

    Every argument has the meaning it has on the chosen router's constructor (see those classes):
    top_k, global_num_experts (``E``), eplb_state, enable_eplb, indices_type_getter and kernels on
    every router; renormalize (default True here, also for the zero-expert router) and
    routed_scaling_factor on every router; scoring_func and e_score_correction_bias on the score-based
    ones; num_expert_group, topk_group, num_fused_shared_experts for grouped routing;
    zero_expert_type and num_logical_experts for zero experts; hash_indices_table for hash routing.
    Several selectors at once follow this priority (SPEC §2; the others are not used, and ``FusedMoE``
    refuses such conflicts, :func:`check_router_selectors`). Grouping (``num_expert_group`` or
    ``topk_group`` above 1) without ``use_grouped_topk`` raises ``ValueError`` here too: no selector takes it,
    so it would be dropped silently.
    """
    check_grouping_flag(use_grouped_topk, num_expert_group, topk_group)
    common = dict(eplb_state=eplb_state, enable_eplb=enable_eplb, indices_type_getter=indices_type_getter,
                  kernels=kernels, renormalize=renormalize, routed_scaling_factor=routed_scaling_factor)
    scored = dict(common, scoring_func=scoring_func, e_score_correction_bias=e_score_correction_bias)
    if zero_expert_type is not None:
        return ZeroExpertRouter(top_k, global_num_experts, num_logical_experts=num_logical_experts,
                                zero_expert_type=zero_expert_type, **scored)
    if use_grouped_topk:
        return GroupedTopKRouter(top_k, global_num_experts, num_expert_group=num_expert_group, topk_group=topk_group,
                                 num_fused_shared_experts=num_fused_shared_experts, **scored)
    if custom_routing_function is not None:
        return CustomRoutingRouter(top_k, global_num_experts, custom_routing_function=custom_routing_function,
                                   **common)
    if e_score_correction_bias is not None or hash_indices_table is not None:
        return FusedTopKBiasRouter(top_k, global_num_experts, hash_indices_table=hash_indices_table, **scored)
    return FusedTopKRouter(top_k, global_num_experts, **common, scoring_func=scoring_func)
