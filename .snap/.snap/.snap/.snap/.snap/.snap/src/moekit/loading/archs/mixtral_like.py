"""Mixtral-shaped blocks (softmax router, Mixtral experts): MiniMax, PhiMoE, Jamba, Hunyuan-MoE, Cohere2-MoE."""

from __future__ import annotations

from .common import E_KEYS, ArchSpec, act, first, get, layers, mk, period, sparse_layers
from .core import _plan_mixtral

ROUTER_TO_GATE = (("router.", "gate."),)


def _plan_phimoe(cfg, spec):
    jitter = float(get(cfg, "router_jitter_noise", 0.01))
    kw = dict(
        num_experts=int(first(cfg, ("num_local_experts", "num_experts"), 16)),
        top_k=2,  # transformers' sparsemixer always routes 2 experts, whatever num_experts_per_tok says
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(get(cfg, "intermediate_size", 6400)),
        routing=f"sparsemixer top-2 (jitter {jitter:g})",
        renormalize=False,
        custom_routing="phimoe",
        custom_routing_arg=jitter,
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


def _plan_jamba(cfg, spec):
    e = int(first(cfg, E_KEYS, 16))
    every, offset = period(cfg, "expert_layer_period", 2), int(get(cfg, "expert_layer_offset", 1))
    kw = dict(
        num_experts=e,
        top_k=int(get(cfg, "num_experts_per_tok", 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(get(cfg, "intermediate_size", 14336)),
        routing="softmax top-k",
        renormalize=False,
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg)) if e > 1 and (i - offset) % every == 0]


def _per_layer(v, i):
    return v[i] if isinstance(v, (list, tuple)) else v


def _plan_hunyuan(cfg, spec):
    inter = int(get(cfg, "intermediate_size", 11008))
    return [
        mk(
            spec,
            i,
            num_experts=int(_per_layer(get(cfg, "num_experts", 1), i)),
            top_k=int(_per_layer(get(cfg, "moe_topk", 1), i)),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=inter,
            routing="softmax (fp32 gate) top-k, renormalised + shared MLP",
            router_fp32=True,
            shared_intermediate_size=inter,
            shared_activation=act(cfg),
            activation=act(cfg),
        )
        for i in range(layers(cfg))
    ]


def _plan_cohere2(cfg, spec):
    fn = get(cfg, "expert_selection_fn", "softmax")
    if fn not in ("softmax", "sigmoid"):
        raise NotImplementedError(f"Cohere2-MoE expert_selection_fn={fn!r} (softmax, sigmoid)")
    norm = fn == "softmax" or bool(get(cfg, "norm_topk_prob", True))
    inter = int(get(cfg, "intermediate_size", 4096))
    n_shared = int(get(cfg, "num_shared_experts", 0))
    strategy = get(cfg, "shared_expert_combination_strategy", "average")
    if n_shared and strategy not in ("sum", "average"):
        raise NotImplementedError(f"Cohere2-MoE shared_expert_combination_strategy={strategy!r} (sum, average)")
    half = 0.5 if n_shared and strategy == "average" else 1.0  # (routed + shared) / 2
    kw = dict(
        num_experts=int(first(cfg, E_KEYS, 8)),
        top_k=int(get(cfg, "num_experts_per_tok", 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=inter,
        routing=f"{fn} top-k" + (", renormalised" if norm else "") + (f" + shared ({strategy})" if n_shared else ""),
        scoring_func=fn,
        renormalize=norm,
        routed_scaling_factor=half,
        shared_intermediate_size=inter * n_shared,
        shared_activation=act(cfg),
        shared_scale=half,
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in sparse_layers(cfg)]


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("MiniMax", ("minimax",), "mlp", ("block_sparse_moe", "mlp"), (), _plan_mixtral),
    ArchSpec("PhiMoE", ("phimoe",), "mlp", ("block_sparse_moe", "mlp"), ROUTER_TO_GATE, _plan_phimoe),
    ArchSpec("Jamba", ("jamba",), "feed_forward", ("feed_forward",), ROUTER_TO_GATE, _plan_jamba),
    ArchSpec(
        "Hunyuan-MoE",
        ("hunyuan_v1_moe",),
        "mlp",
        ("mlp",),
        (("gate.wg.", "gate."), ("shared_mlp.", "shared_experts.")),
        _plan_hunyuan,
    ),
    ArchSpec("Cohere2-MoE", ("cohere2_moe",), "mlp", ("mlp",), (), _plan_cohere2),
)
