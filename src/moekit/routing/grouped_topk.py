"""GroupedTopKRouter (DeepSeek-V2/V3) and the ``GroupedTopk`` module.

Invalid grouping (``E % G != 0``, ``G > E``, ``topk_group > G``, ``top_k`` > experts in the kept groups)
raises ``ValueError`` at construction; the seed silently fell back to ungrouped routing.
"""

from __future__ import annotations

import torch

from ..ops import grouped_topk
from ..ops.kernels import Kernels
from ..types import RoutingMethodType
from .base import IndicesTypeGetter, ScoredRouter, routing_spec


class GroupedTopKRouter(ScoredRouter):
    """``s = scores(logits [T, E]) (+ bias)`` viewed ``[T, G, E/G]``; group score = sum of the top-2 of
    ``s`` in the group with a bias, else the max; keep the ``topk_group`` best groups (ties -> lower
    group id), the others' experts -> -inf; ``ids = topk(s, K)`` among the kept; ``w`` from the unbiased
    scores; ``w /= Σw`` if ``renormalize``; ``w *= routed_scaling_factor``.

    top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels: see :class:`BaseRouter`.
    num_expert_group: ``G`` (int >= 1, divides ``E``). topk_group: groups kept (``1 <= topk_group <= G``,
    ``top_k <= topk_group · E/G``); the seed's defaults (None, 0) are refused.
    renormalize: bool (default True). scoring_func: "softmax" | "sigmoid" | "sqrtsoftplus".
    routed_scaling_factor: finite float > 0, applied after renormalisation.
    e_score_correction_bias: [E] float, finite, or None.
    num_fused_shared_experts: must be 0 (ROCm aiter fused shared experts: ``NotImplementedError``).
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None, num_expert_group: int | None = None,
                 topk_group: int | None = None, renormalize: bool = True, scoring_func: str = "softmax",
                 routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None,
                 num_fused_shared_experts: int = 0, enable_eplb: bool = False,
                 indices_type_getter: IndicesTypeGetter | None = None, *, kernels: Kernels | None = None):
        _no_fused_shared_experts(num_fused_shared_experts)
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels,
                         scoring_func=scoring_func, renormalize=renormalize,
                         routed_scaling_factor=routed_scaling_factor, e_score_correction_bias=e_score_correction_bias,
                         num_expert_group=num_expert_group, topk_group=topk_group)
        self.num_fused_shared_experts = 0

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.DeepSeekV3 if self.scoring_func == "sigmoid" else RoutingMethodType.Unspecified


def _no_fused_shared_experts(num_fused_shared_experts) -> None:
    if num_fused_shared_experts is not None and (isinstance(num_fused_shared_experts, bool)
                                                 or not isinstance(num_fused_shared_experts, int)):
        raise TypeError(f"num_fused_shared_experts must be an int (0: none), got {num_fused_shared_experts!r}")
    if num_fused_shared_experts:
        raise NotImplementedError(
            f"num_fused_shared_experts={num_fused_shared_experts!r}: fused shared experts (ROCm aiter) are not "
            "supported; pass shared_experts= to FusedMoE instead"
        )


class GroupedTopk(torch.nn.Module):
    """``(w [T, K] float32, ids [T, K] int32) = forward(hidden_states, gating_output [T, E], bias [E] | None)``
    with the math of :class:`GroupedTopKRouter` over the logits' width ``E`` (the seed's module;
    ``hidden_states [T, H]`` or None is only counted, ``bias`` is ``e_score_correction_bias``).
    ``forward`` runs the best kernels for the logits' device (Triton on CUDA), ``forward_native`` the
    torch twin; both go through the public front :func:`moekit.grouped_topk`, which validates per call.

    topk: ``K``. renormalize: bool. num_expert_group: ``G`` (>= 1). topk_group: groups kept (>= 1, <= G).
    scoring_func: "softmax" | "sigmoid" | "sqrtsoftplus". routed_scaling_factor: finite float > 0.
    num_fused_shared_experts: must be 0. What needs no ``E`` is checked at construction.
    """

    def __init__(self, topk: int, renormalize: bool, num_expert_group: int = 0, topk_group: int = 0,
                 scoring_func: str = "softmax", routed_scaling_factor: float = 1.0,
                 num_fused_shared_experts: int = 0) -> None:
        super().__init__()
        _no_fused_shared_experts(num_fused_shared_experts)
        # a stand-in E = G·topk passes every E-dependent check; those run again against the logits' width
        g = num_expert_group if isinstance(num_expert_group, int) and num_expert_group > 0 else 1
        stand_in = g * topk if isinstance(topk, int) else 1
        spec = routing_spec(topk, stand_in, renormalize, routed_scaling_factor, top_k_name="topk",
                            scoring_func=scoring_func, num_expert_group=num_expert_group, topk_group=topk_group)
        self.topk, self.renormalize, self.scoring_func = topk, renormalize, scoring_func
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = spec.routed_scaling_factor
        self.num_fused_shared_experts = 0

    def _run(self, hidden_states, gating_output, e_score_correction_bias, backend: str):
        return grouped_topk(hidden_states, gating_output, self.topk, self.renormalize, self.num_expert_group,
                            self.topk_group, self.scoring_func, self.routed_scaling_factor, e_score_correction_bias,
                            backend=backend)

    def forward(self, hidden_states, gating_output, e_score_correction_bias=None):
        """Best kernels for ``gating_output.device`` (backend "auto")."""
        return self._run(hidden_states, gating_output, e_score_correction_bias, "auto")

    def forward_native(self, hidden_states, gating_output, e_score_correction_bias=None):
        """The torch twin."""
        return self._run(hidden_states, gating_output, e_score_correction_bias, "torch")
