"""One small spec per supported architecture: config.json (a dict) -> the MoE blocks' :class:`LayerPlan`.

Each spec mirrors the transformers 5.x modeling file of its architecture (module names, routing math,
defaults of its config class) and names the keys its checkpoints use on disk. No transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..ops.activation import activation_from_hf
from .plan import LayerPlan


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    block: str  # module attribute of the MoE block in a decoder layer ("mlp", "feed_forward")
    ckpt_blocks: tuple[str, ...]  # names of that block in checkpoint keys
    renames: tuple[tuple[str, str], ...]  # block-relative key prefix renames: checkpoint -> moekit layer
    plan: Callable[[dict, "ArchSpec"], list[LayerPlan]]
    experts_switch: bool = True  # transformers' experts_implementation switch exists for it
    fused_layout: str = "rows"


def _get(cfg: dict, key: str, default):
    v = cfg.get(key)
    return default if v is None else v


def _act(cfg: dict) -> str:
    return activation_from_hf(_get(cfg, "hidden_act", "silu"))


def _first(cfg: dict, keys: tuple[str, ...], default):
    """The first of ``keys`` present (transformers' attribute maps save either name)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


_E_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _layers(cfg: dict) -> int:
    return int(_get(cfg, "num_hidden_layers", 0))


def _prefixes(spec: ArchSpec, i: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.{b}." for b in spec.ckpt_blocks) + tuple(
        f"layers.{i}.{b}." for b in spec.ckpt_blocks
    )


def _mk(spec: ArchSpec, i: int, **kw) -> LayerPlan:
    kw.setdefault("fused_layout", spec.fused_layout)
    return LayerPlan(name=f"model.layers.{i}.{spec.block}", layer_idx=i, ckpt_prefixes=_prefixes(spec, i), **kw)


# -- architectures --------------------------------------------------------------------------------
def _plan_mixtral(cfg, spec):
    kw = dict(
        num_experts=int(_first(cfg, _E_KEYS[::-1], 8)),
        top_k=int(_get(cfg, "num_experts_per_tok", 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(_get(cfg, "intermediate_size", 14336)),
        routing="softmax top-k, renormalised",
        activation=_act(cfg),
    )
    return [_mk(spec, i, **kw) for i in range(_layers(cfg))]


def _qwen_sparse(cfg, i) -> bool:
    step = int(_get(cfg, "decoder_sparse_step", 1))
    return (
        i not in _get(cfg, "mlp_only_layers", [])
        and int(_first(cfg, _E_KEYS, 0)) > 0
        and (i + 1) % step == 0
    )


def _plan_qwen(default_e, default_k, default_norm, shared: bool):
    def plan(cfg, spec):
        norm = bool(_get(cfg, "norm_topk_prob", default_norm))
        kw = dict(
            num_experts=int(_first(cfg, _E_KEYS, default_e)),
            top_k=int(_get(cfg, "num_experts_per_tok", default_k)),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            routing="softmax top-k" + (", renormalised" if norm else ""),
            renormalize=norm,
            activation=_act(cfg),
        )
        if shared:
            kw.update(shared_intermediate_size=int(cfg["shared_expert_intermediate_size"]), shared_expert_gate=True)
        return [_mk(spec, i, **kw) for i in range(_layers(cfg)) if _qwen_sparse(cfg, i)]

    return plan


def _plan_olmoe(cfg, spec):
    norm = bool(_get(cfg, "norm_topk_prob", False))
    kw = dict(
        num_experts=int(_first(cfg, _E_KEYS, 64)),
        top_k=int(_get(cfg, "num_experts_per_tok", 8)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(_get(cfg, "intermediate_size", 2048)),
        routing="softmax top-k" + (", renormalised" if norm else ""),
        renormalize=norm,
        activation=_act(cfg),
    )
    return [_mk(spec, i, **kw) for i in range(_layers(cfg))]


def _plan_deepseek_v2(cfg, spec):
    e = int(_first(cfg, ("n_routed_experts", "num_experts", "num_local_experts"), 64))
    method = _get(cfg, "topk_method", "greedy")
    kw = dict(
        num_experts=e,
        top_k=int(cfg["num_experts_per_tok"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        renormalize=False,  # transformers' DeepSeek-V2 router never renormalises
        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)),
        router_fp32=True,
        shared_intermediate_size=int(cfg["moe_intermediate_size"]) * int(_get(cfg, "n_shared_experts", 0)),
        activation=_act(cfg),
    )
    if method == "group_limited_greedy":
        kw.update(num_expert_group=int(cfg["n_group"]), topk_group=int(cfg["topk_group"]))
        kw["routing"] = f"softmax grouped top-k (G={cfg['n_group']}, keep {cfg['topk_group']}), scaled"
    elif method == "greedy":
        kw["routing"] = "softmax top-k, scaled"
    else:
        raise NotImplementedError(f"DeepSeek-V2 topk_method={method!r} is not supported (greedy, group_limited_greedy)")
    first_dense = int(_get(cfg, "first_k_dense_replace", 0))
    return [_mk(spec, i, **kw) for i in range(first_dense, _layers(cfg))]


def _plan_deepseek_v3(default_dense):
    def plan(cfg, spec):
        norm = bool(_get(cfg, "norm_topk_prob", True))
        g, kg = int(_get(cfg, "n_group", 1)), int(_get(cfg, "topk_group", 1))
        kw = dict(
            num_experts=int(_first(cfg, ("n_routed_experts", "num_local_experts"), 256)),
            top_k=int(cfg["num_experts_per_tok"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            routing=f"sigmoid + bias, grouped top-k (G={g}, keep {kg})" + (", renormalised" if norm else "") + ", scaled",
            scoring_func="sigmoid",
            renormalize=norm,
            routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)),
            num_expert_group=g,
            topk_group=kg,
            has_score_bias=True,
            router_fp32=True,
            shared_intermediate_size=int(cfg["moe_intermediate_size"]) * int(_get(cfg, "n_shared_experts", 1)),
            activation=_act(cfg),
        )
        first_dense = int(_get(cfg, "first_k_dense_replace", default_dense))
        return [_mk(spec, i, **kw) for i in range(first_dense, _layers(cfg))]

    return plan


def _plan_deepseek_v4(cfg, spec):
    n = _layers(cfg)
    types = cfg.get("mlp_layer_types")
    if types is None:
        n_hash = int(_get(cfg, "num_hash_layers", 3))
        types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    inter = int(_get(cfg, "moe_intermediate_size", 2048))
    limit = cfg.get("swiglu_limit", 10.0)
    scoring = _get(cfg, "scoring_func", "sqrtsoftplus")
    plans = []
    for i in range(n):
        hashed = types[i] == "hash_moe"
        plans.append(
            _mk(
                spec,
                i,
                num_experts=int(_first(cfg, ("n_routed_experts", "num_local_experts"), 256)),
                top_k=int(_get(cfg, "num_experts_per_tok", 6)),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=inter,
                routing=(f"hash (tid2eid), {scoring} weights" if hashed else f"{scoring} + bias top-k")
                + ", renormalised, scaled",
                scoring_func=scoring,
                renormalize=True,  # transformers' DeepSeek-V4 routers always renormalise
                routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.5)),
                has_score_bias=not hashed,
                hash_routing=hashed,
                needs_input_ids=hashed,
                swiglu_limit=None if limit is None else float(limit),
                shared_intermediate_size=inter,  # DeepseekV4MLP reads intermediate_size == moe_intermediate_size
                shared_swiglu_limit=None if limit is None else float(limit),
                activation=_act(cfg),
            )
        )
    return plans


def _plan_longcat(cfg, spec):
    z = int(_get(cfg, "zero_expert_num", 0))
    kw = dict(
        num_experts=int(_first(cfg, ("n_routed_experts", "num_local_experts"), 512)),
        top_k=int(_first(cfg, ("moe_topk", "num_experts_per_tok"), 12)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["expert_ffn_hidden_size"]),
        routing=f"softmax + bias top-k over E + Z, scaled ({z} zero experts)",
        renormalize=False,
        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)),
        has_score_bias=True,
        num_zero_experts=z,
        router_bias=bool(_get(cfg, "router_bias", False)),
        router_fp32=True,
        activation=_act(cfg),
    )
    return [_mk(spec, i, **kw) for i in range(int(_get(cfg, "num_layers", 28)))]


def _plan_gpt_oss(cfg, spec):
    alpha = float(_get(cfg, "swiglu_alpha", 1.702))
    if abs(alpha - 1.702) > 1e-9:
        raise NotImplementedError(f"gpt-oss swiglu_alpha={alpha}: moekit's swigluoai uses alpha=1.702")
    kw = dict(
        num_experts=int(_first(cfg, ("num_local_experts", "num_experts"), 128)),
        top_k=int(_get(cfg, "num_experts_per_tok", 4)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        routing="top-k logits, softmax over the k (= softmax, renormalised)",
        activation="swigluoai",
        swiglu_limit=float(_get(cfg, "swiglu_limit", 7.0)),
        has_bias=True,
        router_bias=True,
        output="hidden_scores",
    )
    return [_mk(spec, i, **kw) for i in range(_layers(cfg))]


def _plan_llama4(cfg, spec):
    n = _layers(cfg)
    k = int(_get(cfg, "num_experts_per_tok", 1))
    if k != 1:
        raise NotImplementedError(f"Llama 4 with num_experts_per_tok={k}: moekit applies the weight on the input only for top-1")
    moe_layers = cfg.get("moe_layers")
    if moe_layers is None:
        step = int(_get(cfg, "interleave_moe_layer_step", 1))
        moe_layers = list(range(step - 1, n, step))
    kw = dict(
        num_experts=int(_get(cfg, "num_local_experts", 16)),
        top_k=k,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        routing="top-1 on logits, sigmoid weight applied to the input",
        renormalize=False,
        custom_routing="llama4",
        apply_router_weight_on_input=True,
        shared_intermediate_size=int(cfg["intermediate_size"]),
        activation=_act(cfg),
        output="hidden_logits",
    )
    return [_mk(spec, i, **kw) for i in range(n) if i in set(moe_layers)]


_QWEN_RENAMES = (("shared_expert.", "shared_experts."),)
_DS_RENAMES = (("gate.e_score_correction_bias", "router.e_score_correction_bias"),)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("Mixtral", ("mixtral",), "mlp", ("block_sparse_moe", "mlp"), (), _plan_mixtral),
    ArchSpec("Qwen2-MoE", ("qwen2_moe",), "mlp", ("mlp",), _QWEN_RENAMES, _plan_qwen(60, 4, False, True)),
    ArchSpec("Qwen3-MoE", ("qwen3_moe",), "mlp", ("mlp",), (), _plan_qwen(128, 8, False, False)),
    ArchSpec("Qwen3-Next", ("qwen3_next",), "mlp", ("mlp",), _QWEN_RENAMES, _plan_qwen(512, 10, True, True)),
    ArchSpec("DeepSeek-V2", ("deepseek_v2",), "mlp", ("mlp",), (), _plan_deepseek_v2),
    ArchSpec("DeepSeek-V3", ("deepseek_v3",), "mlp", ("mlp",), _DS_RENAMES, _plan_deepseek_v3(3)),
    ArchSpec(
        "DeepSeek-V4",
        ("deepseek_v4",),
        "mlp",
        ("ffn", "mlp"),
        _DS_RENAMES
        + (
            ("gate.bias", "router.e_score_correction_bias"),
            ("gate.tid2eid", "router.hash_indices_table"),
            ("shared_experts.w1.", "shared_experts.gate_proj."),
            ("shared_experts.w2.", "shared_experts.down_proj."),
            ("shared_experts.w3.", "shared_experts.up_proj."),
        ),
        _plan_deepseek_v4,
    ),
    ArchSpec(
        "LongCat-Flash",
        ("longcat_flash",),
        "mlp",
        ("mlp",),
        (("router.classifier.", "gate."),),
        _plan_longcat,
        experts_switch=False,
    ),
    ArchSpec(
        "gpt-oss",
        ("gpt_oss",),
        "mlp",
        ("mlp",),
        (("router.", "gate."),),
        _plan_gpt_oss,
        fused_layout="transposed_interleaved",
    ),
    ArchSpec(
        "Llama 4",
        ("llama4_text",),
        "feed_forward",
        ("feed_forward",),
        (("router.", "gate."), ("shared_expert.", "shared_experts.")),
        _plan_llama4,
        experts_switch=False,
        fused_layout="transposed",
    ),
    ArchSpec("GLM-4.5 (Glm4Moe)", ("glm4_moe",), "mlp", ("mlp",), _DS_RENAMES, _plan_deepseek_v3(1)),
    ArchSpec("OLMoE", ("olmoe",), "mlp", ("mlp",), (), _plan_olmoe),
)

BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def spec_for(config: dict) -> ArchSpec:
    """The spec of a config.json dict; unsupported architectures raise ``NotImplementedError``."""
    mt = config.get("model_type")
    if mt not in BY_MODEL_TYPE and not (mt == "llama4" and "text_config" in config):
        names = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in SPECS)
        raise NotImplementedError(f"model_type={mt!r} is not supported; supported architectures: {names}")
    return BY_MODEL_TYPE[mt]


def plan_layers(config: dict) -> tuple[ArchSpec, list[LayerPlan]]:
    """(spec, the MoE blocks of the model in layer order); ``quantization_config`` is read by the loader."""
    if config.get("model_type") == "llama4" and isinstance(config.get("text_config"), dict):
        # the multimodal wrapper: its text tower is Llama4ForCausalLM at ``language_model``
        text = dict(config["text_config"], model_type="llama4_text")
        spec = spec_for(text)
        plans = [
            replace(
                p,
                name="language_model." + p.name,
                ckpt_prefixes=tuple("language_model." + c for c in p.ckpt_prefixes if c.startswith("model.")),
            )
            for p in spec.plan(text, spec)
        ]
        return spec, plans
    spec = spec_for(config)
    return spec, spec.plan(config, spec)


def rename_block_key(spec: ArchSpec, rest: str) -> str:
    """A block-relative checkpoint key -> the moekit layer's name for it."""
    for old, new in spec.renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest
