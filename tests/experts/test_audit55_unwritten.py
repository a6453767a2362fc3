"""Round 55: a state dict of a layer whose experts were never loaded does not load as "loaded" (round 54's leftover:
the copy's forward computed with torch.empty's memory, NaN or garbage, silently). Every expert tensor starts unset
(round 56: NaN in an unquantised layer's weights, 0 elsewhere; round 55 used 0 everywhere, and a layer holding an
all-zero padding expert could not be restored from its own state dict), and a state-dict load reads a slot's shard still
holding it (all-NaN weights, all-NaN or e8m0-255 scales since round 62) as never written; the state dict's keys are the
same loaded or not (a first design saved a record key: the review found it broke `sd = dst.state_dict();
sd.update(ckpt)` and torch.distributed.checkpoint loads)."""

import pytest
import torch

import moekit

E, K, H, I = 4, 2, 16, 8
QH, QI = 64, 32  # mxfp4 needs multiples of 32
QUANTS = {
    "fp8_block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 8]},
    "fp8_tensor": {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}, "input_activations": {
        "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}, "format": "float-quantized"},
    "mxfp4": {"quant_method": "mxfp4"},
}


def _layer(**kw):
    return moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", **kw).eval()


def _weights(seed=0, h=H, inter=I):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * inter, h, generator=g) * 0.1, torch.randn(E, h, inter, generator=g) * 0.1


def _forward(layer, dtype=torch.float32, h=H):
    g = torch.Generator().manual_seed(3)
    return layer(torch.randn(5, h, generator=g).to(dtype), torch.randn(5, E, generator=g))


def test_a_never_loaded_layer_starts_unset_and_its_state_dict_loads_as_not_loaded():
    # the edge of the leftover: nothing was ever written; the copy's forward raises instead of computing
    a, b = _layer(), _layer()
    assert a.routed_experts.w13_weight.isnan().all() and a.routed_experts.w2_weight.isnan().all()
    sd = a.state_dict()
    assert list(sd) == ["routed_experts.w13_weight", "routed_experts.w2_weight"]  # no extra key
    assert str(b.load_state_dict(sd)) == "<All keys matched successfully>"
    assert not b.routed_experts.loaded
    with pytest.raises(RuntimeError, match="forward before the expert weights were loaded .*a layer never loaded"):
        _forward(b)


def test_a_loaded_layers_state_dict_has_the_same_keys_and_loads():
    # the key set does not depend on being loaded (torch.distributed.checkpoint plans its reads from the target's keys)
    a, b = _layer(), _layer()
    keys = list(a.state_dict())
    a.load_expert_weights(*_weights())
    assert list(a.state_dict()) == keys
    b.load_state_dict(a.state_dict())
    assert b.routed_experts.loaded and torch.equal(_forward(a), _forward(b))


def test_the_template_fill_load_pattern_loads():
    # the review's case: the target's own (unloaded) state dict updated with a checkpoint, then loaded
    src, dst = _layer(), _layer()
    src.load_expert_weights(*_weights())
    state = dst.state_dict()
    state.update(src.state_dict())
    dst.load_state_dict(state)
    assert dst.routed_experts.loaded and torch.equal(_forward(src), _forward(dst))


def test_weights_written_in_place_then_loaded_through_a_state_dict_count():
    # values written into the parameters in place, then a state-dict round trip: real values, loaded
    a = _layer()
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.1)
    a.load_state_dict(a.state_dict())
    assert a.routed_experts.loaded


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
    # an unloaded layer's w13 alone into a loaded layer: its w13 is NaN now (unwritten), its w2 stays loaded
    a, b = _layer(), _layer()
    b.load_expert_weights(*_weights())
    sd = a.state_dict()
    del sd["routed_experts.w2_weight"]
    res = b.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["routed_experts.w2_weight"] and not res.unexpected_keys
    assert b.routed_experts.missing() == [f"expert {e} w{s}" for e in range(E) for s in (1, 3)]


def test_an_all_zero_bias_is_a_value():
    # biases of zeros are real (zero-initialised biases ship): a loaded layer's zero biases load as loaded
    a, b = _layer(has_bias=True), _layer(has_bias=True)
    a.load_expert_weights(*_weights(), torch.zeros(E, 2 * I), torch.zeros(E, H))
    b.load_state_dict(a.state_dict())
    assert b.routed_experts.loaded


@pytest.mark.parametrize("quant", list(QUANTS))
def test_quantised_layers_read_zero_scales_as_unwritten(quant):
    # fp8 block / per-tensor ([E] w2 scales, 1-D) and mxfp4 (uint8 codes, e8m0 scale bytes): an unloaded layer's
    # copy misses weights and scales (its codes with their scales); a loaded layer's copy computes the same bits
    fmt = moekit.parse_quant_config(QUANTS[quant])
    a, b = (moekit.FusedMoE(E, K, QH, QI, params_dtype=torch.bfloat16, quant_config=QUANTS[quant],
                            backend="torch").eval() for _ in range(2))
    b.load_state_dict(a.state_dict())
    missing = b.routed_experts.missing()
    assert "expert 0 w1" in missing and "expert 0 w1 scale" in missing and "expert 3 w2 scale" in missing
    q = moekit.quantize_experts(*_weights(h=QH, inter=QI), fmt)
    a.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
    b.load_state_dict(a.state_dict())
    assert b.routed_experts.loaded
    assert torch.equal(_forward(a, torch.bfloat16, QH), _forward(b, torch.bfloat16, QH))


def test_one_unwritten_expert_shard_names_that_expert():
    # a state dict whose expert 2 gate rows were never written (NaN): only that shard is missing
    a, b = _layer(), _layer()
    w13, w2 = _weights()
    a.load_expert_weights(w13, w2)
    sd = a.state_dict()
    sd["routed_experts.w13_weight"][2, :I] = float("nan")
    b.load_state_dict(sd)
    assert b.routed_experts.missing() == ["expert 2 w1"]


@pytest.mark.parametrize("quant", [None] + list(QUANTS))
def test_an_all_zero_padding_expert_restores_from_its_state_dict(quant):
    # round 56 (a user trial): padding experts of zeros (added so that E divides the EP size) are values; round 55 read
    # them as never written, and the layer restored from its own state dict refused every forward
    h, inter = (H, I) if quant is None else (QH, QI)
    w13, w2 = _weights(h=h, inter=inter)
    w13[3], w2[3] = 0, 0
    args = dict(params_dtype=torch.float32, quant_config=None if quant is None else QUANTS[quant], backend="torch")
    a, b = (moekit.FusedMoE(E, K, h, inter, **args).eval() for _ in range(2))
    a.load_expert_weights(w13, w2)
    b.load_state_dict(a.state_dict())
    assert b.routed_experts.loaded
    assert torch.equal(_forward(a, h=h), _forward(b, h=h))


def test_a_layer_materialised_with_to_empty_starts_unset_too():
    # built on meta, to_empty (uninitialised memory), saved before any load: its copy loads as not loaded
    a = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", device="meta").to_empty(device="cpu")
    assert a.routed_experts.w13_weight.isnan().all() and a.routed_experts.w2_weight.isnan().all()
    b = _layer()
    b.load_state_dict(a.state_dict())
    assert not b.routed_experts.loaded
    a.load_expert_weights(*_weights())  # and it loads as any layer does
    assert a.routed_experts.loaded
