"""Round 55 (a user trial): load_moe_layers' errors for a config.json no layer can be built from.

- a layer's construction check (expert groups, ...) raised "topk_group must be <= num_expert_group (4), got 5":
  no file, no block, no config.json field (n_group); now the file, the block and the fields are named, the original
  error chained;
- malformed numbers raised raw exceptions: decoder_sparse_step 0 (ZeroDivisionError), hidden_size -1 and
  n_shared_experts -1 (RuntimeError from torch), hidden_size Infinity (OverflowError); now ``ValueError`` naming the
  file and the field.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import moekit.loading.loader as loader_mod
from moekit import load_moe_layers

H, I, E = 16, 8, 6
DS3 = dict(model_type="deepseek_v3", hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2,
           n_group=3, topk_group=2, n_shared_experts=1, num_hidden_layers=2, first_k_dense_replace=1, dtype="float32")
QWEN3 = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
             num_hidden_layers=2, dtype="float32")
HUNYUAN = dict(model_type="hunyuan_v1_moe", hidden_size=H, intermediate_size=I, num_experts=E, moe_topk=2,
               num_hidden_layers=1, dtype="float32")


def _checkpoint(tmp_path, config, tensors=None) -> str:
    """config.json and one shard holding the tensors the layer's construction reads (the error comes first)."""
    path = str(tmp_path / "ckpt")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)  # (Infinity / NaN written as JSON's extension, which json.load reads back)
    if tensors is None:
        tensors = {"model.layers.1.mlp.gate.weight": torch.randn(E, H),
                   "model.layers.1.mlp.gate.e_score_correction_bias": torch.rand(E)}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def _raises(path, *fragments, **kw) -> ValueError:
    with pytest.raises(ValueError) as info:
        load_moe_layers(path, progress=False, **kw)
    message = str(info.value)
    for fragment in (os.path.join(path, "config.json"), *fragments):
        assert fragment in message, (fragment, message)
    return info.value


@pytest.mark.parametrize("update, fragments", [
    # the user trial's error: topk_group > n_group
    (dict(topk_group=5), ["model.layers.1.mlp: topk_group must be <= num_expert_group (3), got 5",
                          "topk_group = 5 (topk_group)", "num_expert_group = 3 (n_group)"]),
    # n_group not dividing the experts: both fields named
    (dict(n_group=4), ["model.layers.1.mlp: num_expert_group (4) must divide the number of experts (6)",
                       "num_expert_group = 4 (n_group)", "num_experts = 6 (n_routed_experts)"]),
    # a float read by FusedMoE's check (routed_scaling_factor Infinity)
    (dict(routed_scaling_factor=float("inf")), ["model.layers.1.mlp: routed_scaling_factor must be finite",
                                                "routed_scaling_factor = inf (routed_scaling_factor)"]),
])
def test_construction_errors_name_file_block_and_field(tmp_path, update, fragments):
    # the edge: a ValueError from the layer's construction checks named moekit's argument only
    err = _raises(_checkpoint(tmp_path, dict(DS3, **update)), *fragments)
    assert isinstance(err.__cause__, ValueError) and "config.json" not in str(err.__cause__)


def test_construction_error_names_a_default_the_file_lacks(tmp_path):
    # the edge: n_group absent from config.json takes DeepSeek-V3's default (8), which 6 experts cannot group
    config = {k: v for k, v in DS3.items() if k not in ("n_group", "topk_group")}
    _raises(_checkpoint(tmp_path, config), "model.layers.1.mlp: num_expert_group must be <= the number of experts",
            "num_expert_group = 8 (the default: config.json has no n_group / num_expert_group)")


def test_construction_error_field_of_another_architecture(tmp_path):
    # the edge: the top-k error said "(num_experts_per_tok)" whatever the architecture calls it (Hunyuan: moe_topk)
    path = _checkpoint(tmp_path, dict(HUNYUAN, moe_topk=9), {"model.layers.0.mlp.gate.wg.weight": torch.randn(E, H)})
    _raises(path, "model.layers.0.mlp: config.json gives top_k = 9 (moe_topk)")


def test_argument_and_synced_errors(tmp_path, monkeypatch):
    # the edge: an error of a load_moe_layers argument names the file and the block but no config.json field; an error
    # every rank raised together (FusedMoE's agreement: marked synced) is re-raised as it is (wrapping it would make
    # the ranks wait for one more exchange)
    path = _checkpoint(tmp_path, DS3)
    err = _raises(path, "model.layers.1.mlp: backend must be one of", backend="nope")
    assert "config.json gives" not in str(err)
    synced = ValueError("SettingsDiffer: ranks disagree")
    synced.synced = True

    def build_layer(*args, **kwargs):
        raise synced

    monkeypatch.setattr(loader_mod, "build_layer", build_layer)
    with pytest.raises(ValueError) as info:
        load_moe_layers(path, progress=False)
    assert info.value is synced


@pytest.mark.parametrize("config, fragments", [
    # ZeroDivisionError from (i + 1) % decoder_sparse_step
    (dict(QWEN3, decoder_sparse_step=0), ["decoder_sparse_step must be >= 1", "got 0"]),
    # RuntimeError from torch: Linear(-1, ...)
    (dict(DS3, hidden_size=-1), ["model.layers.1.mlp: config.json gives hidden_size = -1 (hidden_size); "
                                 "expected >= 1"]),
    # RuntimeError from torch: a shared MLP of width 8 x -1
    (dict(DS3, n_shared_experts=-1), ["model.layers.1.mlp: config.json gives shared_intermediate_size = -8",
                                      "n_shared_experts = -1", "expected >= 0"]),
    # OverflowError: int(inf)
    (dict(DS3, hidden_size=float("inf")), ["hidden_size = inf: not a finite number"]),
    # "cannot convert float NaN to integer", which named no field
    (dict(DS3, hidden_size=float("nan")), ["hidden_size = nan: not a finite number"]),
    # n_routed_experts 0 surfaced as a top-k error ("expected 1 <= top_k <= 0")
    (dict(DS3, n_routed_experts=0), ["config.json gives num_experts = 0 (n_routed_experts); expected >= 1"]),
])
def test_malformed_numbers_name_file_and_field(tmp_path, config, fragments):
    # the edge: raw ZeroDivisionError / RuntimeError / OverflowError (or a ValueError naming no field)
    _raises(_checkpoint(tmp_path, config), *fragments)


def test_layer_periods_of_other_architectures(tmp_path):
    # the edge: Jamba's expert_layer_period 0 (ZeroDivisionError) and Llama 4's interleave_moe_layer_step 0 ("range()
    # arg 3 must not be zero"); a Qwen model without experts never reads its step (as transformers)
    from moekit.loading.architectures import plan_layers

    jamba = dict(model_type="jamba", hidden_size=H, intermediate_size=I, num_experts=E, num_hidden_layers=2,
                 expert_layer_period=0)
    with pytest.raises(ValueError, match=re.escape("x/config.json: model_type 'jamba' (Jamba): ") + ".*"
                       + re.escape("expert_layer_period must be >= 1")):
        plan_layers(jamba, "x/config.json")
    llama4 = dict(model_type="llama4_text", hidden_size=H, intermediate_size=I, num_local_experts=E,
                  num_experts_per_tok=1, num_hidden_layers=2, interleave_moe_layer_step=0)
    with pytest.raises(ValueError, match="interleave_moe_layer_step must be >= 1"):
        plan_layers(llama4, "x/config.json")
    assert plan_layers(dict(QWEN3, num_experts=0, decoder_sparse_step=0))[1] == []


def test_review_period_of_derived_layer_types_and_blame_of_non_finite_fields():
    # moe_layer_freq 0 (A.X-K1's derived layer types: i % 0) names the field; a non-finite field elsewhere in the file
    # is not blamed for another field's bad value (rope_theta = Infinity beside num_experts_per_tok = "x")
    from moekit.loading.architectures import plan_layers

    axk1 = dict(model_type="axk1", moe_layer_freq=0, hidden_size=16, moe_intermediate_size=8, n_routed_experts=4,
                num_experts_per_tok=2, num_hidden_layers=3)
    with pytest.raises(ValueError, match="moe_layer_freq must be >= 1"):
        plan_layers(axk1, "x/config.json")
    ds3 = dict(model_type="deepseek_v3", hidden_size=16, moe_intermediate_size=8, n_routed_experts=4,
               num_hidden_layers=3, rope_theta=float("inf"))
    with pytest.raises(ValueError) as got:
        plan_layers(dict(ds3, num_experts_per_tok="x"), "x/config.json")
    assert "rope_theta" not in str(got.value) and "'x'" in str(got.value)
    with pytest.raises(ValueError, match="hidden_size = inf.*: not a finite number"):
        plan_layers(dict(ds3, hidden_size=float("inf")), "x/config.json")


def test_a_fractional_count_is_refused_not_truncated():
    # the CLI audit's case: num_experts 8.5 planned 8 experts silently; 8.0 is a whole number and plans as 8
    from moekit.loading.architectures import plan_layers

    qwen = dict(model_type="qwen3_moe", hidden_size=16, moe_intermediate_size=8, num_experts_per_tok=2,
                num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"config.json gives num_experts = 8.5 \(num_experts\); expected a whole"):
        plan_layers(dict(qwen, num_experts=8.5), "x/config.json")
    assert [p.num_experts for p in plan_layers(dict(qwen, num_experts=8.0), "x/config.json")[1]] == [8, 8]
