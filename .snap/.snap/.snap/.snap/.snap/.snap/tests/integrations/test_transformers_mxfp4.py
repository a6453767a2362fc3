"""patch(model) on transformers' gpt-oss with mxfp4 experts (``Mxfp4GptOssExperts``): the moekit layer holds them
4-bit (``quant_config=Mxfp4Format()``, SPEC §8's layout: uint8 codes and e8m0 scales, gate rows then up), never a
dequantised copy. It used to fail with "ValueError: w13_weight must have shape [4, 32, 32], got [4, 16, 32]".

On CPU transformers dequantises mxfp4 at load and its mxfp4 forward needs triton_kernels from the hub, so the
experts are built here by hand (:func:`hf_quant.mxfp4_gpt_oss`): random codes and scales in the plain layout, and the
reference is the same model with transformers' own dequantisation of them in its float ``GptOssExperts``.

On a GPU transformers holds them in triton_kernels' swizzled layout (``Tensor`` wrappers, scales in a
``PrecisionConfig``); patch() reads them back through each layout's own ``unswizzle_data``. On CPU a fake of those
objects (:class:`ShuffledLayout`, a non-trivial invertible layout) stands in; the GPU test uses triton_kernels itself.
"""

from __future__ import annotations

import copy
import os
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("transformers.integrations.mxfp4")
sys.path.insert(0, os.path.dirname(__file__))
from hf_quant import mxfp4_gpt_oss  # noqa: E402

import moekit  # noqa: E402
from moekit.integrations import _restore  # noqa: E402
from moekit.integrations._restore import extra_bytes, swizzled_storages  # noqa: E402
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


class HopperMXValueLayout:  # a layout without unswizzle_data (triton_kernels' newer make_transformation API)
    pass


class _Storage:  # triton_kernels' Storage: the stored tensor and its layout
    def __init__(self, data, layout):
        self.data, self.layout = data, layout


class _TritonTensor:  # triton_kernels' Tensor: a wrapper, not a torch.Tensor
    def __init__(self, data, layout):
        self.storage = _Storage(data, layout)


class PrecisionConfig:  # triton_kernels' matmul_ogs.PrecisionConfig: the scales of a swizzled weight
    def __init__(self, weight_scale):
        self.weight_scale, self.flex_ctx = weight_scale, None


class ShuffledLayout:
    """A swizzled layout of triton_kernels' API as transformers uses it (``layout_cls(shape, **opts)``, then
    ``swizzle_data`` / ``unswizzle_data``): ``[..., M, K]`` stored as ``[..., K, M]`` with those rows rolled by one,
    the columns reversed and every byte XOR 0x5A. Reading ``storage.data`` without ``unswizzle_data`` gives the
    expected shape with wrong bytes, forgetting the transpose back the wrong shape. ``e8m0``: unswizzled as
    float8_e8m0fnu (as a triton_kernels may give scales); ``pad``: one extra row unswizzled (a wrong shape)."""

    def __init__(self, shape, e8m0=False, pad=False):
        self.shape, self.e8m0, self.pad = list(shape), e8m0, pad

    def swizzle_data(self, data):
        return (data.transpose(-1, -2).flip(-1).roll(1, -2) ^ 0x5A).contiguous()

    def unswizzle_data(self, data):
        out = (data ^ 0x5A).roll(-1, -2).flip(-1).transpose(-1, -2).contiguous()  # (so the transpose back is not)
        out = torch.cat([out, out[..., :1, :]], -2) if self.pad else out
        return out.view(torch.float8_e8m0fnu) if self.e8m0 else out


def _swizzle(model, value=ShuffledLayout, scale=ShuffledLayout, value_opts=None, scale_opts=None):
    """``model``'s mxfp4 experts as transformers holds them on a GPU (``swizzle_mxfp4_convertops``): each stack's
    codes ``[E, N, K/2]`` swizzled transposed, the Parameter deleted and the wrapper set in its place, the scales
    (transposed) in ``{proj}_precision_config.weight_scale``; no ``*_scales`` Parameter left."""
    for layer in model.model.layers:
        ex = layer.mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            parts = []
            for t, cls, opts in ((ex._parameters.pop(proj).data, value, value_opts),
                                 (ex._parameters.pop(f"{proj}_scales").data, scale, scale_opts)):
                t = t.flatten(2).transpose(-2, -1)  # (transformers 5.17 declares the codes [E, N, K/32, 16])
                layout = cls(t.shape, **(opts or {}))
                parts.append(_TritonTensor(layout.swizzle_data(t), layout))
            setattr(ex, proj, parts[0])
            setattr(ex, f"{proj}_precision_config", PrecisionConfig(parts[1]))
    return model


@pytest.mark.parametrize("e8m0", [False, True])
def test_patch_keeps_swizzled_mxfp4_experts(e8m0):
    # what transformers builds for its GPU kernels (Mxfp4Deserialize): triton_kernels tensors in a swizzled layout,
    # the scales in a PrecisionConfig. Read back through the layouts' own unswizzle_data (as transformers'
    # Mxfp4ReverseDeserialize does), the moekit layer holds exactly what the plain layout gives (it used to be refused)
    ref, model = mxfp4_gpt_oss()
    plain = copy.deepcopy(model)
    _swizzle(model, scale_opts={"e8m0": e8m0})
    held = {n: (m, m.experts.gate_up_proj, m.experts.down_proj_precision_config.weight_scale.storage.data.clone())
            for n, m in model.named_modules() if n.endswith("mlp")}
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
    assert patch(plain, backend="torch") == patch(model, backend="torch", restorable=True) == list(held)
    for name in held:
        got, exp = (m.get_submodule(name).moe.routed_experts for m in (model, plain))
        assert isinstance(got.quant, moekit.Mxfp4Format)
        for n, t in exp.named_parameters():
            u = dict(got.named_parameters())[n]
            assert u.dtype == t.dtype and u.is_contiguous() and torch.equal(u, t), n
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(out, plain(ids).logits)  # bit-identical to the plain layout's layer
        assert _rel(out, want) < 1e-4  # and transformers' dequantised experts (as the plain test)
    # read only: the transformers module keeps its swizzled tensors, and unpatch() puts the very same block back
    assert unpatch(model) == list(held)
    for name, (block, w, s) in held.items():
        ex = model.get_submodule(name).experts
        assert model.get_submodule(name) is block and ex.gate_up_proj is w
        assert torch.equal(ex.down_proj_precision_config.weight_scale.storage.data, s)


def test_swizzled_storages_are_found():
    # the torch tensors a swizzled block holds outside its parameters (what keeping it for unpatch() costs)
    model = _swizzle(mxfp4_gpt_oss()[1])
    block = model.model.layers[0].mlp
    ex = block.experts
    want = [getattr(ex, p).storage.data for p in ("gate_up_proj", "down_proj")] + \
        [getattr(ex, f"{p}_precision_config").weight_scale.storage.data for p in ("gate_up_proj", "down_proj")]
    assert {t.data_ptr() for t in swizzled_storages(block)} == {t.data_ptr() for t in want}
    assert swizzled_storages(mxfp4_gpt_oss()[1].model.layers[0].mlp) == []
    # keeping the block for unpatch() costs those bytes too (the moekit layer holds unswizzled copies): the byte
    # count that decides whether patch() keeps it by default sees them (it counted parameters and buffers only)
    patch(model, backend="torch", restorable=True)
    cost, _ = extra_bytes(block, model.model.layers[0].mlp.moe)
    assert cost >= sum(t.untyped_storage().nbytes() for t in want)


def test_swizzled_layout_without_unswizzle_refused():
    # a layout object without unswizzle_data (triton_kernels' newer API: make_transformation): refused naming it and
    # what patch() needs, not read some other way
    _, model = mxfp4_gpt_oss()
    ex = model.model.layers[0].mlp.experts
    del ex._parameters["gate_up_proj"], ex._parameters["gate_up_proj_scales"]
    ex.gate_up_proj = _TritonTensor(torch.zeros(4, 32, 64, dtype=torch.uint8), HopperMXValueLayout())
    ex.gate_up_proj_precision_config = PrecisionConfig(_TritonTensor(torch.zeros(4, 2, 64, dtype=torch.uint8),
                                                                     ShuffledLayout([4, 2, 64])))
    with pytest.raises(NotImplementedError, match="gate_up_proj.*HopperMXValueLayout.*no unswizzle_data"):
        patch(model, backend="torch")


@pytest.mark.parametrize(("part", "name"), [("value", r"gate_up_proj \(unswizzled"),
                                            ("scale", r"gate_up_proj_precision_config.weight_scale \(unswizzled")])
def test_swizzled_wrong_shape_refused(part, name):
    # an unswizzled tensor of another shape than the plan's (here one padding row kept): ValueError naming it,
    # got and expected, never a silent wrong answer
    _, model = mxfp4_gpt_oss()
    _swizzle(model, **{f"{part}_opts": {"pad": True}})
    want, got = ("[4, 32, 64]", "[4, 33, 64]") if part == "value" else ("[4, 2, 64]", "[4, 3, 64]")
    with pytest.raises(ValueError, match=f"{name}.*gave {re.escape(got)}.*expected {re.escape(want)}"):
        patch(model, backend="torch")


@pytest.mark.gpu
def test_patch_keeps_triton_kernels_swizzled_mxfp4():
    # the real thing: codes swizzled with triton_kernels' own API as transformers' swizzle_mxfp4 does (its default
    # mxfp4 value layout for this GPU, StridedLayout scales), installed as swizzle_mxfp4_convertops does; the patched
    # layers hold exactly what the plain layout gives
    pytest.importorskip("triton_kernels")
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details import layout as tk_layout

    chosen = tk_layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
    if not isinstance(chosen, tuple):  # (class, options): the API transformers' swizzle_mxfp4 calls
        pytest.skip(f"triton_kernels' make_default_matmul_mxfp4_w_layout returns {type(chosen).__name__}, not the "
                    "(layout class, options) transformers' swizzle_mxfp4 expects")
    value_layout, value_opts = chosen
    ref, model = (m.to("cuda") for m in mxfp4_gpt_oss(dtype=torch.bfloat16))
    plain = copy.deepcopy(model)
    for layer in model.model.layers:
        ex = layer.mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            blocks = ex._parameters.pop(proj).data.contiguous()  # [E, N, K/2]
            scales = ex._parameters.pop(f"{proj}_scales").data.contiguous()  # [E, N, K/32]
            w = convert_layout(wrap_torch_tensor(blocks.transpose(-2, -1), dtype=FP4), value_layout, **value_opts)
            s = convert_layout(wrap_torch_tensor(scales.transpose(-2, -1)), tk_layout.StridedLayout)
            e, n, k = blocks.shape
            w.shape = torch.Size([e, 2 * k, n])  # as transformers overwrites it for the kernels
            setattr(ex, proj, w)
            setattr(ex, f"{proj}_precision_config", PrecisionConfig(s))
    ids = _ids().to("cuda")
    names = patch(plain)
    assert patch(model) == names
    for name in names:
        got, exp = (m.get_submodule(name).moe.routed_experts for m in (model, plain))
        assert got.w13_weight.device.type == "cuda" and got.w13_weight.dtype == torch.uint8
        for n, t in exp.named_parameters():
            assert torch.equal(dict(got.named_parameters())[n], t), n
    with torch.no_grad():
        want, out = ref(ids).logits, model(ids).logits
        assert _rel(out, plain(ids).logits) < 1e-3  # the same tensors and kernels (bf16 sums in any order)
        assert _rel(out, want) < 1e-2  # SPEC §8's bf16 weight-only tolerance against transformers' dequantised ones


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
