"""Stateless ops, each with a torch twin (the CPU path and the test oracle).

Bottom-up (each module imports only modules above it in this list)::

    activation, triton_configs, zero_experts               the activation registry, kernel configs
    _triton/*                                              @triton.jit code (reads the activation codes)
    routing, experts                                       torch twins and input checks (no Triton)
    formats, quant_config, _quant_rules, quantize          quantised weight formats and their rules
    experts_quant                                          the quantised experts' torch twin
    triton_routing, triton_experts                         launchers + their torch.library custom ops
    kernels                                                the kernel table (Kernels, resolve_kernels)
    api                                                    public fronts: validate once, call a table
"""

from .activation import (
    ACTIVATIONS,
    Activation,
    activation_from_hf,
    apply_activation_torch,
    canonical_activation,
    get_activation,
    is_gated,
)
from .api import fused_experts, fused_topk, fused_topk_bias, grouped_topk, route
from .experts import fused_experts_torch
from .experts_quant import fused_experts_quant_torch
from .formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format, WeightFormat
from .quant_config import parse_quant_config
from .quantize import dequantize_experts, quantize_experts
from .kernels import Kernels, resolve_backend, resolve_kernels
from .routing import TopKSpec, route_torch
from .zero_experts import mask_zero_experts, zero_experts_compute_torch

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Fp8BlockFormat",
    "Fp8ChannelFormat",
    "Int4GroupFormat",
    "Kernels",
    "Mxfp4Format",
    "TopKSpec",
    "WeightFormat",
    "activation_from_hf",
    "apply_activation_torch",
    "canonical_activation",
    "dequantize_experts",
    "fused_experts",
    "fused_experts_quant_torch",
    "fused_experts_torch",
    "fused_topk",
    "fused_topk_bias",
    "get_activation",
    "grouped_topk",
    "is_gated",
    "mask_zero_experts",
    "parse_quant_config",
    "quantize_experts",
    "resolve_backend",
    "resolve_kernels",
    "route",
    "route_torch",
    "zero_experts_compute_torch",
]
