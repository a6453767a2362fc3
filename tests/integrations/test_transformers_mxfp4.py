"""patch(model) on transformers' gpt-oss with mxfp4 experts (``Mxfp4GptOssExperts``): the moekit layer holds them
4-bit (``quant_config=Mxfp4Format()``, SPEC §8's layout: uint8 codes and e8m0 scales, gate rows then up), never a
dequantised copy. It used to fail with "ValueError: w13_weight must have shape [4, 32, 32], got [4, 16, 32]".

On CPU transformers dequantises mxfp4 at load and its mxfp4 forward needs triton_kernels from the hub, so the
experts are built here by hand (:func:`hf_quant.mxfp4_gpt_oss`): random codes and scales in the plain layout, and the
reference is the same model with transformers' own dequantisation of them in its float ``GptOssExperts``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("transformers.integrations.mxfp4")
sys.path.insert(0, os.path.dirname(__file__))
from hf_quant import mxfp4_gpt_oss  # noqa: E402

import moekit  # noqa: E402
from moekit.integrations import _restore  # noqa: E402
from moekit.integrations.transformers import patch, unpatch  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ids():
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("blocks_4d", [False, True])
def test_patch_keeps_mxfp4_experts(blocks_4d):
    # transformers' declared layout (gate_up_proj uint8 [E, 2I, H/2]) and the checkpoint's (*_blocks [E, 2I, H/32, 16])
    # both become an mxfp4 layer: uint8 codes / e8m0 scales, gate/up rows de-interleaved (a copy of the 4-bit bytes),
    # the down stack and its scales shared
    ref, model = mxfp4_gpt_oss(blocks_4d=blocks_4d)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
    experts = {n: m.experts for n, m in model.named_modules() if n.endswith("mlp")}
    names = patch(model, backend="torch")
    assert names == list(experts)
    for name, ex in experts.items():
        re = model.get_submodule(name).moe.routed_experts
        inter = ex.intermediate_size
        codes13 = (ex.gate_up_proj_blocks if blocks_4d else ex.gate_up_proj).flatten(2)
        codes2 = ex.down_proj_blocks if blocks_4d else ex.down_proj
        assert isinstance(re.quant, moekit.Mxfp4Format) and re.w13_weight.dtype == torch.uint8
        assert re.w13_weight.shape == (4, 2 * inter, 32) and re.w13_scale.dtype == torch.uint8
        assert torch.equal(re.w13_weight[:, :inter], codes13[:, 0::2])  # gate rows: the even rows of the stack
        assert torch.equal(re.w13_weight[:, inter:], codes13[:, 1::2])
        assert torch.equal(re.w13_scale[:, inter:], ex.gate_up_proj_scales[:, 1::2])
        assert torch.equal(re.w13_bias[:, :inter], ex.gate_up_proj_bias[:, 0::2])
        assert re.w2_weight.data_ptr() == codes2.data_ptr()  # shared, no copy
        assert re.w2_scale.data_ptr() == ex.down_proj_scales.data_ptr()
        assert not any(t.dtype.is_floating_point and t.numel() >= codes13.numel() for t in re.parameters())
    # fp32: the weight-only twin against transformers' dequantised experts, SPEC §8's 1e-4 (measured 1.7e-7)
    with torch.no_grad():
        assert _rel(model(ids).logits, want) < 1e-4
    # the same config on float experts (what transformers loads on CPU: dequantised) patches as a float layer
    ref.config.quantization_config = model.config.quantization_config
    patch(ref, backend="torch")
    assert ref.model.layers[0].mlp.moe.routed_experts.quant is None
    with torch.no_grad():
        assert _rel(ref(ids).logits, want) < 1e-5


def test_bf16_mxfp4_block():
    # a bf16 model (float32 biases in Mxfp4GptOssExperts, stored in bf16 by the layer): each block within SPEC §8's
    # bf16 weight-only tolerance 1e-2 of transformers' dequantised one (measured 3.6e-3)
    ref, model = mxfp4_gpt_oss(dtype=torch.bfloat16)
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    patch(model, backend="torch")
    for layer_ref, layer in zip(ref.model.layers, model.model.layers, strict=True):
        assert layer.mlp.moe.routed_experts.params_dtype == torch.bfloat16
        with torch.no_grad():
            want, out = layer_ref.mlp(x)[0], layer.mlp(x)[0]
        assert out.dtype == torch.bfloat16 and _rel(out, want) < 1e-2


def test_mxfp4_unpatch_needs_restorable(monkeypatch):
    # the de-interleaved gate/up codes are a converted copy: without restorable=True (and no byte allowance) the
    # original experts are dropped and unpatch() refuses; with it, unpatch() puts the very same modules back
    monkeypatch.setattr(_restore, "FREE_BYTES", 0)
    _, model = mxfp4_gpt_oss()
    patch(model, backend="torch")
    with pytest.raises(ValueError, match="restorable=True"):
        unpatch(model)
    _, model = mxfp4_gpt_oss()
    blocks = {n: m for n, m in model.named_modules() if n.endswith("mlp")}
    names = patch(model, backend="torch", restorable=True)
    assert unpatch(model) == names
    assert all(model.get_submodule(n) is b for n, b in blocks.items())


class HopperMXValueLayout:  # stands in for triton_kernels' layout classes (not installed on CPU)
    pass


class _Storage:
    layout = HopperMXValueLayout()


class _TritonTensor:  # triton_kernels' Tensor: a wrapper, not a torch.Tensor
    storage = _Storage()


def test_swizzled_mxfp4_refused():
    # what transformers builds for its GPU kernels (Mxfp4Deserialize): gate_up_proj a triton_kernels tensor in a
    # swizzled layout, the scales in a PrecisionConfig. Refused naming the layout (it used to fail on a missing key)
    _, model = mxfp4_gpt_oss()
    ex = model.model.layers[0].mlp.experts
    del ex._parameters["gate_up_proj"], ex._parameters["gate_up_proj_scales"]
    ex.gate_up_proj, ex.gate_up_proj_precision_config = _TritonTensor(), object()
    with pytest.raises(NotImplementedError, match="swizzled mxfp4 layout .*HopperMXValueLayout.*plain layout"):
        patch(model, backend="torch")


def test_mxfp4_without_scales_refused():
    # Mxfp4GptOssExperts as transformers declares it (uint8 codes, no scale tensors: they live in the PrecisionConfig
    # once loaded): refused, saying the scales are missing, instead of a shape error on w13_weight
    _, model = mxfp4_gpt_oss()
    for layer in model.model.layers:
        ex = layer.mlp.experts
        del ex._parameters["gate_up_proj_scales"], ex._parameters["down_proj_scales"]
    with pytest.raises(NotImplementedError, match="without their e8m0 scales"):
        patch(model, backend="torch")


def test_mxfp4_codes_need_the_mxfp4_format():
    # uint8 expert stacks with a quantization_config that is not mxfp4: refused naming the format
    _, model = mxfp4_gpt_oss()
    model.config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [16, 16]}
    with pytest.raises(NotImplementedError, match="uint8 expert stacks with quantization_config .*only mxfp4"):
        patch(model, backend="torch")
