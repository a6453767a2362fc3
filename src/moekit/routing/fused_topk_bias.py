"""FusedTopKBiasRouter: the bias picks, the unbiased scores weigh; or hash routing (DeepSeek-V4)."""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_finite
from ..ops.api import run_route
from ..ops.routing import TopKSpec, check_bias, check_hash_table, hash_route_torch, lookup_hash_ids
from ..types import RoutingMethodType, RoutingResult
from .base import BaseRouter, get_routing_method_type


class FusedTopKBiasRouter(BaseRouter):
    """``ids = topk(scores + bias)``, ``w = scores[ids]``; with ``hash_indices_table [vocab, K]`` the ids
    are ``table[input_ids]`` instead (``input_ids`` then required)."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state=None,
        e_score_correction_bias: torch.Tensor | None = None,
        scoring_func: str = "softmax",
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        enable_eplb: bool = False,
        indices_type_getter: Callable[[], torch.dtype | None] | None = None,
        hash_indices_table: torch.Tensor | None = None,
        *,
        kernels=None,
    ):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        if e_score_correction_bias is None and hash_indices_table is None:
            raise ValueError("FusedTopKBiasRouter needs e_score_correction_bias or hash_indices_table, got neither")
        self.renormalize = bool(renormalize)
        self.scoring_func = scoring_func
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.spec = TopKSpec(top_k, scoring_func, self.renormalize, self.routed_scaling_factor).validate(
            global_num_experts
        )
        if e_score_correction_bias is not None:
            check_bias(e_score_correction_bias, global_num_experts)
            check_finite("e_score_correction_bias", e_score_correction_bias)
        self.register_buffer("e_score_correction_bias", e_score_correction_bias, persistent=False)
        if hash_indices_table is not None:
            check_hash_table(hash_indices_table, global_num_experts, top_k)
        self.register_buffer("hash_indices_table", hash_indices_table, persistent=False)

    @property
    def routing_method_type(self) -> RoutingMethodType:
        has_bias = self.e_score_correction_bias is not None
        return get_routing_method_type(self.scoring_func, self.top_k, self.renormalize, None, has_bias)

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        if self.hash_indices_table is not None:
            reference = self.backend == "torch"
            hash_ids = lookup_hash_ids(self.hash_indices_table, input_ids, router_logits.shape[0], reference)
            if reference:
                check_finite("router_logits", router_logits)
            return RoutingResult(*hash_route_torch(router_logits, hash_ids, self.spec, indices_type))
        w, ids = run_route(router_logits, self.spec, self.e_score_correction_bias, indices_type, self.backend)
        return RoutingResult(w, ids)
