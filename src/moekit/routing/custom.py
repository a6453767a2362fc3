"""CustomRoutingRouter: a user function decides ids and weights.

``custom_routing_function(hidden_states, gating_output, topk, renormalize) -> (weights, ids)``;
moekit then applies ``routed_scaling_factor`` (the seed ignored it) and checks the shapes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .._checks import check_finite
from ..ops.experts import check_ids_in_range
from ..types import RoutingMethodType, RoutingResult
from .base import BaseRouter


class CustomRoutingRouter(BaseRouter):
    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state=None,
        custom_routing_function: Callable | None = None,
        renormalize: bool = True,
        enable_eplb: bool = False,
        indices_type_getter: Callable[[], torch.dtype | None] | None = None,
        routed_scaling_factor: float = 1.0,
        *,
        kernels=None,
    ):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        if not callable(custom_routing_function):
            raise TypeError(f"custom_routing_function must be callable, got {custom_routing_function!r}")
        if top_k > global_num_experts:
            raise ValueError(f"top_k must be <= the number of experts ({global_num_experts}), got {top_k}")
        self.custom_routing_function = custom_routing_function
        self.renormalize = bool(renormalize)
        self.routed_scaling_factor = float(routed_scaling_factor)
        if not math.isfinite(self.routed_scaling_factor):
            raise ValueError(f"routed_scaling_factor must be finite, got {routed_scaling_factor!r}")

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        if self.backend == "torch":  # reference path: non-finite logits raise (SPEC §7)
            check_finite("router_logits", router_logits)
        out = self.custom_routing_function(hidden_states, router_logits, self.top_k, self.renormalize)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("custom_routing_function must return (topk_weights, topk_ids)")
        weights, ids = out
        t = router_logits.shape[0]
        for name, v in (("topk_weights", weights), ("topk_ids", ids)):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (t, self.top_k):
                shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"custom_routing_function returned {name} {shape}, expected [{t}, {self.top_k}]")
        if ids.is_floating_point():
            raise TypeError(f"custom_routing_function returned float topk_ids ({ids.dtype}); expected integers")
        if self.backend == "torch":
            check_ids_in_range(ids, self.global_num_experts)
        weights = weights.float()
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return RoutingResult(weights, ids.to(indices_type or torch.int32))
