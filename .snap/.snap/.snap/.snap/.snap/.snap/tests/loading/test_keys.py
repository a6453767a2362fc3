"""Checkpoint key assignment from ArchSpec data (loading/keys.py): block prefixes, decoder-layer members,
layer-level blocks, wrapper towers and flat DBRX stacks."""

import torch

from moekit.loading.architectures import plan_layers
from moekit.loading.keys import assign_keys, construction_tensors, expand_key


def _cfg(**kw):
    return dict(hidden_size=8, num_hidden_layers=2, **kw)


def test_block_member_and_tower_prefixes():
    spec, plans = plan_layers({"model_type": "mistral_large4", "text_config": _cfg(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=4, n_group=1, topk_group=1,
        first_k_dense_replace=0)})  # Mistral Large 4's default: layer 0 dense
    keys = ["model.layers.1.experts.0.w1.weight",  # the older layout without language_model., a layer member
            "layers.0.mlp.gate.weight", "layers.0.self_attn.q_proj.weight", "model.visual.layers.0.mlp.gate.weight"]
    got = assign_keys(spec, plans, keys)
    assert got == {"model.language_model.layers.1.mlp": {"experts.0.w1.weight": keys[0]},
                   "model.language_model.layers.0.mlp": {"gate.weight": keys[1]}}


def test_layer_level_spec_takes_only_its_members():
    spec, plans = plan_layers({"model_type": "gemma4_text", **_cfg(enable_moe_block=True, num_experts=4,
                                                                   top_k_experts=2, moe_intermediate_size=4)})
    keys = ["model.layers.0.router.proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.experts.down_proj"]
    got = assign_keys(spec, plans, keys)
    assert got == {"model.layers.0": {"gate.proj.weight": keys[0]}, "model.layers.1": {"experts.down_proj": keys[2]}}


def test_flat_dbrx_stacks_split_per_expert_and_grouped_bias_flattens():
    spec, plans = plan_layers({"model_type": "dbrx", "d_model": 8, "n_layers": 1,
                               "ffn_config": {"moe_num_experts": 2, "moe_top_k": 1, "ffn_hidden_size": 4}})
    t = torch.arange(2 * 4 * 8.0).view(8, 8)
    pieces = dict(expand_key(spec, plans[0], "experts.mlp.w2", t))
    assert list(pieces) == ["experts.0.down_proj.weight", "experts.1.down_proj.weight"]
    assert torch.equal(pieces["experts.1.down_proj.weight"], t[4:].T)
    bias = construction_tensors({"router.e_score_correction_bias": torch.ones(1, 3), "gate.weight": t})
    assert list(bias) == ["router.e_score_correction_bias"] and bias["router.e_score_correction_bias"].shape == (3,)
