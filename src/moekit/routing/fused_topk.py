"""FusedTopKRouter: ``ids = topk(scores)``, ``w = scores[ids]`` (renormalised, scaled)."""

from __future__ import annotations

from typing import Callable

import torch

from ..ops.api import run_route
from ..ops.routing import TopKSpec
from ..types import RoutingMethodType, RoutingResult
from .base import BaseRouter, get_routing_method_type


class FusedTopKRouter(BaseRouter):
    """Plain softmax / sigmoid / sqrtsoftplus top-k (Mixtral, Qwen-MoE, OLMoE, gpt-oss)."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state=None,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        enable_eplb: bool = False,
        indices_type_getter: Callable[[], torch.dtype | None] | None = None,
        *,
        kernels=None,
    ):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        self.renormalize = bool(renormalize)
        self.scoring_func = scoring_func
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.spec = TopKSpec(top_k, scoring_func, self.renormalize, self.routed_scaling_factor).validate(
            global_num_experts
        )

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return get_routing_method_type(self.scoring_func, self.top_k, self.renormalize, None, False)

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        w, ids = run_route(router_logits, self.spec, None, indices_type, self.backend)
        return RoutingResult(w, ids)
