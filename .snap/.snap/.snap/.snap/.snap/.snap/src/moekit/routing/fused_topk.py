"""FusedTopKRouter: ``ids = topk(scores)``, ``w = scores[ids]`` (renormalised, scaled)."""

from __future__ import annotations

from ..ops.kernels import Kernels
from .base import IndicesTypeGetter, ScoredRouter


class FusedTopKRouter(ScoredRouter):
    """``s = scores(logits [T, E])``; ``ids = topk(s, K)`` (ties -> lower id); ``w = s[ids]``;
    ``w /= Σw`` if ``renormalize``; ``w *= routed_scaling_factor`` (Mixtral, Qwen-MoE, OLMoE, gpt-oss).

    top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels: see :class:`BaseRouter`.
    renormalize: bool (default True). scoring_func: "softmax" | "sigmoid" | "sqrtsoftplus".
    routed_scaling_factor: finite float > 0, applied after renormalisation (the seed ignored it here).
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None, renormalize: bool = True,
                 scoring_func: str = "softmax", routed_scaling_factor: float = 1.0, enable_eplb: bool = False,
                 indices_type_getter: IndicesTypeGetter | None = None, *, kernels: Kernels | None = None):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels,
                         scoring_func=scoring_func, renormalize=renormalize,
                         routed_scaling_factor=routed_scaling_factor)


