"""Round 63's audit of patch(): frozen stacks stay frozen in moekit's copies, patched models with converted stacks
pickle, float64 models patch, user hooks that stop running are named. Tiny random transformers models (fp32)."""

from __future__ import annotations

import io
import os
import pickle
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
import hf_tiny13  # noqa: E402
import hf_tiny_archs  # noqa: E402

from moekit.integrations.transformers import patch, unpatch  # noqa: E402


def _ids(model):
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, min(vocab, 96), (2, 5), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _experts(model):
    return next(m for m in model.modules() if hasattr(m, "w13_weight"))


@pytest.mark.parametrize("arch, frozen", [
    ("gpt_oss", ("experts.down_proj", "experts.gate_up_proj_bias", "experts.down_proj_bias")),  # copied stacks
    ("mixtral", ("experts.down_proj",)),  # shared stacks: their own flags
])
def test_frozen_stacks_stay_frozen_in_moekits_copies(arch, frozen):
    # the edge: one flag (any stack trainable) went to every copy, so a frozen down_proj trained once patched and
    # unpatch wrote the trained values back into it
    model = hf_tiny.build(arch).train()
    kept = {}
    for name, p in model.named_parameters():
        if name.endswith(frozen):
            p.requires_grad_(False)
            kept[name] = p.detach().clone()
    patch(model, restorable=True)
    flags = {k: v.requires_grad for k, v in _experts(model).named_parameters(recurse=False)}
    assert flags["w13_weight"] and not flags["w2_weight"]
    assert not flags.get("w13_bias", False) and not flags.get("w2_bias", False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=_ids(model)).logits.float().pow(2).mean().backward()
    opt.step()
    unpatch(model)
    params = dict(model.named_parameters())
    for name, before in kept.items():
        assert torch.equal(params[name].detach(), before) and not params[name].requires_grad, name


def test_a_copy_made_of_stacks_with_different_flags_is_refused():
    # the edge: DBRX's w13 is made of w1 and v1; one frozen, one not cannot be one moekit parameter
    if hf_tiny_archs.missing("dbrx"):
        pytest.skip(hf_tiny_archs.missing("dbrx"))
    model = hf_tiny_archs.build("dbrx")
    w1 = next(p for n, p in model.named_parameters() if n.endswith("experts.mlp.w1"))
    w1.requires_grad_(False)
    before = _logits(model, _ids(model))
    with pytest.raises(ValueError, match="some require grad and some do not"):
        patch(model)
    assert torch.equal(_logits(model, _ids(model)), before)  # nothing was replaced


@pytest.mark.parametrize("arch", ["inkling", "ergo"])
def test_a_patched_model_with_a_factory_plan_pickles(arch):
    # the edge: the stand-in's carry-back held the ArchSpec, whose plan function was made inside a factory
    model = hf_tiny13.build(arch)
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    ids = _ids(model)
    ref = _logits(model, ids)
    patch(model, restorable=True)
    buf = io.BytesIO()
    torch.save(model, buf)
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)
    unpatch(again)  # the carry-back works on the copy
    torch.testing.assert_close(_logits(again, ids), ref, rtol=1e-5, atol=1e-5)


def test_a_float64_model_patches():
    # the edge: a float64 block built a float32 layer, which refused the float64 stacks (TypeError about float32)
    model = hf_tiny.build("mixtral").double()
    ids = _ids(model)
    ref = _logits(model, ids)
    patch(model, backend="torch")
    assert _experts(model).w13_weight.dtype == torch.float64
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-6, atol=1e-6)  # (routing weights are float32)


def test_user_hooks_that_stop_running_are_named():
    # the edge: hooks on the block and its router stopped running after patch(), silently
    model = hf_tiny.build("mixtral")
    block = model.model.layers[0].mlp
    block.register_forward_hook(lambda m, i, o: None)
    block.gate.register_forward_pre_hook(lambda m, i: None)
    with pytest.warns(UserWarning, match=r"'model.layers.0.mlp', 'model.layers.0.mlp.gate'\] do not run"):
        patch(model)
    plain = hf_tiny.build("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook: no warning
        patch(plain)
