"""The first twelve architectures: Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, DeepSeek-V2/V3/V4,
LongCat-Flash, gpt-oss, Llama 4 (text), GLM-4.5 (Glm4Moe), OLMoE; and Param2-MoE (GLM-4.5's block), Kimi-K2 and
Kimi-K2.5 (text; DeepSeek-V3's block)."""

from __future__ import annotations

from .common import (DS_RENAMES, E_KEYS, QWEN_RENAMES, ArchSpec, act, first, get, layers, mk, period, required,
                     towers)

def _plan_mixtral(cfg, spec):
    kw = dict(
        num_experts=int(first(cfg, E_KEYS[::-1], 8)),
        top_k=int(get(cfg, "num_experts_per_tok", 2)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(get(cfg, "intermediate_size", 14336)),
        routing="softmax top-k, renormalised",
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


def _qwen_sparse(cfg, i) -> bool:
    return (  # (the step read last, as transformers reads it: a model without experts never divides by it)
        i not in get(cfg, "mlp_only_layers", [])
        and int(first(cfg, E_KEYS, 0)) > 0
        and (i + 1) % period(cfg, "decoder_sparse_step") == 0
    )


def _plan_qwen(default_e, default_k, default_norm, shared: bool):
    def plan(cfg, spec):
        norm = bool(get(cfg, "norm_topk_prob", default_norm))
        kw = dict(
            num_experts=int(first(cfg, E_KEYS, default_e)),
            top_k=int(get(cfg, "num_experts_per_tok", default_k)),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            routing="softmax top-k" + (", renormalised" if norm else ""),
            renormalize=norm,
            activation=act(cfg),
        )
        if shared:  # a zero-width shared expert (and its gate) adds nothing in transformers: none planned
            width = int(cfg["shared_expert_intermediate_size"])
            kw.update(shared_intermediate_size=width, shared_expert_gate=width > 0)
        return [mk(spec, i, **kw) for i in range(layers(cfg)) if _qwen_sparse(cfg, i)]

    return plan


def _plan_olmoe(cfg, spec):
    norm = bool(get(cfg, "norm_topk_prob", False))
    kw = dict(
        num_experts=int(first(cfg, E_KEYS, 64)),
        top_k=int(get(cfg, "num_experts_per_tok", 8)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(get(cfg, "intermediate_size", 2048)),
        routing="softmax top-k" + (", renormalised" if norm else ""),
        renormalize=norm,
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


def _plan_deepseek_v2(cfg, spec):
    e = int(first(cfg, ("n_routed_experts", "num_experts", "num_local_experts"), 64))
    method = get(cfg, "topk_method", "greedy")
    kw = dict(
        num_experts=e,
        top_k=int(required(cfg, "num_experts_per_tok")),  # the class's default is null
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        renormalize=False,  # transformers' DeepSeek-V2 router never renormalises
        routed_scaling_factor=float(get(cfg, "routed_scaling_factor", 1.0)),
        router_fp32=True,
        shared_intermediate_size=int(cfg["moe_intermediate_size"]) * int(get(cfg, "n_shared_experts", 0)),
        shared_bias=bool(get(cfg, "mlp_bias", False)),  # the shared MLP's linears (the experts have none)
        activation=act(cfg),
    )
    if method == "group_limited_greedy":
        kw.update(num_expert_group=int(cfg["n_group"]), topk_group=int(cfg["topk_group"]))
        kw["routing"] = f"softmax grouped top-k (G={cfg['n_group']}, keep {cfg['topk_group']}), scaled"
    elif method == "greedy":
        kw["routing"] = "softmax top-k, scaled"
    else:
        raise NotImplementedError(f"DeepSeek-V2 topk_method={method!r} is not supported (greedy, group_limited_greedy)")
    first_dense = int(get(cfg, "first_k_dense_replace", 0))
    return [mk(spec, i, **kw) for i in range(first_dense, layers(cfg))]


def _plan_deepseek_v3(default_dense):
    def plan(cfg, spec):
        norm = bool(get(cfg, "norm_topk_prob", True))
        g, kg = int(get(cfg, "n_group", 1)), int(get(cfg, "topk_group", 1))
        kw = dict(
            num_experts=int(first(cfg, ("n_routed_experts", "num_local_experts"), 256)),
            top_k=int(cfg["num_experts_per_tok"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            routing=f"sigmoid + bias, grouped top-k (G={g}, keep {kg})" + (", renormalised" if norm else "") + ", scaled",
            scoring_func="sigmoid",
            renormalize=norm,
            routed_scaling_factor=float(get(cfg, "routed_scaling_factor", 1.0)),
            num_expert_group=g,
            topk_group=kg,
            has_score_bias=True,
            router_fp32=True,
            shared_intermediate_size=int(cfg["moe_intermediate_size"]) * int(get(cfg, "n_shared_experts", 1)),
            activation=act(cfg),
        )
        first_dense = int(get(cfg, "first_k_dense_replace", default_dense))
        return [mk(spec, i, **kw) for i in range(first_dense, layers(cfg))]

    return plan


def _plan_deepseek_v4(cfg, spec):
    n = layers(cfg)
    types = cfg.get("mlp_layer_types")
    if types is None:
        n_hash = int(get(cfg, "num_hash_layers", 3))
        types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    inter = int(get(cfg, "moe_intermediate_size", 2048))
    limit = cfg.get("swiglu_limit", 10.0)
    scoring = get(cfg, "scoring_func", "sqrtsoftplus")
    plans = []
    for i in range(n):
        hashed = types[i] == "hash_moe"
        plans.append(
            mk(
                spec,
                i,
                num_experts=int(first(cfg, ("n_routed_experts", "num_local_experts"), 256)),
                top_k=int(get(cfg, "num_experts_per_tok", 6)),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=inter,
                routing=(f"hash (tid2eid), {scoring} weights" if hashed else f"{scoring} + bias top-k")
                + ", renormalised, scaled",
                scoring_func=scoring,
                renormalize=True,  # transformers' DeepSeek-V4 routers always renormalise
                routed_scaling_factor=float(get(cfg, "routed_scaling_factor", 1.5)),
                has_score_bias=not hashed,
                hash_routing=hashed,
                needs_input_ids=hashed,
                swiglu_limit=None if limit is None else float(limit),
                shared_intermediate_size=inter,  # DeepseekV4MLP reads intermediate_size == moe_intermediate_size
                shared_swiglu_limit=None if limit is None else float(limit),
                shared_bias=bool(get(cfg, "mlp_bias", False)),  # the shared MLP's linears (the experts have none)
                activation=act(cfg),
            )
        )
    return plans


def _plan_longcat(cfg, spec):
    if get(cfg, "router_bias", False):
        raise NotImplementedError(
            "LongCat-Flash router_bias=True: transformers builds router.classifier with a bias but computes the "
            "router logits without it (F.linear(x, classifier.weight)), so the trained bias would be ignored there "
            "and applied by moekit's gate; rather than pick one of the two answers, moekit refuses router_bias=True")
    z = int(get(cfg, "zero_expert_num", 0))
    kw = dict(
        num_experts=int(first(cfg, ("n_routed_experts", "num_local_experts"), 512)),
        top_k=int(first(cfg, ("moe_topk", "num_experts_per_tok"), 12)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["expert_ffn_hidden_size"]),
        routing=f"softmax + bias top-k over E + Z, scaled ({z} zero experts)",
        renormalize=False,
        routed_scaling_factor=float(get(cfg, "routed_scaling_factor", 1.0)),
        has_score_bias=True,
        num_zero_experts=z,
        router_fp32=True,
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(int(get(cfg, "num_layers", 28)))]


def _plan_gpt_oss(cfg, spec):
    alpha = float(get(cfg, "swiglu_alpha", 1.702))
    if abs(alpha - 1.702) > 1e-9:
        raise NotImplementedError(f"gpt-oss swiglu_alpha={alpha}: moekit's swigluoai uses alpha=1.702")
    kw = dict(
        num_experts=int(first(cfg, ("num_local_experts", "num_experts"), 128)),
        top_k=int(get(cfg, "num_experts_per_tok", 4)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        routing="top-k logits, softmax over the k (= softmax, renormalised)",
        activation="swigluoai",
        swiglu_limit=float(get(cfg, "swiglu_limit", 7.0)),
        has_bias=True,
        router_bias=True,
        output="hidden_scores",
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


def _plan_llama4(cfg, spec):
    n = layers(cfg)
    k = int(get(cfg, "num_experts_per_tok", 1))
    if k != 1:
        raise NotImplementedError(f"Llama 4 with num_experts_per_tok={k}: moekit applies the weight on the input only for top-1")
    moe_layers = cfg.get("moe_layers")
    if moe_layers is None:
        step = period(cfg, "interleave_moe_layer_step")
        moe_layers = list(range(step - 1, n, step))
    kw = dict(
        num_experts=int(get(cfg, "num_local_experts", 16)),
        top_k=k,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        routing="top-1 on logits, sigmoid weight applied to the input",
        renormalize=False,
        custom_routing="llama4",
        apply_router_weight_on_input=True,
        shared_intermediate_size=int(cfg["intermediate_size"]),
        activation=act(cfg),
        output="hidden_logits",
    )
    return [mk(spec, i, **kw) for i in range(n) if i in set(moe_layers)]



SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("Mixtral", ("mixtral",), "mlp", ("block_sparse_moe", "mlp"), (), _plan_mixtral),
    ArchSpec("Qwen2-MoE", ("qwen2_moe",), "mlp", ("mlp",), QWEN_RENAMES, _plan_qwen(60, 4, False, True)),
    ArchSpec("Qwen3-MoE", ("qwen3_moe",), "mlp", ("mlp",), (), _plan_qwen(128, 8, False, False)),
    ArchSpec("Qwen3-Next", ("qwen3_next",), "mlp", ("mlp",), QWEN_RENAMES, _plan_qwen(512, 10, True, True)),
    ArchSpec("DeepSeek-V2", ("deepseek_v2",), "mlp", ("mlp",), (), _plan_deepseek_v2),
    # Kimi-K2's config.json says kimi_k2 (DeepSeek-V3's fields); Kimi-K2.5 (kimi_k25) wraps it in text_config.
    # transformers' kimi_k25 conversion renames every "blocks" to "layers" (for the vision encoder), so its
    # save_pretrained writes the text tower at language_model.model.blocks (round 63: that save did not load)
    ArchSpec("DeepSeek-V3", ("deepseek_v3", "kimi_k2"), "mlp", ("mlp",), DS_RENAMES, _plan_deepseek_v3(3),
             towers=towers("kimi_k25", ckpt_stacks=("language_model.model.blocks",))),
    ArchSpec(
        "DeepSeek-V4",
        ("deepseek_v4",),
        "mlp",
        ("ffn", "mlp"),
        DS_RENAMES
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
        experts_switch=True,  # transformers >= 5.25 decorates LongcatFlashExperts (5.24 and older: patch only)
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
        towers=towers("llama4", stack="language_model.model.layers"),
    ),
    ArchSpec("GLM-4.5 (Glm4Moe)", ("glm4_moe",), "mlp", ("mlp",), DS_RENAMES, _plan_deepseek_v3(1)),
    # Param2-MoE runs transformers' GLM-4.5 classes; its checkpoints name the selection bias ``gate.expert_bias``
    ArchSpec("Param2-MoE", ("param2moe",), "mlp", ("mlp",),
             DS_RENAMES + (("gate.expert_bias", "router.e_score_correction_bias"),),
             _plan_deepseek_v3(1)),  # its defaults and aliases: config_defaults
    ArchSpec("OLMoE", ("olmoe",), "mlp", ("mlp",), (), _plan_olmoe),
)

