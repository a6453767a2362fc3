"""Stateless ops, each with a ``*_torch`` twin (the CPU path and the test oracle)."""

from .activation import ACTIVATIONS, apply_activation_torch, canonical_activation, is_gated
from .experts import fused_experts, fused_experts_torch
from .routing import TopKSpec, fused_topk, fused_topk_bias, grouped_topk, route, route_torch
from .zero_experts import mask_zero_experts, zero_experts_compute_torch

__all__ = [
    "ACTIVATIONS",
    "TopKSpec",
    "apply_activation_torch",
    "canonical_activation",
    "fused_experts",
    "fused_experts_torch",
    "fused_topk",
    "fused_topk_bias",
    "grouped_topk",
    "is_gated",
    "mask_zero_experts",
    "route",
    "route_torch",
    "zero_experts_compute_torch",
]
