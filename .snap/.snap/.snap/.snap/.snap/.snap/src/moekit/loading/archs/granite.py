"""Granite-MoE (+ shared, SWA, hybrid): the block is ``block_sparse_moe``; top-k of the logits, softmax
over the k (= softmax top-k, renormalised). The shared MLP of granitemoeshared / _swa / hybrid is a
sibling of the block in the decoder layer (``moe(h) + shared_mlp(h)``), so it stays outside the moekit
layer, as in transformers."""

from __future__ import annotations

from .common import ArchSpec, act, first, get, layers, mk

GRANITE_RENAMES = (
    ("input_linear.weight", "experts.gate_up_proj"),
    ("output_linear.weight", "experts.down_proj"),
    ("router.layer.", "gate."),
    ("router.", "gate."),
)


def _plan_granite(cfg, spec):
    e = int(first(cfg, ("num_local_experts", "num_experts"), 8))
    kw = dict(
        num_experts=e,
        top_k=int(get(cfg, "num_experts_per_tok", 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        routing="top-k logits, softmax over the k (= softmax, renormalised)",
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))] if e > 0 else []


def _spec(name, model_type):
    return ArchSpec(name, (model_type,), "block_sparse_moe", ("block_sparse_moe",), GRANITE_RENAMES, _plan_granite)


SPECS: tuple[ArchSpec, ...] = (
    _spec("Granite-MoE", "granitemoe"),
    _spec("Granite-MoE-Shared", "granitemoeshared"),
    _spec("Granite-MoE-SWA", "granitemoe_swa"),
    _spec("Granite-MoE-Hybrid (Granite 4)", "granitemoehybrid"),
)
