"""Round 56: the loader's errors for a model_type moekit does not support, and the config-field errors of patch().

- an unsupported model_type listed every supported architecture on one line of about 2,100 characters: the error now
  names the value, a close supported one ("did you mean 'qwen3_moe'?"), how many model types there are and
  :func:`moekit.loading.supported_model_types`, then lists them wrapped;
- the config-field checks said "config.json gives ..." also under ``patch(model)``, which reads the live
  ``model.config`` and no file: they now say "model.config gives ..." there.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from moekit import load_moe_layers
from moekit.loading import supported_model_types
from moekit.loading.architectures import plan_layers
from moekit.loading.fields import construction_error

QWEN3 = dict(model_type="qwen3_moe", hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
             num_hidden_layers=2)
DS3 = dict(model_type="deepseek_v3", hidden_size=16, moe_intermediate_size=8, n_routed_experts=6,
           num_experts_per_tok=2, topk_group=2, n_shared_experts=1, num_hidden_layers=2, first_k_dense_replace=1)


def _unsupported(tmp_path, model_type) -> str:
    """The error message of load_moe_layers for a checkpoint of ``model_type``."""
    os.makedirs(tmp_path, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(dict(QWEN3, model_type=model_type)))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(NotImplementedError) as info:
        load_moe_layers(tmp_path, progress=False)
    return str(info.value)


def test_unsupported_model_type_error_is_counted_and_wrapped(tmp_path):
    # the reported case: all ~97 types on one line of ~2,100 characters
    message = _unsupported(tmp_path, "bert")
    first, *rest = message.splitlines()
    types = supported_model_types()
    assert first.startswith("model_type='bert' is not supported; supported architectures: Mixtral, ")
    assert f"({len(types)} model types in all: moekit.loading.supported_model_types())" in first
    assert "did you mean" not in first and len(first) < 400
    assert rest[0] == "supported model types:" and all(len(line) <= 100 for line in rest)
    assert [t.strip() for line in rest[1:] for t in line.split(",") if t.strip()] == types  # each one, in order


@pytest.mark.parametrize("model_type, close", [
    ("qwen3moe", "qwen3_moe"),  # a missing underscore
    ("Qwen3-MoE", "qwen3_moe"),  # case and '-' ignored
    ("deepseekv3", "deepseek_v3"),
    ("llama", None),  # edge: 'llama4' extends it: a dense Llama, not a typo (nothing offered)
    ("qwen3", None),  # edge: likewise qwen3 -> qwen3_moe
])
def test_unsupported_model_type_suggests_a_close_one(tmp_path, model_type, close):
    first = _unsupported(tmp_path / model_type, model_type).splitlines()[0]
    assert f"{len(supported_model_types())} model types in all" in first  # every first line counts them
    if close:
        assert f"model_type={model_type!r} is not supported (did you mean {close!r}?); supported architectures" in first
    else:
        assert "did you mean" not in first and f"{model_type!r} is not supported; supported architectures" in first


def test_supported_model_types_is_public():
    # the error points to it: moekit.loading exports it, with a docstring
    import moekit.loading

    assert "supported_model_types" in moekit.loading.__all__ and moekit.loading.supported_model_types.__doc__
    assert {"qwen3_moe", "deepseek_v3", "mixtral"} <= set(moekit.loading.supported_model_types())


@pytest.mark.parametrize("config, file_says, live_says", [
    # a count given as a fraction
    (dict(QWEN3, num_experts=8.5), "config.json gives num_experts = 8.5 (num_experts)",
     "model.config gives num_experts = 8.5 (num_experts)"),
    # a size no block can have
    (dict(QWEN3, hidden_size=-1), "model.layers.0.mlp: config.json gives hidden_size = -1",
     "model.layers.0.mlp: model.config gives hidden_size = -1"),
], ids=["fraction", "negative-size"])
def test_plan_checks_name_the_config_they_read(config, file_says, live_says):
    with pytest.raises(ValueError, match="^x/config.json: ") as info:
        plan_layers(config, "x/config.json")
    assert file_says in str(info.value)
    with pytest.raises(ValueError) as info:  # the source patch() passes: a live transformers config
        plan_layers(config, "the model's config")
    assert live_says in str(info.value) and "config.json" not in str(info.value)


def test_construction_error_names_the_config_it_read():
    # edge: a construction check naming a field the config lacks: its default "(the default: ... has no n_group)"
    plan = plan_layers(dict(DS3, n_group=3), "x/config.json")[1][0]
    err = ValueError("topk_group must be <= num_expert_group (3), got 2")
    file_err = str(construction_error(err, plan, "x/config.json", DS3))
    live_err = str(construction_error(err, plan, "the model's config", DS3))
    assert "; config.json gives topk_group = 2 (topk_group), num_expert_group = 3 (the default: config.json has no " \
           "n_group / num_expert_group)" in file_err
    assert "; model.config gives topk_group = 2 (topk_group), num_expert_group = 3 (the default: model.config has " \
           "no n_group / num_expert_group)" in live_err and "config.json" not in live_err


def test_patch_errors_say_model_config():
    # the reported case, through patch(): a model whose config holds a size no block can have
    transformers = pytest.importorskip("transformers")
    from moekit.integrations.transformers import patch

    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=32,
                                     head_dim=8)
    model = transformers.MixtralForCausalLM(cfg)
    model.config.hidden_size = -1  # (after construction: the model could not be built so)
    with pytest.raises(ValueError) as info:
        patch(model)
    assert "model.layers.0.mlp: model.config gives hidden_size = -1 (hidden_size); expected >= 1" in str(info.value)
    assert "config.json" not in str(info.value)


def test_ranks_settings_differ_names_the_file_and_block(tmp_path, monkeypatch):
    # the edge: ranks whose copies of the checkpoint build different layers raise SettingsDiffer together in FusedMoE's
    # agreement; load_moe_layers re-raised it without the file or the block (round 55's leftover). Now both are named,
    # the error stays a SettingsDiffer marked synced (no further exchange), and other synced errors pass as they are
    import moekit.loading.loader as loader_mod
    from moekit.parallel.sync import SettingsDiffer

    path = str(tmp_path / "ckpt")
    os.makedirs(path)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dict(DS3, n_group=2, dtype="float32")))
    save_file({"model.layers.1.mlp.gate.weight": torch.randn(6, 16),
               "model.layers.1.mlp.gate.e_score_correction_bias": torch.rand(6)},
              os.path.join(path, "model.safetensors"))
    differ = SettingsDiffer("the ranks of ep_group were built with different settings (by rank of ep_group): "
                            "{'top_k': [2, 3]}")

    def build_layer(*args, **kwargs):
        raise differ

    monkeypatch.setattr(loader_mod, "build_layer", build_layer)
    with pytest.raises(SettingsDiffer) as info:
        load_moe_layers(path, progress=False)
    message = str(info.value)
    assert message.startswith(os.path.join(str(path), "config.json") + ": model.layers.1.mlp: the ranks of ep_group")
    assert "{'top_k': [2, 3]}" in message and info.value.synced and info.value.__cause__ is differ
