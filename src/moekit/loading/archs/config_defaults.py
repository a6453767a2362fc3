"""A config.json read as its transformers config class reads it: :func:`complete` fills what the file lacks.

Hub configs often omit fields; transformers then uses its config class's defaults (and its ``attribute_map``
aliases, and a few fields it derives from others: ``mlp_layer_types`` from a ``first_k_dense_replace`` kwarg...).
The plans must see the same values, or a checkpoint would load with a different routing than transformers
runs. Per model type (the text tower's for a multimodal wrapper):

- ``ALIASES[model_type]``: a raw key -> the class field it sets (its ``attribute_map``), applied first;
- ``DEFAULTS[model_type]``: the class's default of every field a plan reads whose plan fallback differs
  (the values are transformers 5.25's); a callable is derived from the completed dict, after the constants.

``tests/integrations/test_config_defaults.py`` drops each field of transformers' default config of every
supported type and checks the plan does not change. No transformers import here.
"""

from __future__ import annotations

from .common import get, layers, period

SPARSE, DENSE = "sparse", "dense"


def _dense_first(k_default: int = 1, *, freq: bool = False, key: str | None = "first_k_dense_replace"):
    """``mlp_layer_types`` from the ``first_k_dense_replace`` kwarg (or the class's own ``key``; None: the class reads
    none, ``k_default`` dense layers; default ``k_default``; with ``freq`` also the ``moe_layer_freq`` kwarg: an int
    step or a per-layer list), as the class derives it when it is absent."""

    def derive(cfg: dict) -> list[str]:
        k = int(get(cfg, key, k_default)) if key else k_default
        f = get(cfg, "moe_layer_freq", 1) if freq else 1
        if isinstance(f, (list, tuple)) and len(f) < layers(cfg):  # (round 65: an IndexError naming no field)
            raise ValueError(f"moe_layer_freq lists {len(f)} layers, expected one entry per layer "
                             f"(num_hidden_layers = {layers(cfg)})")
        if not isinstance(f, (list, tuple)):
            f = period(cfg, "moe_layer_freq") if freq else 1  # a step >= 1 (0: a ValueError naming it, review)
        return [SPARSE if i >= k and (bool(f[i]) if isinstance(f, (list, tuple)) else i % f == 0) else DENSE
                for i in range(layers(cfg))]

    return derive


def _dense_head(n: int):
    """``mlp_layer_types``: the first ``n`` layers dense whatever ``first_k_dense_replace`` says (the class
    ignores it)."""

    def derive(cfg: dict) -> list[str]:
        total = layers(cfg)
        return [DENSE] * min(n, total) + [SPARSE] * max(total - n, 0)

    return derive


#: ``mlp_layer_types`` of a class that reads no ``first_k_dense_replace`` (Solar Open deletes it; MiniMax-M2,
#: Kolibri-1, Muse Spark, Inkling-2): every layer sparse, a stray key of another family ignored (round 65)
_ALL_SPARSE = _dense_head(0)


def _step_layers(cfg: dict) -> list[str]:
    """Step-3.x: the ``moe_layers_enum`` kwarg ("3,4,5" or a list of MoE layer indices), else layers 3 on."""
    enum = cfg.get("moe_layers_enum")
    n = layers(cfg)
    if enum is None:
        moe = set(range(3, n))
    else:
        items = enum.split(",") if isinstance(enum, str) else enum
        moe = {int(i) for i in items if str(i).strip()}
    return [SPARSE if i in moe else DENSE for i in range(n)]


_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def _nemotron_blocks(cfg: dict) -> list[str]:
    """Nemotron-H: ``layers_block_type`` from the legacy ``hybrid_override_pattern`` ("MEM*E-..."), else the
    class's default."""
    pattern = cfg.get("hybrid_override_pattern")
    if pattern is None:
        return ["linear_attention", "moe", "full_attention", "mlp"]
    return [_PATTERN[c] for c in pattern]


_LOCAL_TO_ROUTED = {"num_local_experts": "n_routed_experts"}
_TO_LOCAL = {"num_experts": "num_local_experts"}
_LOCAL_TO_E = {"num_local_experts": "num_experts"}
_KIMI = {"norm_topk_prob": "moe_renormalize", "n_group": "num_expert_group", "num_local_experts": "num_experts",
         "num_experts_per_tok": "num_experts_per_token", "n_shared_experts": "num_shared_experts"}
_INKLING2 = {**_LOCAL_TO_ROUTED, "intermediate_size": "moe_intermediate_size", "routed_scaling_factor": "route_scale"}

#: raw config key -> the config class field it sets (transformers' ``attribute_map``; dots3: a kwarg its
#: ``__post_init__`` renames), per model type
ALIASES: dict[str, dict[str, str]] = {
    **dict.fromkeys(("axk1", "axk2", "deepseek_v3", "deepseek_v32", "kimi_k2", "dots1", "glm4_moe",
                     "glm4_moe_lite", "glm4v_moe_text", "glm5_next_text", "glm_moe_dsa", "hy_v4", "hy_v4_vl_text",
                     "inkling_text", "mimo_v2_flash", "minicpm5_moe", "mistral4", "mistral_large4_text",
                     "solar_open"), _LOCAL_TO_ROUTED),
    **dict.fromkeys(("deepseek_v2", "deepseek_ocr2_text", "unlimited_ocr_text"), {"num_experts": "n_routed_experts"}),
    **dict.fromkeys(("gpt_oss", "kolibri1", "kolibri1_1", "mellum", "minimax", "minimax_m2", "minimax_m3_vl_text",
                     "mixtral", "openai_privacy_filter", "qwen3_moe", "qwen3_vl_moe_text"), _TO_LOCAL),
    **dict.fromkeys(("flex_olmo", "hy_v3", "jamba", "olmoe"), _LOCAL_TO_E),
    **dict.fromkeys(("inkling2_text", "inkling2_loop_text"), _INKLING2),
    "bailing_hybrid": {**_KIMI, "swiglu_limits": "expert_swiglu_limit_list",
                       "swiglu_limits_shared": "share_expert_swiglu_limit_list"},
    "kimi_linear": _KIMI,
    "dbrx": {"hidden_size": "d_model", "num_hidden_layers": "n_layers"},
    "deepseek_v4": {**_LOCAL_TO_ROUTED, "intermediate_size": "moe_intermediate_size"},
    "dots3_note_text": {**_LOCAL_TO_ROUTED, "moe_shared_expert_intermediate_size": "shared_experts_intermediate_size"},
    "ernie4_5_moe": {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"},
    "hunyuan_v1_moe": {"num_experts_per_tok": "moe_topk", "num_local_experts": "num_experts"},
    "longcat_flash": {**_LOCAL_TO_ROUTED, "num_experts_per_tok": "moe_topk", "moe_intermediate_size":
                      "expert_ffn_hidden_size"},
    "nemotron_h": {"layer_types": "layers_block_type", **_LOCAL_TO_ROUTED},
    "param2moe": {**_LOCAL_TO_ROUTED, "num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts"},
    "step3p5": {**_LOCAL_TO_ROUTED, "moe_num_experts": "n_routed_experts", "moe_top_k": "num_experts_per_tok",
                "share_expert_dims": "share_expert_dim"},
}

_DS_MLA = dict(hidden_size=7168, moe_intermediate_size=2048, num_hidden_layers=61, routed_scaling_factor=2.5,
               n_group=8, topk_group=4)
_GRANITE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
_V2 = dict(hidden_size=4096, num_hidden_layers=32, moe_intermediate_size=1407, n_shared_experts=2)
_E5 = 1e-05

#: the config class's default of each field a plan reads (where the plan's own fallback differs), per model type
DEFAULTS: dict[str, dict] = {
    # core, Mixtral-like, Granite, Qwen-like, singletons
    "mixtral": dict(hidden_size=4096, num_hidden_layers=32),
    "minimax": dict(hidden_size=4096, num_hidden_layers=32),
    "phimoe": dict(hidden_size=4096, num_hidden_layers=32),
    "jamba": dict(hidden_size=4096, num_hidden_layers=32),
    "hunyuan_v1_moe": dict(hidden_size=4096, num_hidden_layers=32),
    "cohere2_moe": dict(hidden_size=8192, intermediate_size=22528, num_hidden_layers=40,
                        mlp_layer_types=_dense_first(0)),  # (its first_k_dense_replace kwarg, round 65)
    "qwen2_moe": dict(hidden_size=2048, num_hidden_layers=24, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts=60),
    "qwen3_moe": dict(hidden_size=2048, num_hidden_layers=24, moe_intermediate_size=768, num_local_experts=128),
    "qwen3_next": dict(hidden_size=2048, num_hidden_layers=48, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512, num_experts=512),
    "qwen3_5_moe_text": dict(hidden_size=2048, num_hidden_layers=40, moe_intermediate_size=512,
                             shared_expert_intermediate_size=512, num_experts=256),
    "qwen3_omni_moe_text": dict(hidden_size=2048, num_hidden_layers=28, moe_intermediate_size=768, num_experts=128),
    "qwen3_vl_moe_text": dict(hidden_size=2048, num_hidden_layers=24, moe_intermediate_size=1408,
                              num_experts_per_tok=4, num_local_experts=60),
    "qwen4_exp_text": dict(hidden_size=2048, num_hidden_layers=40, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512, num_experts_per_tok=10, num_experts=512),
    "mellum": dict(hidden_size=2304, num_hidden_layers=28, moe_intermediate_size=896, num_local_experts=64),
    "flex_olmo": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_experts_per_tok=5,
                      num_experts=7),
    "lara_mini": dict(hidden_size=1024, num_hidden_layers=34, moe_intermediate_size=512,
                      shared_expert_intermediate_size=512, num_experts_per_tok=4, num_experts=128),
    "flint": dict(hidden_size=2048, num_hidden_layers=49, moe_intermediate_size=512,
                  shared_expert_intermediate_size=1024, num_experts_per_tok=6, num_experts=256, mlp_only_layers=[0, 1]),
    "ernie4_5_moe": dict(hidden_size=2560, num_hidden_layers=28, moe_intermediate_size=1536, moe_k=6,
                         moe_num_shared_experts=2, moe_layer_start_index=1),
    "deepseek_v2": dict(_V2),
    "deepseek_ocr2_text": dict(_V2),
    "unlimited_ocr_text": dict(hidden_size=1280, num_hidden_layers=12, n_shared_experts=2, num_experts_per_tok=6,
                               moe_intermediate_size=896, mlp_layer_types=_dense_first()),
    # kimi_k2: Kimi-K2's config.json; transformers reads it (Kimi-K2.5's text_config) as DeepseekV3Config
    **dict.fromkeys(("deepseek_v3", "kimi_k2"), dict(_DS_MLA, num_experts_per_tok=8)),
    "deepseek_v4": dict(hidden_size=4096, num_hidden_layers=43),
    "longcat_flash": dict(hidden_size=6144, zero_expert_num=256, expert_ffn_hidden_size=2048,
                          routed_scaling_factor=6.0),
    "gpt_oss": dict(num_hidden_layers=36, hidden_size=2880, intermediate_size=2880),
    "openai_privacy_filter": dict(num_hidden_layers=8, hidden_size=640, intermediate_size=640),
    "llama4_text": dict(hidden_size=5120, intermediate_size=8192, num_hidden_layers=48),
    "glm4_moe": dict(hidden_size=4096, num_hidden_layers=46, moe_intermediate_size=1408, num_experts_per_tok=8,
                     n_routed_experts=128),
    "param2moe": dict(hidden_size=2048, num_hidden_layers=21, n_routed_experts=64, num_experts_per_tok=6,
                      n_shared_experts=2, routed_scaling_factor=2.5, moe_intermediate_size=2048,
                      first_k_dense_replace=1),
    "olmoe": dict(hidden_size=2048, num_hidden_layers=16),
    "aria_text": dict(hidden_size=4096, num_hidden_layers=32),
    "jetmoe": dict(hidden_size=2048, num_hidden_layers=12),
    **dict.fromkeys(("granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"), _GRANITE),
    # the DeepSeek-V3 family (ds3.py)
    "deepseek_v32": dict(_DS_MLA, first_k_dense_replace=3),
    "glm4v_moe_text": dict(hidden_size=4096, num_hidden_layers=46, rms_norm_eps=_E5, moe_intermediate_size=1408,
                           n_routed_experts=128, n_group=1, first_k_dense_replace=1),
    "glm4_moe_lite": dict(hidden_size=2048, moe_intermediate_size=1536, num_hidden_layers=47, n_routed_experts=64,
                          routed_scaling_factor=1.8, n_group=1, num_experts_per_tok=4, rms_norm_eps=_E5,
                          mlp_layer_types=_dense_head(1)),
    "glm_moe_dsa": dict(hidden_size=6144, moe_intermediate_size=2048, num_hidden_layers=78, routed_scaling_factor=2.5,
                        n_group=1, rms_norm_eps=_E5, first_k_dense_replace=3),
    "solar_open": dict(hidden_size=4096, num_hidden_layers=48, rms_norm_eps=_E5, moe_intermediate_size=1280,
                       n_routed_experts=128, n_group=1),
    "exaone_moe": dict(hidden_size=4096, num_hidden_layers=32, rms_norm_eps=_E5, moe_intermediate_size=1024,
                       num_experts=64, routed_scaling_factor=2.5, n_group=1, first_k_dense_replace=1),
    "kimi_linear": dict(hidden_size=2304, moe_intermediate_size=1024, num_hidden_layers=27, routed_scaling_factor=2.446,
                        num_expert_group=1, rms_norm_eps=_E5, mlp_layer_types=_dense_first()),
    "bailing_hybrid": dict(hidden_size=2560, moe_intermediate_size=768, num_hidden_layers=42, routed_scaling_factor=2.5,
                           num_expert_group=8, topk_group=4, num_experts=512, first_k_dense_replace=2),
    "dots1": dict(hidden_size=4608, moe_intermediate_size=1408, num_hidden_layers=62, n_group=1),
    "minicpm5_moe": dict(hidden_size=2048, num_hidden_layers=28, n_routed_experts=160, num_experts_per_tok=16,
                         routed_scaling_factor=3.66, moe_intermediate_size=512, n_shared_experts=1, n_group=1,
                         topk_group=1, mlp_layer_types=_dense_first()),
    "dots3_note_text": dict(hidden_size=5120, moe_intermediate_size=1536, num_hidden_layers=46, n_group=1,
                            rms_norm_eps=_E5, mlp_layer_types=_dense_first(freq=True)),
    "mimo_v2_flash": dict(hidden_size=4096, num_hidden_layers=48, rms_norm_eps=_E5, moe_intermediate_size=2048,
                          n_group=1, mlp_layer_types=_dense_head(1)),
    "glm5_next_text": dict(hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=45, n_routed_experts=288,
                           routed_scaling_factor=2.5, n_group=1, rms_norm_eps=_E5, swiglu_limit=10.0,
                           mlp_layer_types=_dense_head(3)),
    "hy_v4": dict(hidden_size=2816, moe_intermediate_size=768, num_hidden_layers=34, rms_norm_eps=_E5,
                  routed_scaling_factor=2.827, n_group=1, swiglu_limit=10.0, mlp_layer_types=_dense_head(1)),
    "hy_v4_vl_text": dict(hidden_size=6144, moe_intermediate_size=2048, num_hidden_layers=78, rms_norm_eps=_E5,
                          routed_scaling_factor=2.827, n_group=1, swiglu_limit=10.0, mlp_layer_types=_dense_head(1)),
    "axk1": dict(_DS_MLA, n_routed_experts=192, mlp_layer_types=_dense_first(freq=True)),
    "axk2": dict(hidden_size=2048, moe_intermediate_size=512, num_hidden_layers=48, n_routed_experts=128,
                 routed_scaling_factor=2.5, mlp_layer_types=_dense_first(freq=True)),
    "beam": dict(hidden_size=5120, num_hidden_layers=52, moe_intermediate_size=2560, n_group=8, topk_group=4,
                 routed_scaling_factor=2.5, mlp_layer_types=_dense_head(3)),
    "nemotron_h": dict(hidden_size=4096, mlp_hidden_act="relu2", n_routed_experts=8, moe_intermediate_size=7688,
                       moe_shared_expert_intermediate_size=7688, num_experts_per_tok=2, n_group=1,
                       layers_block_type=_nemotron_blocks),
    "mistral4": dict(hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=36, n_routed_experts=128,
                     n_group=1, num_experts_per_tok=4),
    "mistral_large4_text": dict(hidden_size=6144, moe_intermediate_size=6144, num_hidden_layers=72,
                                n_routed_experts=128, n_group=1, num_experts_per_tok=4, rms_norm_eps=_E5,
                                first_k_dense_replace=1),
    # Gemma 4 (gemma4.py; num_experts, top_k_experts and moe_intermediate_size default to null: required)
    **dict.fromkeys(("gemma4_text", "diffusion_gemma_text"), dict(hidden_size=2304, num_hidden_layers=30)),
    # sigmoid + bias (sigmoid_bias.py)
    "minimax_m2": dict(hidden_size=3072, intermediate_size=1536, num_hidden_layers=62, num_experts_per_tok=8,
                       num_local_experts=256),
    "minimax_m3_vl_text": dict(hidden_size=6144, intermediate_size=3072, num_hidden_layers=60, num_experts_per_tok=4,
                               num_local_experts=128, routed_scaling_factor=2.0, shared_intermediate_size=3072,
                               dense_intermediate_size=12288),
    "hy_v3": dict(hidden_size=4096, num_hidden_layers=80, rms_norm_eps=_E5, num_experts=192, num_experts_per_tok=8,
                  moe_intermediate_size=1536, intermediate_size=13312, router_scaling_factor=2.826,
                  mlp_layer_types=_dense_head(1)),
    "afmoe": dict(hidden_size=2048, moe_intermediate_size=1408, num_hidden_layers=32, num_dense_layers=1,
                  rms_norm_eps=_E5, num_experts=64, num_experts_per_tok=6, num_shared_experts=2),
    "lfm2_moe": dict(hidden_size=2048, moe_intermediate_size=1792, num_hidden_layers=32, num_dense_layers=2,
                     num_experts_per_tok=4, num_experts=32),
    "laguna": dict(hidden_size=2048, num_hidden_layers=40, moe_intermediate_size=512, num_experts_per_tok=8,
                   num_experts=256, shared_expert_intermediate_size=512, mlp_layer_types=_dense_head(1)),
    "kolibri1": dict(hidden_size=2560, num_hidden_layers=50, moe_intermediate_size=512, num_experts_per_tok=6,
                     num_local_experts=384, shared_expert_intermediate_size=512),
    "kolibri1_1": dict(hidden_size=2560, num_hidden_layers=50, moe_intermediate_size=512, num_experts_per_tok=6,
                       num_local_experts=384, shared_expert_intermediate_size=512),
    "ergo": dict(hidden_size=8192, num_hidden_layers=64, num_experts=256, num_experts_per_tok=8,
                 moe_intermediate_size=4096, shared_intermediate_size=8192, moe_routed_scaling_factor=8**0.5,
                 num_dense_blocks=1, rms_norm_eps=1e-12),
    "step3p5": dict(hidden_size=4096, num_hidden_layers=45, rms_norm_eps=_E5, num_experts_per_tok=8,
                    n_routed_experts=288, moe_intermediate_size=1280, share_expert_dim=1280,
                    mlp_layer_types=_step_layers),
    "muse_spark_text": dict(hidden_size=8192, num_hidden_layers=62, rms_norm_eps=_E5, output_multiplier=32**-0.5,
                            post_norm_eps=1e-08, moe_intermediate_size=4096, num_local_experts=256,
                            num_experts_per_tok=8, moe_hidden_size=4096),
    "inkling_text": dict(hidden_size=6144, num_hidden_layers=66, moe_intermediate_size=3072, n_routed_experts=256,
                         num_experts_per_tok=6, n_shared_experts=2, route_scale=8.0),
    "inkling2_text": dict(hidden_size=4608, num_hidden_layers=48, moe_intermediate_size=2304, n_routed_experts=384,
                          num_experts_per_tok=8, route_scale=8.0, scoring_func="sigmoid"),
    "inkling2_loop_text": dict(hidden_size=2304, num_hidden_layers=24, moe_intermediate_size=1152,
                               n_routed_experts=128, num_experts_per_tok=8, route_scale=8.0, scoring_func="sigmoid"),
}

# mlp_layer_types as these classes derive it (round 65): none reads first_k_dense_replace (a stray one dropped layers)
for _type in ("solar_open", "minimax_m2", "kolibri1", "muse_spark_text", "inkling2_text", "inkling2_loop_text"):
    DEFAULTS[_type]["mlp_layer_types"] = _ALL_SPARSE
DEFAULTS["minimax_m3_vl_text"]["mlp_layer_types"] = _dense_first(0, freq=True, key=None)  # its moe_layer_freq list
DEFAULTS["inkling_text"]["mlp_layer_types"] = _dense_first(0, key="dense_mlp_idx")  # its own kwarg


def complete(cfg: dict, model_type: str) -> dict:
    """``cfg`` (a config.json dict of ``model_type``) with the ``ALIASES`` resolved (an alias fills a field that is
    missing or null) and the ``DEFAULTS`` of the fields it lacks filled in (a constant where the key is missing,
    a derived field where it is missing or null, as the config classes do); a new dict, ``cfg`` is left as it is."""
    full = dict(cfg)
    for raw, name in ALIASES.get(model_type, {}).items():
        if full.get(name) is None and full.get(raw) is not None:
            full[name] = full[raw]
    derived = []
    for key, value in DEFAULTS.get(model_type, {}).items():
        if callable(value):
            if full.get(key) is None:  # the class derives a missing or null field
                derived.append((key, value))
        elif key not in full:  # an explicit null stays null, as in transformers
            full[key] = list(value) if isinstance(value, list) else value
    for key, derive in derived:  # after the constants: they may read them (num_hidden_layers)
        full[key] = derive(full)
    return full
