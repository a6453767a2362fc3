"""Checkpoint loading: architecture specs and plans, the safetensors loader (no transformers needed).

The checkpoint-name mapping lives with the experts (:mod:`moekit.experts.mapping`); it is re-exported here.
"""

from ..experts.mapping import fused_moe_make_expert_params_mapping, load_layer_weights
from .architectures import supported_model_types
from .loader import load_moe_layers

__all__ = ["fused_moe_make_expert_params_mapping", "load_layer_weights", "load_moe_layers", "supported_model_types"]
