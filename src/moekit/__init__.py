"""moekit: one clean, exact and fast Mixture-of-Experts layer for PyTorch.

    import moekit
    layer = moekit.FusedMoE(num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336)
    out = layer(hidden_states, router_logits)
"""

from .config import MoEConfig
from .experts.routed import RoutedExperts
from .layer import FusedMoE
from .loading import fused_moe_make_expert_params_mapping, load_moe_layers
from .ops.activation import ACTIVATIONS
from .ops.api import fused_experts, fused_topk, fused_topk_bias, grouped_topk
from .ops.experts import fused_experts_torch
from .ops.kernels import resolve_backend
from .ops.routing import TopKSpec
from .routing import (
    BaseRouter,
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopk,
    GroupedTopKRouter,
    ZeroExpertRouter,
    create_fused_moe_router,
)
from .runner import MoERunner
from .types import RoutingMethodType, RoutingResult

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BaseRouter",
    "CustomRoutingRouter",
    "FusedMoE",
    "FusedTopKBiasRouter",
    "FusedTopKRouter",
    "GroupedTopKRouter",
    "GroupedTopk",
    "MoEConfig",
    "MoERunner",
    "RoutedExperts",
    "RoutingMethodType",
    "RoutingResult",
    "TopKSpec",
    "ZeroExpertRouter",
    "create_fused_moe_router",
    "fused_experts",
    "fused_moe_make_expert_params_mapping",
    "load_moe_layers",
    "fused_experts_torch",
    "fused_topk",
    "fused_topk_bias",
    "grouped_topk",
    "resolve_backend",
]
