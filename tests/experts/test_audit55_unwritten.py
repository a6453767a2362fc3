"""Round 55: a layer's state dict says what the layer never wrote, so loading it elsewhere does not mark the
initialiser's values as loaded (round 54's leftover: a never-loaded layer's state dict loaded as "loaded" and the
forward computed with torch.empty's memory: NaN or garbage, silently)."""

import pytest
import torch

import moekit
from moekit.experts.loaded_record import UNWRITTEN_KEY

E, K, H, I = 4, 2, 16, 8
KEY = "routed_experts." + UNWRITTEN_KEY
FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}


def _layer(**kw):
    return moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", **kw).eval()


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1


def _forward(layer):
    g = torch.Generator().manual_seed(3)
    return layer(torch.randn(5, H, generator=g), torch.randn(5, E, generator=g))


def test_a_never_loaded_layers_state_dict_leaves_the_copy_unloaded():
    # the edge of the leftover: nothing was ever written; the copy's forward must raise, not compute
    a, b = _layer(), _layer()
    sd = a.state_dict()
    assert sd[KEY].dtype == torch.int64 and sd[KEY].shape == (E * 3, 3)
    assert str(b.load_state_dict(sd)) == "<All keys matched successfully>"  # strict: the key is not unexpected
    assert not b.routed_experts.loaded
    with pytest.raises(RuntimeError, match="forward before the expert weights were loaded .*came from a layer that"):
        _forward(b)


def test_a_fully_loaded_layer_saves_no_record_and_its_copy_is_loaded():
    # the common case stays as it was: no extra key, the copy computes the same bits
    a, b = _layer(), _layer()
    a.load_expert_weights(*_weights())
    sd = a.state_dict()
    assert KEY not in sd
    b.load_state_dict(sd)
    assert b.routed_experts.loaded
    assert torch.equal(_forward(a), _forward(b))


def test_a_partly_loaded_layers_copy_misses_exactly_what_it_missed():
    # some experts' shards written one by one (load_expert_shard): the copy names the same missing tensors
    a, b = _layer(), _layer()
    w13, w2 = _weights()
    for e in (0, 2):
        a.routed_experts.load_expert_shard(e, "w1", w13[e, :I])
        a.routed_experts.load_expert_shard(e, "w3", w13[e, I:])
        a.routed_experts.load_expert_shard(e, "w2", w2[e])
    a.routed_experts.load_expert_shard(1, "w2", w2[1])
    b.load_state_dict(a.state_dict())
    assert b.routed_experts.missing() == a.routed_experts.missing()
    assert b.routed_experts.missing() == ["expert 1 w1", "expert 1 w3", "expert 3 w1", "expert 3 w3", "expert 3 w2"]


def test_a_partial_state_dict_unmarks_only_the_tensors_it_carries():
    # an unloaded layer's w13 alone into a loaded layer: its w13 is initialiser memory now (unwritten), its w2 was
    # not touched and stays loaded
    a, b = _layer(), _layer()
    b.load_expert_weights(*_weights())
    sd = a.state_dict()
    del sd["routed_experts.w2_weight"]
    res = b.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["routed_experts.w2_weight"] and not res.unexpected_keys
    assert b.routed_experts.missing() == [f"expert {e} w{s}" for e in range(E) for s in (1, 3)]


def test_a_quantised_layers_record_covers_its_scales():
    # fp8 block: weights written with their scales; a copy of an unloaded one misses both
    a, b = (moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=FP8_BLOCK, backend="torch").eval()
            for _ in range(2))
    b.load_state_dict(a.state_dict())
    missing = b.routed_experts.missing()
    assert "expert 0 w1" in missing and "expert 0 w1 scale" in missing and "expert 3 w2 scale" in missing
    q = moekit.quantize_experts(*_weights(), moekit.parse_quant_config(FP8_BLOCK))
    a.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
    b.load_state_dict(a.state_dict())
    assert b.routed_experts.loaded and KEY not in a.state_dict()


@pytest.mark.parametrize("bad", [
    torch.zeros(2, 3, dtype=torch.int32),  # not int64
    torch.zeros(6, dtype=torch.int64),  # not [n, 3]
    torch.tensor([[E, 0, 0]]),  # a slot this layer does not have
    torch.tensor([[0, 3, 0]]),  # no shard code 3
    torch.tensor([[0, 0, 4]]),  # no kind code 4
    torch.tensor([[-1, 0, 0]]),  # negative
])
def test_a_malformed_record_is_refused_before_anything_is_copied(bad):
    # a hand-made or corrupted record: ValueError naming the key, and the layer keeps its weights and loaded state
    a, b = _layer(), _layer()
    a.load_expert_weights(*_weights(1))
    b.load_expert_weights(*_weights(2))
    before = b.routed_experts.w13_weight.clone()
    sd = a.state_dict()
    sd[KEY] = bad
    with pytest.raises(ValueError, match=UNWRITTEN_KEY):
        b.load_state_dict(sd)
    assert torch.equal(b.routed_experts.w13_weight, before) and b.routed_experts.loaded
