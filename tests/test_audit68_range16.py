"""Round 68's audit: float16 layers of weight-only 4-bit formats (mxfp4, int4 group 32) must refuse a weight whose
dequantised values pass float16's range (the GEMM reads W rounded to float16: every token of the expert came out
NaN). Round 67 checked codes and scales given together; here one half given alone (a partial state dict,
``load_expert_shard`` of a scale or of codes) is checked with the other half the layer holds, and ``.half()`` /
``.to(torch.float16)`` of a bfloat16 layer checks what it holds. Each case names the edge it covers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.config import MoEConfig
from moekit.experts.placement import ExpertPlacement
from moekit.experts.routed import RoutedExperts
from moekit.ops.kernels import kernels_for
from moekit.ops.quantize import dequantize_weight

E, K, H, I = 2, 1, 32, 32
FMTS = [moekit.Int4GroupFormat(32), moekit.Mxfp4Format()]
IDS = ["int4_g32", "mxfp4"]
# a scale value that takes a group's largest code past 65504: int4 |q| 7 or 8 x 10000; mxfp4 e8m0 141 = 2^14, x 4 or 6
# (a group's largest code, OCP's rule)
BIG = {"int4_group": 10000.0, "mxfp4": 141}
OUT_OF_RANGE = "finite values outside float16's range"


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1


def _layer(fmt, dtype=torch.float16, loaded=True, w13=None):
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=dtype, quant_config=fmt, backend="torch")
    if loaded:
        w13_, w2 = _weights()
        layer.load_expert_weights(w13_ if w13 is None else w13, w2)
    return layer


def _run(layer, dtype=torch.float16):
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    return layer(x, router_logits=torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2))


def _big_scale(layer, fmt):
    big = layer.routed_experts.w13_scale.detach().clone()
    big[0] = BIG[fmt.name]
    return big


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_a_scale_alone_in_a_partial_state_dict_is_checked_with_the_layer_codes(fmt):
    # edge: load_state_dict({"w13_scale": ...}, strict=False) after the codes were loaded: the scale was never paired
    # with the codes the layer holds, and every token of expert 0 came out non-finite
    layer = _layer(fmt)
    before = {k: v.clone() for k, v in layer.routed_experts.state_dict().items()}
    with pytest.raises(ValueError, match=rf"state dict entry w13_scale of expert 0 w1 \(dequantised with the "
                                         rf"layer's codes\) holds \d+ {OUT_OF_RANGE}"):
        layer.routed_experts.load_state_dict({"w13_scale": _big_scale(layer, fmt)}, strict=False)
    # refused before anything was written: the layer holds what it held and still runs
    assert all(torch.equal(v, layer.routed_experts.state_dict()[k]) for k, v in before.items())
    assert torch.isfinite(_run(layer)).all()


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_a_scale_alone_by_load_expert_shard_is_checked_with_the_layer_codes(fmt):
    # edge: load_expert_shard(kind="scale") after load_expert_weights: the one-shard pairing (PendingPairs) held no
    # codes, so the scale was written unchecked
    layer = _layer(fmt)
    held = layer.routed_experts.w13_scale.detach().clone()
    with pytest.raises(ValueError, match=rf"expert 0 w1 scale \(dequantised with the layer's codes\) holds \d+ "
                                         rf"{OUT_OF_RANGE}"):
        layer.routed_experts.load_expert_shard(0, "w1", _big_scale(layer, fmt)[0][:I], kind="scale")
    assert torch.equal(layer.routed_experts.w13_scale, held) and torch.isfinite(_run(layer)).all()
    # nor is the refused scale kept as the first of a pair: the layer's own codes, given next, load
    codes = layer.routed_experts.w13_weight.detach()[0, :I].clone()
    assert layer.routed_experts.load_expert_shard(0, "w1", codes) == 1


def _big_codes(layer, fmt):
    """Expert 0's w1 codes with row 0's first group at the largest magnitude (int4: q = -8, word 0; mxfp4: 6.0, the
    byte 0x77), which pass 65504 with the scale the layer holds there (checked here: the case is not vacuous)."""
    re = layer.routed_experts
    codes = re.w13_weight.detach()[0, :I].clone()
    words = 32 // fmt.pack
    codes[0, :words] = 0 if fmt.name == "int4_group" else 0x77
    assert dequantize_weight(codes, re.w13_scale.detach()[0, :I], fmt).abs().max() > 65520
    return codes


def _layer_with_big_scale(fmt):
    """A float16 layer whose expert 0 row 0 first group holds a large scale with small codes, a pair that fits (int4:
    q = 0 x 8274; mxfp4: 3.0 x 2^14 = 49152), loaded whole (its own state dict, patched)."""
    layer = _layer(fmt)
    sd = {k: v.clone() for k, v in layer.routed_experts.state_dict().items()}
    int4 = fmt.name == "int4_group"
    sd["w13_scale"][0, 0, 0] = 8274.0 if int4 else 141
    sd["w13_weight"][0, 0, :32 // fmt.pack] = 0x88888888 - 2**32 if int4 else 0x55  # q + 8 = 8 nibbles; 3.0 codes
    layer.routed_experts.load_state_dict(sd)
    return layer


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("path", ["load_expert_shard", "state_dict"])
def test_codes_alone_after_the_scales_are_checked_with_the_layer_scales(fmt, path):
    # edge: the mirror case, codes given alone (kind="weight", or a state dict holding w13_weight only) after the
    # scales: paired with the scales the layer holds
    layer = _layer_with_big_scale(fmt)
    assert torch.isfinite(_run(layer)).all()
    re, codes = layer.routed_experts, _big_codes(layer, fmt)
    held = re.w13_weight.detach().clone()
    if path == "load_expert_shard":
        with pytest.raises(ValueError, match=r"expert 0 w1 weight \(dequantised with the layer's scale\) holds"):
            re.load_expert_shard(0, "w1", codes)
    else:
        whole = held.clone()
        whole[0, :I] = codes
        with pytest.raises(ValueError, match=rf"state dict entry w13_weight of expert 0 w1 \(dequantised with the "
                                             rf"layer's scale\) holds \d+ {OUT_OF_RANGE}"):
            re.load_state_dict({"w13_weight": whole}, strict=False)
    assert torch.equal(re.w13_weight, held) and torch.isfinite(_run(layer)).all()


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_a_fitting_half_alone_loads(fmt):
    # guard: a scale (or codes) alone that fits with the other half loads, by either path, and the layer runs
    layer = _layer(fmt)
    re = layer.routed_experts
    scale, codes = re.w13_scale.detach().clone(), re.w13_weight.detach().clone()
    scale[1] = scale[0]  # expert 1 takes expert 0's scales: other values, in range
    re.load_state_dict({"w13_scale": scale}, strict=False)
    assert re.load_expert_shard(1, "w3", scale[0][I:], kind="scale") == 1
    re.load_state_dict({"w13_weight": codes}, strict=False)
    assert re.load_expert_shard(0, "w1", codes[0, :I]) == 1
    assert re.loaded and torch.isfinite(_run(layer)).all()


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_a_never_loaded_layer_takes_one_half_alone(fmt):
    # guard: the other half is unset (codes 0, which int4 reads as -8: -8 x 10000; scales 255 / NaN): never
    # written, so nothing is paired with it; the halves given alone load, and the pair is checked when both are in
    layer = _layer(fmt, loaded=False)
    re = layer.routed_experts
    big = re.w13_scale.detach().clone()
    big[0] = BIG[fmt.name]
    re.load_state_dict({"w13_scale": big}, strict=False)
    assert re.load_expert_shard(1, "w2", re.w2_scale.detach()[1].clone().fill_(BIG[fmt.name]), kind="scale") == 1
    fresh = _layer(fmt, loaded=False).routed_experts
    fresh.load_state_dict({"w13_weight": torch.zeros_like(fresh.w13_weight)}, strict=False)
    assert fresh.load_expert_shard(0, "w1", torch.zeros_like(fresh.w13_weight[0, :I])) == 1
    assert not re.loaded and not fresh.loaded


def test_a_float_shard_quantised_on_load_is_checked_as_its_own_pair():
    # guard: load_expert_shard of a float shard writes its new scale, then its new codes; the scale is checked with
    # those codes, not with the codes it replaces (int4: a w1 shard of column 0 = 62000 has scale 8267 and q = 7
    # there, 57867; the old codes' q = -8 with that scale would be 66133)
    fmt = moekit.Int4GroupFormat(32)
    layer = _layer(fmt)
    w1 = torch.randn(I, H, generator=torch.Generator().manual_seed(3)) * 0.1
    w1[:, 0] = 62000.0
    old = layer.routed_experts.w13_weight.detach()[0, :I]
    assert (dequantize_weight(old, moekit.quantize_experts(w1[None].repeat(1, 2, 1), torch.zeros(1, H, I),
                                                           fmt)[2][0, :I], fmt).abs() > 65520).any()
    assert layer.routed_experts.load_expert_shard(0, "w1", w1) == 1
    assert torch.isfinite(layer.routed_experts.w13_weight.detach()).all()


def test_a_one_shard_half_is_not_paired_with_a_stale_one():
    # edge: codes given by load_expert_shard wait for their scale (PendingPairs); a state dict (or load_expert_weights)
    # then replaced them, and a scale given next was paired with the replaced codes: refused though the layer's own
    # fit (int4: q = -8 x 8274 = 66192 with the old codes, 0 x 8274 with the layer's)
    fmt = moekit.Int4GroupFormat(32)
    layer = _layer(fmt)
    re = layer.routed_experts
    stale = re.w13_weight.detach()[0, :I].clone()
    stale[0, :4] = 0  # q = -8 in row 0's first group
    re.load_expert_shard(0, "w1", stale)
    sd = {k: v.clone() for k, v in re.state_dict().items()}
    sd["w13_weight"][0, 0, :4] = 0x88888888 - 2**32  # q = 0 there
    re.load_state_dict(sd)
    scale = re.w13_scale.detach()[0, :I].clone()
    scale[0, 0] = 8274.0
    assert re.load_expert_shard(0, "w1", scale, kind="scale") == 1
    assert torch.isfinite(_run(layer)).all()


def _q_minus_8(fmt):
    """A float16 int4 layer whose expert 0 row 0 first group holds q = -8 everywhere (codes loaded alone)."""
    layer = _layer(fmt)
    codes = layer.routed_experts.w13_weight.detach()[0, :I].clone()
    codes[0, :4] = 0  # q + 8 = 0 in every nibble
    layer.routed_experts.load_expert_shard(0, "w1", codes)
    return layer.routed_experts


def _scale(re, value):
    s = re.w13_scale.detach()[0, :I].clone()
    s[0, 0] = value
    return s


def test_exactly_65504_is_accepted():
    # guard: |W| up to 65504 is float16's largest finite value, and up to 65520 it rounds to it: accepted by both paths
    fmt = moekit.Int4GroupFormat(32)
    re = _q_minus_8(fmt)
    for value in (8188.0, 8189.0):  # -8 x: 65504, 65512 (-> 65504)
        re.load_expert_shard(0, "w1", _scale(re, value), kind="scale")
        re.load_state_dict({"w13_scale": re.w13_scale.detach().clone()}, strict=False)
        # what the GEMM reads: W rounded to float16, finite, 65504 at most (the activations may still overflow)
        w = dequantize_weight(re.w13_weight.detach()[0], re.w13_scale.detach()[0], fmt, dtype=torch.float16)
        assert torch.isfinite(w).all() and w.abs().max().item() == 65504


def test_65520_given_alone_is_refused():
    # edge: -8 x 8190 = 65520 rounds to inf in float16; given alone (after the codes) it was written unchecked
    re = _q_minus_8(moekit.Int4GroupFormat(32))
    re.load_expert_shard(0, "w1", _scale(re, 8188.0), kind="scale")  # (the pair kept for one-shard loads: used up)
    with pytest.raises(ValueError, match=r"expert 0 w1 scale \(dequantised with the layer's codes\) holds 32 finite "
                                         r"values outside float16's range \(\|x\| up to 6\.552e\+04 > 65504\)"):
        re.load_expert_shard(0, "w1", _scale(re, 8190.0), kind="scale")
    whole = re.w13_scale.detach().clone()
    whole[0, 0, 0] = 8190.0
    with pytest.raises(ValueError, match=r"state dict entry w13_scale of expert 0 w1 .* 6\.552e\+04 > 65504"):
        re.load_state_dict({"w13_scale": whole}, strict=False)


def _bf16_layer_past_fp16(fmt, value=90000.0, k=0):
    w13, w2 = _weights()
    w13[0, 0, k] = value  # legal in bfloat16, past float16's range once dequantised
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch")
    layer.load_expert_weights(w13, w2)
    return layer


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("cast", ["half", "to"])
def test_half_of_a_bf16_layer_past_fp16_range_is_refused_and_it_keeps_running(fmt, cast):
    # edge: .half() / .to(torch.float16) switched params_dtype to float16 and kept the codes: every token of expert 0
    # came out NaN with no error. Refused before anything moves; the layer stays a working bfloat16 layer
    layer = _bf16_layer_past_fp16(fmt)
    before = _run(layer, torch.bfloat16)
    with pytest.raises(ValueError, match=rf"w13 of expert 0 w1 \(dequantised; a cast of the layer to float16\) holds "
                                         rf"\d+ {OUT_OF_RANGE}"):
        layer.half() if cast == "half" else layer.to(torch.float16)
    re = layer.routed_experts
    assert re.params_dtype == torch.bfloat16 and re.moe_config.params_dtype == torch.bfloat16
    assert layer.moe_config.params_dtype == torch.bfloat16
    assert torch.equal(_run(layer, torch.bfloat16), before) and torch.isfinite(before).all()
    # the routed experts alone are refused the same way
    with pytest.raises(ValueError, match=OUT_OF_RANGE):
        re.half()
    assert re.params_dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_half_of_a_fitting_bf16_layer_converts_and_unloaded_slots_are_not_checked(fmt):
    # guard: weights that fit convert as before; a slot whose codes were never written is not checked (int4 reads its
    # unset codes as -8, which with a large scale would pass 65504)
    layer = _bf16_layer_past_fp16(fmt, value=0.5)
    layer.half()
    assert layer.routed_experts.params_dtype == torch.float16 and torch.isfinite(_run(layer)).all()
    partial = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch")
    re = partial.routed_experts
    re.load_expert_shard(0, "w1", re.w13_scale.detach()[0, :I].clone().fill_(BIG[fmt.name]), kind="scale")
    partial.half()
    assert re.params_dtype == torch.float16 and not re.loaded


def _rega_experts(dtype, fmt=moekit.Mxfp4Format(), h=128, i=128):
    kernels = dataclasses.replace(kernels_for("torch"), packed_layouts=frozenset({"spec", "rega"}))
    c = MoEConfig(E, K, h, i, params_dtype=dtype, quant_config=fmt)
    experts = RoutedExperts("l", dtype, c, kernels=kernels)
    assert experts.packed_layout == "rega"
    return experts


def _one_code_at_k2():
    # expert 0 row 0 holds one weight of 6.0 at k = 2; re-laid (w4_layout), that code sits where SPEC §8's packing
    # has k = 32 (the second scale group): read without laying back, group 0 holds only zeros
    w13, w2 = torch.full((E, 256, 128), 0.01), torch.full((E, 128, 128), 0.01)
    w13[0, 0, 2] = 6.0
    return w13, w2


def test_relaid_codes_are_laid_back_before_pairing():
    # edge: a layer of the Triton backend stores packed words re-laid (packed_layout "rega", float16 too); pairing
    # a scale with them as if SPEC-packed checks other codes against it
    experts = _rega_experts(torch.float16)
    w13, w2 = _one_code_at_k2()
    experts.load_expert_weights(w13, w2)
    scale = experts.w13_scale.detach()[0, :128].clone()
    scale[0, 0] = 141  # 2^14: 6 x 16384 = 98304
    with pytest.raises(ValueError, match=r"expert 0 w1 scale \(dequantised with the layer's codes\) holds 1 "):
        experts.load_expert_shard(0, "w1", scale, kind="scale")
    whole = experts.w13_scale.detach().clone()
    whole[0, :128] = scale
    with pytest.raises(ValueError, match=r"state dict entry w13_scale of expert 0 w1"):
        experts.load_state_dict({"w13_scale": whole}, strict=False)
    # and a bfloat16 re-laid layer's .half() (the words stay re-laid in float16)
    w13[0, 0, 2] = 90000.0
    bf = _rega_experts(torch.bfloat16)
    bf.load_expert_weights(w13, w2)
    with pytest.raises(ValueError, match=r"w13 of expert 0 w1 \(dequantised; a cast of layer 'l' to float16\) holds 1"):
        bf.half()


def test_expert_parallel_slots_and_tensor_parallel_slices():
    # edge: under EP a logical expert lives in a local slot (rank 1 of 2 holds experts 2 and 3 in slots 0 and 1);
    # under TP a rank holds a slice of I and pairs its slice of the full shard given with the slice it holds
    fmt, e, i = moekit.Int4GroupFormat(32), 4, 64
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(e, 2 * i, H, generator=g) * 0.1, torch.randn(e, H, i, generator=g) * 0.1
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, fmt)
    c = MoEConfig(e, K, H, i, params_dtype=torch.float16, quant_config=fmt)
    ep = RoutedExperts("ep", torch.float16, c, placement=ExpertPlacement.build(e, 0, ep_size=2, ep_rank=1))
    ep.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    big = s13[3, i:].clone().fill_(BIG["int4_group"])
    with pytest.raises(ValueError, match=r"expert 3 w3 scale \(dequantised with the layer's codes\)"):
        ep.load_expert_shard(3, "w3", big, kind="scale")
    whole = ep.w13_scale.detach().clone()
    whole[1, i:] = BIG["int4_group"]
    with pytest.raises(ValueError, match=r"state dict entry w13_scale of expert 3 w3"):
        ep.load_state_dict({"w13_scale": whole}, strict=False)
    assert ep.load_expert_shard(0, "w3", big, kind="scale") == 0  # another rank's expert: that rank checks it
    tp = RoutedExperts("tp", torch.float16, c, placement=ExpertPlacement.build(e, tp_size=2, tp_rank=1))
    tp.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    mine, theirs = s13[0, :i].clone(), s13[0, :i].clone()  # the w1 shard's rows: rank 1 holds rows 32-63
    mine[40] = BIG["int4_group"]
    theirs[0] = BIG["int4_group"]
    with pytest.raises(ValueError, match=r"expert 0 w1 scale \(dequantised with the layer's codes\)"):
        tp.load_expert_shard(0, "w1", mine, kind="scale")
    assert tp.load_expert_shard(0, "w1", theirs, kind="scale") == 1  # rank 0's rows: rank 0 refuses them
    down = s2[1].clone()  # w2 [H, I / 32]: rank 1 holds the second column
    down[5, 1] = BIG["int4_group"]
    with pytest.raises(ValueError, match=r"expert 1 w2 scale \(dequantised with the layer's codes\)"):
        tp.load_expert_shard(1, "w2", down, kind="scale")
