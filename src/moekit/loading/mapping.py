"""Expert-parameter name mapping (placeholder; being written)."""


def fused_moe_make_expert_params_mapping(*args, **kwargs):
    raise NotImplementedError("fused_moe_make_expert_params_mapping is being written")


def load_layer_weights(layer, weights):
    raise NotImplementedError("load_weights is being written")
