"""The transformers 5.25 specs plan raw config.json dicts as their config classes read them: the class defaults
for absent keys and the original repositories' key names (``attribute_map``). The tiny-model tests save full
configs through ``save_pretrained``; the original repositories' files often hold fewer keys. No transformers."""

import pytest

from moekit.loading.architectures import plan_layers

BASE = dict(hidden_size=64, num_hidden_layers=4)


def _plans(model_type, **cfg):
    return plan_layers(dict(BASE, model_type=model_type, **cfg))[1]


def test_param2_reads_its_original_key_names_and_defaults():
    # bharatgenai's configs name the experts num_experts / num_shared_experts; defaults: K 6, scale 2.5,
    # one dense layer first, moe width 2048 (Param2MoeConfig)
    plans = _plans("param2moe", num_experts=16, num_shared_experts=3)
    assert [p.layer_idx for p in plans] == [1, 2, 3]
    p = plans[0]
    assert (p.num_experts, p.top_k, p.routed_scaling_factor) == (16, 6, 2.5)
    assert (p.intermediate_size, p.shared_intermediate_size) == (2048, 3 * 2048)
    assert _plans("param2moe")[0].num_experts == 64


def test_minicpm5_defaults():
    # MiniCPM5MoeConfig: 160 experts, top-16, scale 3.66, moe width 512, one dense layer first (no mlp_layer_types)
    plans = _plans("minicpm5_moe")
    assert [p.layer_idx for p in plans] == [1, 2, 3]
    p = plans[0]
    assert (p.num_experts, p.top_k, p.routed_scaling_factor, p.intermediate_size) == (160, 16, 3.66, 512)
    assert p.shared_intermediate_size == 512 and p.num_expert_group == 1
    assert [p.layer_idx for p in _plans("minicpm5_moe", first_k_dense_replace=2)] == [2, 3]


def test_ergo_defaults():
    # ErgoConfig: num_dense_blocks 1, 256 experts, top-8, scale sqrt(8), rms eps 1e-12, moe width 4096, shared 8192
    plans = _plans("ergo")
    assert [p.layer_idx for p in plans] == [1, 2, 3]
    p = plans[0]
    assert (p.num_experts, p.top_k, p.intermediate_size, p.shared_intermediate_size) == (256, 8, 4096, 8192)
    assert p.routed_scaling_factor == pytest.approx(8**0.5) and p.norm_eps == p.expert_norm_eps == 1e-12
    assert (p.activation, p.shared_activation, p.expert_output_norm, p.shared_output_norm) == (
        "relu2", "relu2", "expert_rmsnorm", True)
    assert [p.layer_idx for p in _plans("ergo", num_dense_blocks=3)] == [3]
    assert [p.layer_idx for p in _plans("ergo", mlp_layer_types=["sparse", "dense", "sparse", "dense"])] == [0, 2]


def test_kolibri1_1_layers():
    # Kolibri-1.1: every layer but mlp_only_layers (default: the first two)
    assert [p.layer_idx for p in _plans("kolibri1_1")] == [2, 3]
    assert [p.layer_idx for p in _plans("kolibri1_1", mlp_only_layers=[1])] == [0, 2, 3]
