"""moekit: one clean, exact and fast Mixture-of-Experts layer for PyTorch.

    import torch, moekit
    E, K, H, I = 8, 2, 64, 128                       # experts, top-k, hidden size, expert intermediate size
    layer = moekit.FusedMoE(E, K, H, I)              # -> MoERunner (weights allocated, not yet loaded)
    layer.load_expert_weights(
        torch.randn(E, 2 * I, H) * H**-0.5,          # w13: [E, 2I, H] float32, gate rows then up rows
        torch.randn(E, H, I) * I**-0.5,              # w2:  [E, H, I]  float32
    )
    x, logits = torch.randn(5, H), torch.randn(5, E) # hidden_states [T, H], router_logits [T, E]
    out = layer(x, logits)                           # [T, H]: Σ_k w[t, k] · expert_{ids[t, k]}(x[t])

A forward before the expert weights are loaded raises ``RuntimeError``. Quantised experts (fp8 block /
channel, mxfp4, int4 groups): ``FusedMoE(..., quant_config={...HF quantization_config...})`` and
``q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, quant_config)``,
``layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)`` — or full-precision weights,
quantised on load. Checkpoints:
``moekit.load_moe_layers(path)``; transformers models: ``moekit.integrations.transformers.patch(model)``.
"""

from .config import MoEConfig
from .experts.routed import RoutedExperts
from .layer import FusedMoE
from .experts.mapping import fused_moe_make_expert_params_mapping
from .loading import load_moe_layers
from .ops.activation import ACTIVATIONS
from .ops.api import fused_experts, fused_topk, fused_topk_bias, grouped_topk
from .ops.experts import fused_experts_torch
from .ops.experts_quant import fused_experts_quant_torch
from .ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format, WeightFormat
from .ops.quant_config import parse_quant_config
from .ops.quantize import dequantize_experts, quantize_experts
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

__version__ = "0.2.0.dev0"

__all__ = [
    "ACTIVATIONS",
    "BaseRouter",
    "CustomRoutingRouter",
    "Fp8BlockFormat",
    "Fp8ChannelFormat",
    "FusedMoE",
    "FusedTopKBiasRouter",
    "FusedTopKRouter",
    "GroupedTopKRouter",
    "GroupedTopk",
    "Int4GroupFormat",
    "MoEConfig",
    "MoERunner",
    "Mxfp4Format",
    "RoutedExperts",
    "RoutingMethodType",
    "RoutingResult",
    "TopKSpec",
    "WeightFormat",
    "ZeroExpertRouter",
    "create_fused_moe_router",
    "dequantize_experts",
    "fused_experts",
    "fused_experts_quant_torch",
    "fused_experts_torch",
    "fused_moe_make_expert_params_mapping",
    "fused_topk",
    "fused_topk_bias",
    "grouped_topk",
    "load_moe_layers",
    "parse_quant_config",
    "quantize_experts",
    "resolve_backend",
]
