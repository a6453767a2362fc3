"""ZeroExpertRouter (LongCat-Flash): bias-corrected top-k over ``E + Z`` experts, ``Z`` of them identity.

The zero-expert contribution ``zero[t] = x[t] · Σ_{j: id_j >= E} w_j`` is returned in the
:class:`~moekit.types.RoutingResult`; ``zero_expert_output`` (read-and-clear) stays for seed
compatibility. Zero slots are rewritten to ``id 0, weight 0.0`` before any expert kernel sees them.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_choice, check_finite, check_int
from ..ops.api import run_route
from ..ops.routing import TopKSpec, check_bias
from ..ops.zero_experts import ZERO_EXPERT_TYPES, mask_zero_experts, zero_experts_compute_torch
from ..types import RoutingMethodType, RoutingResult
from .base import BaseRouter, get_routing_method_type


class ZeroExpertRouter(BaseRouter):
    """Routes over real + zero experts; ``Z = len(e_score_correction_bias) - num_logical_experts``."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state=None,
        e_score_correction_bias: torch.Tensor | None = None,
        num_logical_experts: int | None = None,
        zero_expert_type: str = "identity",
        scoring_func: str = "softmax",
        renormalize: bool = False,
        routed_scaling_factor: float = 1.0,
        enable_eplb: bool = False,
        indices_type_getter: Callable[[], torch.dtype | None] | None = None,
        *,
        kernels=None,
    ):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        check_choice("zero_expert_type", zero_expert_type, ZERO_EXPERT_TYPES)
        if e_score_correction_bias is None:
            raise ValueError("ZeroExpertRouter requires e_score_correction_bias of length E + Z, got None")
        self.num_logical_experts = check_int(
            "num_logical_experts",
            global_num_experts if num_logical_experts is None else num_logical_experts,
            minimum=1,
        )
        total = e_score_correction_bias.shape[0] if e_score_correction_bias.dim() == 1 else -1
        if total < self.num_logical_experts:
            raise ValueError(
                f"e_score_correction_bias must have shape [E + Z] with E={self.num_logical_experts}, "
                f"got {list(e_score_correction_bias.shape)}"
            )
        check_bias(e_score_correction_bias, total)
        check_finite("e_score_correction_bias", e_score_correction_bias)
        self.num_zero_experts = total - self.num_logical_experts
        self.num_logit_columns = total
        self.zero_expert_type = zero_expert_type
        self.scoring_func = scoring_func
        self.renormalize = bool(renormalize)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.spec = TopKSpec(top_k, scoring_func, self.renormalize, self.routed_scaling_factor).validate(total)
        self.register_buffer("e_score_correction_bias", e_score_correction_bias, persistent=False)

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return get_routing_method_type(self.scoring_func, self.top_k, self.renormalize, None, True)

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        w, ids = run_route(router_logits, self.spec, self.e_score_correction_bias, indices_type, self.backend)
        # kept in float32 so the runner rounds routed + zero once (SPEC §3: exact zero-expert output)
        zero = zero_experts_compute_torch(hidden_states, w, ids, self.num_logical_experts, torch.float32)
        w, ids = mask_zero_experts(w, ids, self.num_logical_experts)
        return RoutingResult(w, ids, zero)

    @property
    def zero_expert_output(self) -> torch.Tensor | None:
        """Retrieve and clear the zero-expert output of the last ``select_experts`` call."""
        out, self._zero_expert_output = self._zero_expert_output, None
        return out
