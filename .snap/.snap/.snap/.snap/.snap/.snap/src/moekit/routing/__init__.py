"""Routers: math only, one per file, picked by :func:`create_fused_moe_router`.

``base.py`` holds :class:`BaseRouter` (top_k, E, EPLB state, id dtype, kernel table, input checks) and
:class:`ScoredRouter` (scoring, renormalisation, scaling, the selection bias: built and checked once).
"""

from .base import BaseRouter, ScoredRouter, get_routing_method_type, routing_spec
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
    "ScoredRouter",
    "ZeroExpertRouter",
    "create_fused_moe_router",
    "get_routing_method_type",
    "routing_spec",
]
