"""The router contract: ``select_experts(x, logits) -> (topk_weights float32 [T, K], topk_ids int32 [T, K])``.

Routers are math only. Each subclass implements :meth:`BaseRouter._compute_routing` returning a
:class:`~moekit.types.RoutingResult`; :meth:`BaseRouter.route` adds the checks shared by all routers
and, with EPLB, the logical -> physical id map. ``backend`` ("torch" or "triton") is set once by the
layer that owns the router; routers never branch on the platform themselves.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_int, check_tensor
from ..ops.kernels import kernels_for
from ..ops.routing import check_gating
from ..types import RoutingMethodType, RoutingResult


def get_routing_method_type(
    scoring_func: str, top_k: int, renormalize: bool, num_expert_group: int | None, has_e_score_bias: bool
) -> RoutingMethodType:
    """The seed's classification of a routing configuration."""
    if has_e_score_bias:
        if (num_expert_group or 0) > 0 and scoring_func == "sigmoid":
            return RoutingMethodType.DeepSeekV3
        return RoutingMethodType.Unspecified
    if scoring_func == "sigmoid":
        return RoutingMethodType.Llama4 if top_k == 1 else RoutingMethodType.Unspecified
    if scoring_func == "softmax":
        return RoutingMethodType.Renormalize if renormalize else RoutingMethodType.Default
    return RoutingMethodType.Unspecified


class BaseRouter(torch.nn.Module):
    """Common state of every router: ``top_k``, ``global_num_experts``, the EPLB hook, index dtype.

    ``eplb_state``, when given, is an object with ``map_logical_to_physical(topk_ids) -> topk_ids``
    (it may also record per-expert load); the layer installs it when EPLB is enabled.
    """

    #: number of logit columns this router reads, if not ``global_num_experts``
    num_logit_columns: int | None = None

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state=None,
        enable_eplb: bool = False,
        indices_type_getter: Callable[[], torch.dtype | None] | None = None,
        *,
        kernels=None,
    ):
        super().__init__()
        self.top_k = check_int("top_k", top_k, minimum=1)
        self.global_num_experts = check_int("global_num_experts", global_num_experts, minimum=1)
        self.eplb_state = eplb_state
        self.enable_eplb = bool(enable_eplb)
        self.indices_type_getter = indices_type_getter
        self.kernels = kernels if kernels is not None else kernels_for("torch")
        self._zero_expert_output: torch.Tensor | None = None

    # -- to implement -------------------------------------------------------------------------
    def _compute_routing(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        indices_type: torch.dtype | None,
        input_ids: torch.Tensor | None,
    ) -> RoutingResult:
        raise NotImplementedError

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Unspecified

    @property
    def backend(self) -> str:
        return self.kernels.name

    # -- shared ---------------------------------------------------------------------------------
    @property
    def indices_type(self) -> torch.dtype | None:
        return self.indices_type_getter() if self.indices_type_getter is not None else None

    def route(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *, input_ids: torch.Tensor | None = None
    ) -> RoutingResult:
        """Full routing result, zero-expert contribution included (no side channel)."""
        check_tensor("hidden_states", hidden_states)
        columns = self.num_logit_columns or self.global_num_experts
        check_gating(router_logits, hidden_states.shape[0], columns)
        if router_logits.device != hidden_states.device:
            raise ValueError(
                f"router_logits is on {router_logits.device} but hidden_states is on {hidden_states.device}"
            )
        result = self._compute_routing(hidden_states, router_logits, self.indices_type, input_ids)
        if self.eplb_state is not None:
            ids = self.eplb_state.map_logical_to_physical(result.topk_ids)
            result = RoutingResult(result.topk_weights, ids, result.zero_output)
        return result

    def select_experts(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_weights: [T, K] float32, topk_ids: [T, K] int32 (zero-expert slots already masked)."""
        result = self.route(hidden_states, router_logits, input_ids=input_ids)
        zero = result.zero_output
        self._zero_expert_output = zero.to(hidden_states.dtype) if zero is not None else None
        return result.topk_weights, result.topk_ids

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, global_num_experts={self.global_num_experts}, backend={self.backend!r}"
