"""Checkpoint loading: name maps, the safetensors loader (no transformers needed)."""

from .mapping import fused_moe_make_expert_params_mapping
from .loader import load_moe_layers

__all__ = ["fused_moe_make_expert_params_mapping", "load_moe_layers"]
