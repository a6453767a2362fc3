"""Architectures of their own: OpenAI privacy filter (gpt-oss experts), DBRX, JetMoE (its MLP MoE), Aria.
Refused: Zaya (router state carried from layer to layer)."""

from __future__ import annotations

from .common import ArchSpec, act, first, get, layers, mk, towers
from .core import _plan_gpt_oss


def _plan_opf(cfg, spec):
    """gpt-oss experts, concatenated (not interleaved) gate/up; fp32 router with bias; the block divides
    the weights by K and multiplies its output by K again (net: softmax top-k, renormalised)."""
    from dataclasses import replace

    return [replace(p, router_fp32=True, output="hidden_scores_over_k") for p in _plan_gpt_oss(cfg, spec)]


def _plan_dbrx(cfg, spec):
    ffn = cfg.get("ffn_config") or {}
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    kw = dict(
        num_experts=int(get(ffn, "moe_num_experts", 4)),
        top_k=int(get(ffn, "moe_top_k", 1)),
        hidden_size=int(first(cfg, ("d_model", "hidden_size"), 2048)),
        intermediate_size=int(get(ffn, "ffn_hidden_size", 3584)),
        activation=act({"hidden_act": (ffn.get("ffn_act_fn") or {}).get("name", "silu")}),
    )
    if p is None:
        kw.update(routing="softmax top-k", renormalize=False)
    elif float(p) == 1.0:
        kw.update(routing="softmax top-k, renormalised")
    else:
        kw.update(routing=f"softmax top-k, / L{float(p):g} norm", renormalize=False, custom_routing="pnorm",
                  custom_routing_arg=float(p))
    return [mk(spec, i, **kw) for i in range(int(first(cfg, ("n_layers", "num_hidden_layers"), 24)))]


def _plan_jetmoe(cfg, spec):
    kw = dict(
        num_experts=int(first(cfg, ("num_local_experts", "num_experts"), 8)),
        top_k=int(get(cfg, "num_experts_per_tok", 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(get(cfg, "intermediate_size", 5632)),
        routing="top-k logits, softmax over the k (= softmax, renormalised) + output bias",
        activation=act({"hidden_act": get(cfg, "activation_function", "silu")}),
        output_transform="bias",
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


def _plan_aria(cfg, spec):
    inter = int(get(cfg, "intermediate_size", 4096))
    kw = dict(
        num_experts=int(first(cfg, ("moe_num_experts", "num_experts"), 8)),
        top_k=int(first(cfg, ("moe_topk", "num_experts_per_tok"), 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=inter,
        routing="top-k logits, softmax over the k (= softmax, renormalised) + shared",
        activation="silu",  # AriaExperts always use SiLU, whatever hidden_act says
        shared_intermediate_size=inter * int(get(cfg, "moe_num_shared_experts", 2)),
        shared_activation=act(cfg),
        shared_bias=bool(get(cfg, "mlp_bias", False)),  # the shared MLP's linears (the grouped experts have none)
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


JETMOE_RENAMES = (("input_linear.weight", "experts.gate_up_proj"), ("output_linear.weight", "experts.down_proj"),
                  ("router.layer.", "gate."), ("bias", "routed_output_transform.bias"))

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("OpenAI privacy filter", ("openai_privacy_filter",), "mlp", ("mlp",), (("router.", "gate."),),
             _plan_opf, fused_layout="transposed"),
    ArchSpec("DBRX", ("dbrx",), "ffn", ("ffn",), (("router.layer.", "gate."),), _plan_dbrx, experts_switch=False,
             stack="transformer.blocks",
             splits=(("experts.mlp.w1", "gate_proj", False), ("experts.mlp.v1", "up_proj", False),
                     ("experts.mlp.w2", "down_proj", True))),
    ArchSpec("JetMoE", ("jetmoe",), "mlp", ("mlp",), JETMOE_RENAMES, _plan_jetmoe, experts_switch=False),
    ArchSpec(
        "Aria (text)",
        ("aria_text",),
        "mlp",
        ("mlp",),
        (("experts.fc1.weight", "experts.gate_up_proj"), ("experts.fc2.weight", "experts.down_proj"),
         ("router.", "gate.")),
        _plan_aria,
        fused_layout="transposed",
        towers=towers("aria"),
    ),
)

REFUSED = {
    "zaya": "Zaya's router carries a hidden state from one layer's router to the next (and routes to a "
    "skip expert); a moekit layer routes from its own input only",
    "switch_transformers": "Switch Transformers' top-1 router drops the tokens past each expert's capacity "
    "(expert_capacity, counted per sequence) in an encoder-decoder; a moekit router never drops a token",
    "nllb-moe": "NLLB-MoE's top-2 router drops the tokens past each expert's capacity (expert_capacity, "
    "batch-prioritised, moe_eval_capacity_token_fraction) in an encoder-decoder; a moekit router never drops a token",
    "doge": "Doge's CDMoE router picks product keys and its experts are single rows of two embedding tables "
    "(up_embed / down_embed, a rank-1 expert each) beside a dense MLP; there are no [E, 2I, H] / [E, H, I] stacks",
}
