"""Round 67's review of round 66's loading changes: the expert mapping's index, the caller's ``loaded`` set, the TP
refusal's wording. Each case names the edge it covers."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.loading import fused_moe_make_expert_params_mapping as make_mapping
from moekit.loading import load_layer_weights

E, K, H, I = 4, 2, 16, 8


def _layer(mapping):
    return moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, expert_mapping=mapping)


def test_a_mapping_corrected_in_place_is_read_again():
    # edge: layer.expert_mapping[:] = ... after a load; the index kept on the layer by the list's identity was stale
    layer = _layer(make_mapping(None, "up_proj", "down_proj", "gate_proj", E))  # gate / up swapped
    g, u = torch.randn(I, H), torch.randn(I, H)
    w = [("experts.0.gate_proj.weight", g), ("experts.0.up_proj.weight", u)]
    layer.load_weights(w)
    assert torch.equal(layer.routed_experts.w13_weight[0, :I], u)  # as the (wrong) mapping says
    layer.expert_mapping[:] = make_mapping(None, "gate_proj", "down_proj", "up_proj", E)
    layer.load_weights(w)
    assert torch.equal(layer.routed_experts.w13_weight[0, :I], g)
    assert torch.equal(layer.routed_experts.w13_weight[0, I:], u)


def test_a_mapping_extended_in_place_takes_the_new_names():
    # edge: layer.expert_mapping.extend(...) after a load; the new names raised KeyError (no mapping entry matches)
    layer = _layer(make_mapping(None, "gate_proj", "down_proj", "up_proj", E))
    layer.load_weights([("experts.0.gate_proj.weight", torch.randn(I, H))])
    layer.expert_mapping.extend(make_mapping(None, "w1", "w2", "w3", E))
    w1 = torch.randn(I, H)
    assert layer.load_weights([("experts.1.w1.weight", w1)]) == {"experts.1.w1.weight"}
    assert torch.equal(layer.routed_experts.w13_weight[1, :I], w1)


def test_loaded_holds_only_names_of_parameters_written():
    # edge: a relu2 expert key added "experts.0.w3.weight (the input projection of a non-gated expert)" to loaded
    layer = moekit.FusedMoE(E, K, 8, 6, activation="relu2", params_dtype=torch.float32)
    loaded = set()
    weights = [("experts.0.up_proj.weight", torch.randn(6, 8)), ("experts.1.gate_proj.weight", torch.randn(6, 8))]
    assert load_layer_weights(layer, weights, loaded=loaded) == {name for name, _ in weights}
    assert loaded == set()  # (expert shards: the experts record them)


def test_the_relu2_check_spans_one_key_calls_that_share_the_layers_keys():
    # edge: the marks moved out of loaded: the loader's one-key calls share them through its per-layer LayerKeys
    from moekit.experts.mapping import LayerKeys
    layer = moekit.FusedMoE(E, K, 8, 6, activation="relu2", params_dtype=torch.float32)
    keys, loaded = LayerKeys(layer), set()
    load_layer_weights(layer, [("experts.2.up_proj.weight", torch.randn(6, 8))], loaded=loaded, _keys=keys)
    load_layer_weights(layer, [("experts.3.w1.weight", torch.randn(6, 8))], loaded=loaded, _keys=keys)
    with pytest.raises(ValueError, match="expert 2 also has a up_proj key.*not gated"):
        load_layer_weights(layer, [("experts.2.gate_proj.weight", torch.randn(6, 8))], loaded=loaded, _keys=keys)
    assert loaded == set()


def test_tp_refusal_of_one_block_says_so():
    # edge: I = 128 with fp8 blocks of 128 and TP = 2 said "intermediate_size 128 is not a multiple of 128"
    from moekit.experts.params import check_tp_split
    fmt = moekit.parse_quant_config({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="intermediate_size 128 is a single block of 128, which no TP size above 1 "
                                         "can split") as err:
        check_tp_split(fmt, 128, 2)
    assert "not a multiple" not in str(err.value)
    with pytest.raises(ValueError, match="200 is not a multiple of 128, so no TP size above 1 fits"):
        check_tp_split(fmt, 200, 2)


def test_one_key_load_weights_calls_make_the_mapping_index_once(monkeypatch):
    # review of round 67: one-key layer.load_weights calls (vLLM's loop) each made the default mapping again (O(E²)
    # a layer: 12-21 s for E = 512); it is kept on the layer with what it was made from, compared by value
    import moekit.experts.mapping as mapping
    made = []
    real = mapping.default_expert_mapping
    monkeypatch.setattr(mapping, "default_expert_mapping", lambda layer: made.append(1) or real(layer))
    layer = moekit.FusedMoE(8, 2, 8, 4, backend="torch")
    for e in range(8):
        for proj, shape in (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4))):
            layer.load_weights([(f"experts.{e}.{proj}.weight", torch.randn(*shape))])
    assert layer.routed_experts.loaded and len(made) == 1
