"""GroupedTopKRouter (DeepSeek-V2/V3) and the ``GroupedTopk`` module.

Invalid grouping (``E % G != 0``, ``G > E``, ``topk_group > G``, ``top_k`` > experts in the kept groups)
raises ``ValueError`` at construction; the seed silently fell back to ungrouped routing.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_finite
from ..ops.api import route, run_route
from ..ops.routing import check_bias, grouped_spec
from ..types import RoutingMethodType, RoutingResult
from .base import BaseRouter


class GroupedTopKRouter(BaseRouter):
    """Scores (+ bias) viewed ``[T, G, E/G]``; keep the ``topk_group`` best groups; top-k inside them."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state=None,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        e_score_correction_bias: torch.Tensor | None = None,
        num_fused_shared_experts: int = 0,
        enable_eplb: bool = False,
        indices_type_getter: Callable[[], torch.dtype | None] | None = None,
        *,
        kernels=None,
    ):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        if num_fused_shared_experts:
            raise NotImplementedError(
                f"num_fused_shared_experts={num_fused_shared_experts}: fused shared experts (ROCm aiter) are not "
                "supported; pass shared_experts= to FusedMoE instead"
            )
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.renormalize = bool(renormalize)
        self.scoring_func = scoring_func
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.num_fused_shared_experts = 0
        self.spec = grouped_spec(
            top_k, self.renormalize, num_expert_group, topk_group, scoring_func, self.routed_scaling_factor
        ).validate(global_num_experts)
        if e_score_correction_bias is not None:
            check_bias(e_score_correction_bias, global_num_experts)
            check_finite("e_score_correction_bias", e_score_correction_bias)
        self.register_buffer("e_score_correction_bias", e_score_correction_bias, persistent=False)

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.DeepSeekV3 if self.scoring_func == "sigmoid" else RoutingMethodType.Unspecified

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        w, ids = run_route(router_logits, self.spec, self.e_score_correction_bias, indices_type, self.backend)
        return RoutingResult(w, ids)


class GroupedTopk(torch.nn.Module):
    """Grouped top-k as a module; ``forward`` runs the best backend for the logits' device
    (Triton on CUDA), ``forward_native`` the torch twin."""

    def __init__(
        self,
        topk: int,
        renormalize: bool,
        num_expert_group: int = 0,
        topk_group: int = 0,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        num_fused_shared_experts: int = 0,
    ) -> None:
        super().__init__()
        if num_fused_shared_experts:
            raise NotImplementedError(f"num_fused_shared_experts={num_fused_shared_experts} is not supported")
        self.topk = topk
        self.renormalize = renormalize
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        self.num_fused_shared_experts = 0
        self.spec = grouped_spec(topk, renormalize, num_expert_group, topk_group, scoring_func, routed_scaling_factor)
        # construction-time checks that need no E (topk, scoring_func, scale, topk_group <= G): the stand-in
        # E = G·topk passes every E-dependent check, which runs again against the logits' width in forward
        self.spec.validate(num_expert_group * topk)

    def _run(self, gating_output, e_score_correction_bias, backend: str):
        # route() checks the logits, the bias and the spec against the logits' width
        return route(gating_output, self.spec, e_score_correction_bias, None, backend)

    def forward_native(
        self,
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        e_score_correction_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(gating_output, e_score_correction_bias, "torch")

    def forward(
        self,
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        e_score_correction_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ..ops.kernels import resolve_backend

        backend = resolve_backend("auto", gating_output.device, quiet=True)
        return self._run(gating_output, e_score_correction_bias, backend)
