"""Round 69: weaknesses round 68 left in the experts. One method says which rows of a w13 slot are a shard's (the
arithmetic was in ``ExpertTensor.write`` and in range16's ``shard_of``); the float16 range checks on the paths that
bypassed them (``adopt_weights`` of a 4-bit layer, a quantised layer's biases converted by ``.half()``, gpt-oss biases
converted by ``patch()``); and ``adopt_weights`` checks every tensor before it adopts one. Each test names its edge."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import moekit
from moekit.config import MoEConfig
from moekit.experts.params import expert_tensors_spec
from moekit.experts.placement import ExpertPlacement
from moekit.experts.routed import RoutedExperts

E, K, H, I = 2, 1, 32, 32
FMTS = [moekit.Int4GroupFormat(32), moekit.Mxfp4Format()]
IDS = ["int4_g32", "mxfp4"]
# a scale that takes a group's largest code past 65504 (int4: |q| 7 or 8 x 10000; mxfp4: e8m0 141 = 2^14, x 4 or 6)
BIG = {"int4_group": 10000.0, "mxfp4": 141}
OUT_OF_RANGE = "finite values outside float16's range"


def _weights(e=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * I, H, generator=g) * 0.1, torch.randn(e, H, I, generator=g) * 0.1


def _run(layer, dtype=torch.float16):
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    return layer(x, router_logits=torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2))


def _held(experts) -> dict:
    """Copies of every per-slot tensor of ``experts`` by parameter name (what ``adopt_weights`` takes)."""
    return {n: getattr(experts, n).detach().clone() for n in experts.specs}


def _adopt(experts, tensors: dict) -> None:
    t = dict(tensors)
    experts.adopt_weights(t.pop("w13_weight"), t.pop("w2_weight"), t.pop("w13_bias", None), t.pop("w2_bias", None),
                          **t)


# --- 1. one method for the rows of a shard

def _rand(shape, dtype, g):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 120, shape, generator=g).to(dtype)


@pytest.mark.parametrize("fmt", [None] + FMTS, ids=["float"] + IDS)
@pytest.mark.parametrize("gated, tp_rank", [(True, 0), (True, 1), (False, 1)])
def test_the_rows_write_fills_are_the_rows_shard_rows_reads(fmt, gated, tp_rank):
    # edge: which rows of a w13 slot are the gate shard and which the up shard was computed twice (ExpertTensor.write,
    # range16.shard_of); ExpertTensor.shard_rows is the one place: what write puts in a shard (a TP rank's share of
    # the full shard: rank 1 of 2 here; gated and relu2 layers; weights, codes, scales, biases) is what shard_rows
    # reads back, and the shards tile the slot
    g, inter = torch.Generator().manual_seed(0), 64
    tp = slice(32 * tp_rank, 32 * tp_rank + 32)
    for name, spec in expert_tensors_spec(H, inter, gated, True, torch.float32, fmt).items():
        param = torch.zeros(spec.local_shape(3, tp), dtype=spec.dtype)
        for shard in spec.shards:
            full = _rand(spec.shard_shape, spec.dtype, g)
            spec.write(param, 1, shard, full, tp)
            assert torch.equal(spec.shard_rows(param[1], shard), spec.take(full, tp)), (name, shard)
        assert sum(spec.shard_rows(param[1], s).numel() for s in spec.shards) == param[1].numel()
        assert not param[0].any() and not param[2].any()  # (the other slots untouched)


# --- 2. adopt_weights of a float16 4-bit layer

def _fp16_layer(fmt, loaded=True):
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16, quant_config=fmt, backend="torch")
    if loaded:
        layer.load_expert_weights(*_weights())
    return layer


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("side, expert", [("w13", 0), ("w2", 1)])
def test_adopt_weights_refuses_scales_whose_weights_pass_float16(fmt, side, expert):
    # edge: adopt_weights took a float16 4-bit layer's codes and scales unchecked (the tensors are already in the
    # layer's dtypes, so nothing is converted; what overflows is W = codes x scales, which the GEMM rounds to float16):
    # with one expert's scales at 2^14 / 10000, every token routed to it came out NaN
    given = _held(_fp16_layer(fmt).routed_experts)
    given[f"{side}_scale"][expert] = BIG[fmt.name]
    layer = _fp16_layer(fmt, loaded=False)
    re = layer.routed_experts
    before = {n: getattr(re, n) for n in re.specs}
    with pytest.raises(ValueError, match=rf"adopt_weights: {side} of expert {expert} holds \d+ {OUT_OF_RANGE}"):
        _adopt(re, given)
    assert all(getattr(re, n) is p for n, p in before.items()) and not re.loaded  # nothing adopted


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_adopt_weights_takes_fitting_and_bfloat16_pairs(fmt):
    # guard: a pair that fits float16 is adopted (no copy) and runs; the same large scales in a bfloat16 layer (whose
    # range holds them) are adopted too
    src = _fp16_layer(fmt).routed_experts
    layer = _fp16_layer(fmt, loaded=False)
    given = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in _held(src).items()}
    _adopt(layer.routed_experts, given)
    assert layer.routed_experts.w13_weight is given["w13_weight"] and torch.isfinite(_run(layer)).all()
    bf = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch")
    bf.load_expert_weights(*_weights())
    big = _held(bf.routed_experts)
    big["w13_scale"][0] = BIG[fmt.name]
    _adopt(bf.routed_experts, big)
    assert bf.routed_experts.loaded


def test_adopt_weights_names_the_logical_expert_of_a_slot():
    # edge: under expert parallelism the adopted tensors are the rank's slots (rank 1 of 2 holds experts 2 and 3):
    # the message names the logical expert (3), not the slot (1)
    fmt, e = moekit.Int4GroupFormat(32), 4
    c = MoEConfig(e, K, H, I, params_dtype=torch.float16, quant_config=fmt)
    src = RoutedExperts("ep", torch.float16, c, placement=ExpertPlacement.build(e, 0, ep_size=2, ep_rank=1))
    src.load_expert_weights(*_weights(e))
    given = _held(src)
    given["w13_scale"][1] = BIG[fmt.name]
    dst = RoutedExperts("ep", torch.float16, c, placement=ExpertPlacement.build(e, 0, ep_size=2, ep_rank=1))
    with pytest.raises(ValueError, match=rf"adopt_weights of layer 'ep': w13 of expert 3 holds \d+ {OUT_OF_RANGE}"):
        _adopt(dst, given)


def test_adopt_weights_adopts_nothing_when_a_later_tensor_is_refused():
    # edge: adopt_weights adopted each tensor as it checked it: a wrong w2 shape was refused with w13 already adopted
    # (the layer held the new w13 beside the old w2), and a bias given to a layer without biases was refused after
    # every tensor was adopted; a list in place of a tensor raised AttributeError
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch")
    re = layer.routed_experts
    w13, w2 = _weights()
    old = re.w13_weight
    with pytest.raises(ValueError, match=r"w2_weight must have shape \[2, 32, 32\], got \[2, 32, 16\]"):
        re.adopt_weights(w13, w2[..., :16])
    assert re.w13_weight is old and not re.loaded
    with pytest.raises(ValueError, match="w13_bias: the layer has has_bias=False, got a tensor"):
        re.adopt_weights(w13, w2, w13_bias=torch.zeros(E, 2 * I))
    assert re.w13_weight is old and not re.loaded
    with pytest.raises(TypeError, match="w2_weight must be a torch.Tensor, got list"):
        re.adopt_weights(w13, w2.tolist())
    assert re.w13_weight is old
    re.adopt_weights(w13, w2)  # (and the right ones are adopted)
    assert re.loaded and re.w13_weight.data_ptr() == w13.data_ptr()


# --- 3. a quantised layer's biases under .half()

def _bf16_with_bias(fmt, value):
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch", has_bias=True)
    b13, b2 = torch.zeros(E, 2 * I), torch.zeros(E, H)
    b2[1, 3] = value
    layer.load_expert_weights(*_weights(), b13, b2)
    return layer


QUANT = FMTS + [moekit.Fp8BlockFormat(32, 32), moekit.Fp8ChannelFormat()]


@pytest.mark.parametrize("fmt", QUANT, ids=IDS + ["fp8_block", "fp8_channel"])
@pytest.mark.parametrize("cast", ["half", "to"])
def test_half_of_a_quantised_layer_refuses_a_bias_past_float16(fmt, cast):
    # edge: .half() / .to(torch.float16) of a bfloat16 quantised layer converts its biases with params_dtype (the
    # codes and scales stay): round 68 checked the dequantised weights only, and a bias of 1e5 became inf (every
    # token of expert 1 came out inf / NaN). Refused before anything moves; the layer stays a working bf16 layer
    layer = _bf16_with_bias(fmt, 1e5)
    before = _run(layer, torch.bfloat16)
    with pytest.raises(ValueError, match=rf"w2_bias of expert 1 \(a cast of the layer to float16\) holds 1 "
                                         rf"{OUT_OF_RANGE}"):
        layer.half() if cast == "half" else layer.to(torch.float16)
    re = layer.routed_experts
    assert re.params_dtype == torch.bfloat16 and re.w2_bias.dtype == torch.bfloat16
    assert torch.equal(_run(layer, torch.bfloat16), before) and torch.isfinite(before).all()


@pytest.mark.parametrize("fmt", QUANT, ids=IDS + ["fp8_block", "fp8_channel"])
def test_half_of_a_quantised_layer_with_fitting_biases_converts(fmt):
    # guard: biases within float16's range (65504 is its largest finite value) convert, and the layer runs
    layer = _bf16_with_bias(fmt, 1000.0)
    layer.half()
    re = layer.routed_experts
    assert re.params_dtype == torch.float16 and re.w2_bias.dtype == torch.float16 and re.w2_bias[1, 3] == 1000
    assert torch.isfinite(_run(layer)).all()


# --- 4. patch() of a float16 gpt-oss with mxfp4 experts

def _gpt_oss_fp16():
    pytest.importorskip("transformers.integrations.mxfp4")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integrations"))
    from hf_quant import mxfp4_gpt_oss

    _, model = mxfp4_gpt_oss(dtype=torch.float16)
    return model


def test_patch_refuses_gpt_oss_biases_past_float16():
    # edge: a float16 gpt-oss whose mxfp4 experts hold float32 biases (transformers' Mxfp4GptOssExperts): patch()
    # converted them to the model's float16 unchecked, and a bias of 1e5 became inf
    pytest.importorskip("transformers")
    from moekit.integrations.transformers import patch

    model = _gpt_oss_fp16()
    experts = model.model.layers[0].mlp.experts
    assert experts.down_proj_bias.dtype == torch.float32
    with torch.no_grad():
        experts.down_proj_bias[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Mxfp4GptOssExperts\)\.down_proj_bias "
                                         rf"\(converted to the model's torch\.float16\) holds 1 {OUT_OF_RANGE}"):
        patch(model, backend="torch")


def test_patch_refuses_gpt_oss_scales_past_float16():
    # edge: the same model's e8m0 scales: one gate/up group of expert 0 at byte 141 (2^14) with codes up to 6 was
    # adopted (patch() adopts the block's own tensors), and the model's logits came out NaN
    pytest.importorskip("transformers")
    from moekit.integrations.transformers import patch

    model = _gpt_oss_fp16()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj_scales[0, 0, 0] = 141
    with pytest.raises(ValueError, match=rf"adopt_weights of layer 'model\.layers\.0\.mlp': w13 of expert 0 holds \d+ "
                                         rf"{OUT_OF_RANGE}"):
        patch(model, backend="torch")
