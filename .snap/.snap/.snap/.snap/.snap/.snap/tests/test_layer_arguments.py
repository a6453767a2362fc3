"""FusedMoE arguments that would be ignored or conflict: each raises at construction (or load), naming it."""

import pytest
import torch

import moekit


def test_zero_experts_with_weight_on_input_raise():
    # a masked zero slot (id 0, weight 0) would run expert 0 on 0·x and add its biases
    with pytest.raises(ValueError, match="apply_router_weight_on_input"):
        moekit.FusedMoE(2, 1, 8, 4, e_score_correction_bias=torch.zeros(4), zero_expert_type="identity",
                        apply_router_weight_on_input=True, has_bias=True)


def test_hash_table_with_selection_bias_raises():
    # the table picks the experts: a selection bias would be ignored
    with pytest.raises(ValueError, match="hash_indices_table"):
        moekit.FusedMoE(8, 2, 16, 8, hash_indices_table=torch.zeros(5, 2, dtype=torch.int64),
                        e_score_correction_bias=torch.zeros(8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=3), "top_k"),  # the router's K differs from the layer's
        (dict(scoring_func="sigmoid"), "scoring_func"),  # would be ignored
        (dict(renormalize=False), "renormalize"),
        (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
    ],
)
def test_router_instance_must_agree_with_layer(kwargs, match):
    router = moekit.FusedTopKRouter(2, 8)
    args = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8) | kwargs
    with pytest.raises(ValueError, match=match):
        moekit.FusedMoE(router=router, **args)


def test_router_instance_accepted_when_consistent():
    router = moekit.FusedTopKRouter(2, 8, renormalize=False)
    layer = moekit.FusedMoE(8, 2, 16, 8, router=router, routed_scaling_factor=3.0, apply_routed_scale_to_output=True)
    layer.load_expert_weights(torch.randn(8, 16, 16) * 0.25, torch.randn(8, 16, 8) * 0.35)
    assert layer.router is router and layer(torch.randn(3, 16), torch.randn(3, 8)).shape == (3, 16)


def test_n_shared_experts_without_module_raises():
    with pytest.raises(NotImplementedError, match="n_shared_experts"):
        moekit.FusedMoE(8, 2, 16, 8, n_shared_experts=2)


def test_unknown_routed_experts_args_raise():
    with pytest.raises(TypeError, match="bogus"):
        moekit.FusedMoE(8, 2, 16, 8, routed_experts_args={"bogus": 1})


def test_integer_weights_raise_on_load():
    layer = moekit.FusedMoE(4, 2, 8, 4)
    with pytest.raises(TypeError, match="w13"):
        layer.load_expert_weights(torch.ones(4, 8, 8, dtype=torch.int64), torch.randn(4, 8, 4))
