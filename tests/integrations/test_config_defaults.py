"""A config.json that omits a field plans as transformers reads it (round 49 audit: moekit's fallbacks differed from
the config classes' defaults, e.g. DeepSeek-V3's routed_scaling_factor 1.0 for 2.5 and no expert groups for 8 / 4).

For every supported model type: transformers' default config (a few layers, so that each plan is cheap), each of its
fields dropped in turn; the plan of the dict without it must equal the plan of what transformers makes of that dict
(``from_dict(...).to_dict()``: the class's default, or the field it derives from the others), or both must fail.
Multimodal wrappers drop the fields of their text tower's sub-config. An empty config plans as the class's defaults.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict

import pytest

transformers = pytest.importorskip("transformers")
from transformers import CONFIG_MAPPING  # noqa: E402

from moekit.loading.architectures import TOWERS, plan_layers, supported_model_types  # noqa: E402
from moekit.loading.fields import ARG_FIELDS  # noqa: E402

LAYERS = 5  # decoder layers of the reference configs (the defaults have up to 80)
#: fields whose transformers default leaves the model unusable (null experts per token, no MoE block): a value
USABLE = {
    "deepseek_v2": dict(num_experts_per_tok=6),
    "dots1": dict(n_routed_experts=16, num_experts_per_tok=4),  # (5.25: null, refused since round 62)
    "deepseek_ocr2_text": dict(num_experts_per_tok=6, mlp_layer_types=["dense"] + ["sparse"] * (LAYERS - 1)),
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64),
    "diffusion_gemma_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=64),
}
#: the fields an explicit null of which the planner refuses (the expert count, top-k: round 62)
NULL_REFUSED = (*ARG_FIELDS["num_experts"], *ARG_FIELDS["top_k"])
TYPES = [t for t in supported_model_types() if t in CONFIG_MAPPING]
#: the aliases a legacy-kwargs case relies on (``attribute_map`` keys some transformers versions lack)
ALIASED = {"longcat_flash": ("moe_intermediate_size", "num_experts_per_tok")}


def _plans(cfg: dict):
    """The plans of a config dict, or the type of the error planning it raises."""
    try:
        return [asdict(p) for p in plan_layers(cfg)[1]]
    except (ValueError, NotImplementedError) as err:
        return type(err)


def _read_by_transformers(cls, cfg: dict) -> dict | None:
    """What transformers makes of a config.json dict (None: it refuses the dict)."""
    try:
        return cls.from_dict(cfg).to_dict()
    except Exception:  # the strict config classes refuse some partial dicts (a per-layer list of another length)
        return None


def _tower(model_type: str):
    """(text config class, path of the text sub-config) of a wrapper; (its class, ()) otherwise."""
    if model_type not in TOWERS:
        return CONFIG_MAPPING[model_type], ()
    key = tuple(TOWERS[model_type][1].split("."))
    cls = CONFIG_MAPPING[model_type]
    for part in key:
        sub = cls.sub_configs[part]
        if sub.__name__ == "AutoConfig":  # (Kimi-K2.5: the text tower's class comes from its default's model_type)
            defaults = getattr(cls, "sub_configs_defaults", None)  # (5.17 has none: the default instance's)
            sub = CONFIG_MAPPING[defaults[part].model_type] if defaults else type(getattr(cls(), part))
        cls = sub
    return cls, key


def _with_text(cfg: dict, key: tuple, text: dict) -> dict:
    if not key:
        return text
    out = dict(cfg)
    out[key[0]] = _with_text(cfg[key[0]], key[1:], text)
    return out


def _base(model_type: str) -> tuple[dict, type, tuple, dict]:
    """(config dict, text config class, text sub-config path, text dict) with ``LAYERS`` layers and ``USABLE``."""
    cls, key = _tower(model_type)
    text_type = getattr(cls, "model_type", model_type)
    small = dict(USABLE.get(text_type, {}), num_hidden_layers=LAYERS)
    try:
        text = cls(**small).to_dict()
    except Exception:  # a class that derives its layer count (Nemotron-H: from layers_block_type)
        small.pop("num_hidden_layers")
        text = cls(**small).to_dict()
    text = _readable(cls, text)
    cfg = CONFIG_MAPPING[model_type]().to_dict() if key else {}
    return _with_text(cfg, key, text), cls, key, text


def _readable(cls, text: dict) -> dict:
    """``text``, or where transformers cannot read back its own ``to_dict()`` (5.17's DBRX sub-configs refuse the
    ``_name_or_path`` and ``output_attentions`` it writes in them) ``text`` with its sub-config dicts stripped of
    the fields every config has (a hub config.json's sub-configs have only their own fields)."""
    if _read_by_transformers(cls, text) is not None:
        return text
    base = set(transformers.PretrainedConfig().to_dict())
    return {k: {f: x for f, x in v.items() if f not in base} if isinstance(v, dict) and "model_type" in v else v
            for k, v in text.items()}


@pytest.mark.parametrize("model_type", TYPES)
def test_a_missing_field_plans_as_transformers_reads_it(model_type):
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    cfg, cls, key, text = _base(model_type)
    full = _plans(cfg)
    assert isinstance(full, list), f"{model_type}: transformers' default config does not plan: {full}"
    assert full or model_type in ("jamba",), f"{model_type}: the reference plans no MoE block"
    checked = 0
    for field in text:
        if field == "model_type" and not key:
            continue
        dropped = {k: v for k, v in text.items() if k != field}
        read = _read_by_transformers(cls, dropped)
        if read is None:
            continue
        want, got = _plans(_with_text(cfg, key, read)), _plans(_with_text(cfg, key, dropped))
        if want is ValueError and read.get(field, 0) is None and field in NULL_REFUSED:
            # the class has no default for an expert count / top-k (5.25's dots1: null, its model cannot be built);
            # the explicit null is refused (round 62), the missing key plans with the architecture's usual value
            checked += 1
            continue
        assert got == want, f"{model_type} without {field!r} (transformers: {text[field]!r})"
        checked += 1
    assert checked > len(text) // 2  # transformers read most of the partial dicts: the comparison ran


@pytest.mark.parametrize("model_type", [t for t in TYPES if t not in TOWERS])
def test_an_empty_config_plans_as_the_class_defaults(model_type):
    # nothing but model_type (hidden_size, layers, experts... all the class's defaults): the default model's plan
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    cfg = dict(CONFIG_MAPPING[model_type](**USABLE.get(model_type, {})).to_dict(), model_type=model_type)
    assert _plans(dict(USABLE.get(model_type, {}), model_type=model_type)) == _plans(cfg)


@pytest.mark.parametrize("model_type, raw", [
    ("step3p5", dict(num_hidden_layers=6, moe_layers_enum="2,4,5")),  # Step-3.x hub configs: the MoE layer list
    ("step3p5", dict(num_hidden_layers=6, moe_num_experts=16, moe_top_k=3, share_expert_dims=64)),  # aliases
    ("nemotron_h", dict(hybrid_override_pattern="ME*EM-E")),  # the legacy layer pattern
    ("axk1", dict(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)),  # kwargs mlp_layer_types from
    ("dots3_note_text", dict(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=[0, 1, 1, 0, 1, 1])),
    ("kimi_linear", dict(num_hidden_layers=5, first_k_dense_replace=3)),
    ("minicpm5_moe", dict(num_hidden_layers=5, first_k_dense_replace=2)),
    ("unlimited_ocr_text", dict(num_hidden_layers=5, first_k_dense_replace=3)),
    ("glm4_moe_lite", dict(num_hidden_layers=5, first_k_dense_replace=3)),  # ignored: the class has one dense layer
    ("hy_v4", dict(num_hidden_layers=5, first_k_dense_replace=3)),  # ignored too
    ("hunyuan_v1_moe", dict(num_hidden_layers=2, num_experts_per_tok=3, num_local_experts=6)),  # -> moe_topk
    ("longcat_flash", dict(moe_intermediate_size=96, num_experts_per_tok=4)),  # -> expert_ffn_hidden_size, moe_topk
    ("inkling2_text", dict(num_hidden_layers=2, routed_scaling_factor=2.0, intermediate_size=96)),
    # round 65: Cohere2-MoE's first_k_dense_replace kwarg (was every layer MoE: a load failed on the dense layer);
    # Inkling's own dense_mlp_idx kwarg; classes that read no first_k_dense_replace (a stray one dropped layers)
    ("cohere2_moe", dict(num_hidden_layers=3, first_k_dense_replace=1)),
    ("inkling_text", dict(num_hidden_layers=4, dense_mlp_idx=2)),
    ("minimax_m3_vl_text", dict(num_hidden_layers=4, moe_layer_freq=[1, 0, 1, 1])),
    *((t, dict(num_hidden_layers=4, first_k_dense_replace=2)) for t in (
        "solar_open", "minimax_m2", "minimax_m3_vl_text", "kolibri1", "muse_spark_text", "inkling_text",
        "inkling2_text", "inkling2_loop_text")),
])
def test_legacy_kwargs_and_aliases_plan_as_transformers_reads_them(model_type, raw):
    # hub configs in older or aliased names: transformers' config class turns them into its fields
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r} config class")
    cls = CONFIG_MAPPING[model_type]
    missing = [k for k in ALIASED.get(model_type, ()) if k not in cls.attribute_map]
    if missing:
        pytest.skip(f"transformers {transformers.__version__}'s {cls.__name__} has no attribute_map alias {missing} "
                    "(it keeps such a key as an extra attribute; moekit reads config.json as 5.25 does)")
    read = cls.from_dict(dict(raw)).to_dict()
    assert _plans(read) and _plans(dict(raw, model_type=model_type)) == _plans(read)
