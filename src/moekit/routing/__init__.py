"""Routers: math only, one per file, picked by :func:`create_fused_moe_router`."""

from .base import BaseRouter, get_routing_method_type
from .custom import CustomRoutingRouter
from .factory import create_fused_moe_router
from .fused_topk import FusedTopKRouter
from .fused_topk_bias import FusedTopKBiasRouter
from .grouped_topk import GroupedTopk, GroupedTopKRouter
from .zero_expert import ZeroExpertRouter

__all__ = [
    "BaseRouter",
    "CustomRoutingRouter",
    "FusedTopKBiasRouter",
    "FusedTopKRouter",
    "GroupedTopKRouter",
    "GroupedTopk",
    "ZeroExpertRouter",
    "create_fused_moe_router",
    "get_routing_method_type",
]
