"""What :mod:`moekit.integrations.transformers` reads off a transformers model: its config as a dict, its activation
dtype, the modules at the planned MoE blocks' paths, and the experts interface a switch-decorated experts class
dispatches through."""

from __future__ import annotations

import torch

from ..loading.plan import LayerPlan


def _model_config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"patch() needs a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    d = cfg.to_dict()
    d.setdefault("model_type", getattr(cfg, "model_type", None))
    return d


def check_patch_args(backend, eager_graph_tokens) -> None:
    """patch()'s ``backend`` and ``eager_graph_tokens``, checked before anything is read or built."""
    from ..ops.kernels import BACKENDS

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"patch(): backend must be one of {list(BACKENDS)}, got {backend!r}")
    if eager_graph_tokens is not None and (isinstance(eager_graph_tokens, bool) or not isinstance(
            eager_graph_tokens, int) or eager_graph_tokens < 0):
        raise ValueError(f"patch(): eager_graph_tokens must be None or an int >= 0, got {eager_graph_tokens!r}")


def _activation_dtype(model) -> torch.dtype | None:
    """The dtype the model's hidden states have: its input embeddings' (None without them). A quantised block may hold
    no weight in it (round 51's review: a bf16 fp8 DeepSeek-V3 block holds fp8 linears, float32 scales and the
    router weight transformers keeps in float32), so the block alone cannot tell."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    w = getattr(emb, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else None


def _tail(name: str) -> str:
    return ".".join(name.split(".")[-2:])  # "3.mlp", "layers.3" (a layer-level block)


def _planned_blocks(model, plans: list[LayerPlan]):
    """(path, module, plan) of every module of ``model`` at a plan's path, or at a path that is a tail
    of it (a sub-model was passed) or that it is a tail of (the model sits inside a larger one)."""
    by_tail: dict[str, list[LayerPlan]] = {}
    for p in plans:
        by_tail.setdefault(_tail(p.name), []).append(p)
    for name, module in list(model.named_modules()):
        for p in by_tail.get(_tail(name), ()):
            if p.name == name or p.name.endswith("." + name) or name.endswith("." + p.name):
                yield name, module, p
                break


def switch_interface(experts):
    """The ``ExpertsInterface`` (transformers' experts switch: its ``_global_mapping`` of names to forwards) that the
    forward of ``experts``' class dispatches through, or None (a class not decorated with
    ``@use_experts_implementation``). Quantised experts classes dispatch through their own (transformers 5.25:
    ``FP8Experts`` through ``FP8ExpertsInterface``, which a name registered on ``ExpertsInterface`` does not reach)."""
    from transformers.integrations.moe import ExpertsInterface

    forward = getattr(type(experts), "forward", None)
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            held = cell.cell_contents
        except ValueError:  # (an empty cell)
            continue
        if isinstance(held, ExpertsInterface):
            return held
    return None
