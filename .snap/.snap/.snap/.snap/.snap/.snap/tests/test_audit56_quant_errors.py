"""Round 56: a quantised layer's ``load_expert_weights`` read the sizes from the tensors it was given, so a wrong w2 (a
TP rank's slice of I) blamed w13 ("w13 must have 2I = 128 ... (I from w2), got 256") and pre-sliced tensors got
"quantised weights hold (E, I, H, gated) = (8, 64, 64, True), the layer (8, 128, 64, True)", naming no argument. Each
tensor is now checked against the layer's own sizes: the error names the argument, its shape and the expected one, and
says that the global tensors are expected (as the unquantised path: "w2 must have shape [8, 64, 128], got ...")."""

from __future__ import annotations

import re

import pytest
import torch

import moekit
from moekit.ops.quant_config import parse_quant_config

E, K, H, I = 8, 2, 64, 128
FORMATS = {
    "fp8_block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
    "fp8_channel": moekit.Fp8ChannelFormat(),
    "fp8_tensor_static": moekit.Fp8ChannelFormat(per_tensor=True, static_input=True),
    "mxfp4": {"quant_method": "mxfp4"},
    "int4_g32": moekit.Int4GroupFormat(32),
}
GLOBAL = "load_expert_weights takes the global tensors"


def _quantised(cfg, e=E, inter=I, gated=True, seed=0):
    """``(w13_q, w2_q, w13_scale, w2_scale)`` of random experts of these sizes (a slice when smaller than the layer)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * inter if gated else inter, H, generator=g) / 8
    return moekit.quantize_experts(w13, torch.randn(e, H, inter, generator=g) / 8, cfg)


def _inputs(cfg, e=E):
    """The static formats' input scales ``[e]`` (empty otherwise)."""
    static = getattr(parse_quant_config(cfg), "static_input", False)
    return dict(w13_input_scale=torch.ones(e), w2_input_scale=torch.ones(e)) if static else {}


def _refused(layer, needles, *args, **kw):
    with pytest.raises(ValueError) as err:
        layer.load_expert_weights(*args, **kw)
    msg = str(err.value)
    assert all(n in msg for n in needles), msg
    return msg


def _shape(shape) -> str:
    return str(list(shape))


@pytest.mark.parametrize("name", list(FORMATS))
def test_wrong_w2_is_named_not_w13(name):
    # the edge of the report: w13 right, w2 a TP rank's half of I; the error must name w2 (not w13) with the
    # layer's expected shape fmt.w2_shape(E, I, H) and the global-tensor hint
    cfg = FORMATS[name]
    fmt = parse_quant_config(cfg)
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", quant_config=cfg)
    q13, _, s13, s2 = _quantised(cfg)
    _, l2, _, _ = _quantised(cfg, inter=I // 2)
    msg = _refused(layer, [f"w2 must have shape {_shape(fmt.w2_shape(E, I, H, True))}", f"got {_shape(l2.shape)}",
                           GLOBAL, f"I = {I}"], q13, l2, w13_scale=s13, w2_scale=s2, **_inputs(cfg))
    assert not msg.startswith("w13"), msg


@pytest.mark.parametrize("name", list(FORMATS))
def test_tp_and_ep_slices_name_the_first_argument(name):
    # pre-sliced tensors: a TP rank's slice of I (every tensor) and an EP rank's experts (E / 2): the first wrong
    # argument (w13) is named with its expected global shape, the layer's sizes and the hint (was "quantised
    # weights hold (E, I, H, gated) = ..., the layer ...", naming no argument)
    cfg = FORMATS[name]
    fmt = parse_quant_config(cfg)
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", quant_config=cfg)
    for e, inter in ((E, I // 2), (E // 2, I)):
        l13, l2, ls13, ls2 = _quantised(cfg, e=e, inter=inter)
        _refused(layer, [f"w13 must have shape {_shape(fmt.w13_shape(E, I, H, True))}", f"got {_shape(l13.shape)}",
                         f"E = {E} experts, I = {I}, H = {H}", GLOBAL], l13, l2, w13_scale=ls13, w2_scale=ls2,
                 **_inputs(cfg, e))


@pytest.mark.parametrize("name", list(FORMATS))
def test_wrong_scale_is_named(name):
    # edge: the weights are right and only w2_scale is an EP rank's share (E / 2 experts): named with its shape
    cfg = FORMATS[name]
    fmt = parse_quant_config(cfg)
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", quant_config=cfg)
    q13, q2, s13, s2 = _quantised(cfg)
    _refused(layer, [f"w2_scale must have shape {_shape(fmt.w2_scale_shape(E, I, H, True))}",
                     f"got {_shape(s2[: E // 2].shape)}", GLOBAL], q13, q2, w13_scale=s13, w2_scale=s2[: E // 2],
             **_inputs(cfg))


def test_static_input_scale_of_a_share_is_named():
    # edge: static fp8's [E] input scale given for this rank's experts only
    cfg = FORMATS["fp8_tensor_static"]
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", quant_config=cfg)
    q13, q2, s13, s2 = _quantised(cfg)
    _refused(layer, [f"w13_input_scale must have shape [{E}], got [{E // 2}]", GLOBAL], q13, q2, w13_scale=s13,
             w2_scale=s2, w13_input_scale=torch.ones(E // 2), w2_input_scale=torch.ones(E))


def test_not_gated_layer_names_its_w13_rows():
    # edge: a relu2 (not gated) layer given gated [E, 2I, H] weights: w13 expected [E, I, H], "not gated" said
    cfg = FORMATS["fp8_block"]
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", quant_config=cfg, activation="relu2")
    q13, q2, s13, s2 = _quantised(cfg)
    _refused(layer, [f"w13 must have shape [{E}, {I}, {H}], got [{E}, {2 * I}, {H}]", "not gated", GLOBAL], q13, q2,
             w13_scale=s13, w2_scale=s2)


def test_right_tensors_still_load_and_other_callers_read_sizes():
    # the layer's own sizes accept the global tensors (and the full-precision ones it quantises itself); the other
    # callers of check_quant_weights still read the sizes from the tensors: dequantize_experts of a slice works, and a
    # pair that disagrees keeps its message
    cfg = FORMATS["fp8_block"]
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", quant_config=cfg)
    q13, q2, s13, s2 = _quantised(cfg)
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    layer.load_expert_weights(torch.randn(E, 2 * I, H) / 8, torch.randn(E, H, I) / 8)
    l13, l2, ls13, ls2 = _quantised(cfg, inter=I // 2)
    w13, w2 = moekit.dequantize_experts(l13, l2, ls13, ls2, cfg)
    assert tuple(w13.shape) == (E, I, H) and tuple(w2.shape) == (E, H, I // 2)
    with pytest.raises(ValueError, match=re.escape("(I from w2)")):
        moekit.dequantize_experts(q13, l2, s13, ls2, cfg)
