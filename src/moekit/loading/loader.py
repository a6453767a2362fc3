"""Safetensors checkpoint loader (placeholder; being written)."""


def load_moe_layers(path, *, device=None, dtype=None):
    raise NotImplementedError("load_moe_layers is being written")
