"""Round 61's integration audit: the experts switch's converted stacks follow a replaced, moved or cast stack; patch()
refuses a config edited after the model was built."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from moekit.integrations.transformers import register  # noqa: E402

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _pair():
    warnings.filterwarnings("ignore")
    register()
    ref, mine = hf_tiny.build("gpt_oss"), hf_tiny.build("gpt_oss")
    mine.set_experts_implementation("moekit")
    return ref.eval(), mine.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_switch_sees_a_stack_replaced_through_data():
    # the edge: `p.data = new` keeps the parameter object and its version counter: the cached conversion of the old
    # stack ran (4.55 off logits of at most 3.1)
    ref, mine = _pair()
    torch.testing.assert_close(_logits(mine), _logits(ref), rtol=1e-5, atol=1e-5)
    new = torch.randn_like(ref.model.layers[0].mlp.experts.down_proj)
    for model in (ref, mine):
        model.model.layers[0].mlp.experts.down_proj.data = new.clone()
    torch.testing.assert_close(_logits(mine), _logits(ref), rtol=1e-5, atol=1e-5)


def test_switch_sees_a_dtype_move():
    # the edge: model.to(bfloat16) casts each parameter's data in place of the object: the float32 copies ran and
    # fused_experts refused them (a dtype error naming w1)
    ref, mine = _pair()
    _logits(mine)  # (the float32 conversion cached)
    ref.to(torch.bfloat16)
    mine.to(torch.bfloat16)
    got, want = _logits(mine), _logits(ref)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # (bf16 kernels vs bf16 eager)


def test_switch_sees_an_in_place_edit_under_no_grad():
    # the control: an in-place edit of the parameter itself bumps its version counter (seen since round 49)
    ref, mine = _pair()
    _logits(mine)
    for model in (ref, mine):
        with torch.no_grad():
            model.model.layers[0].mlp.experts.gate_up_proj.mul_(3.0)
    torch.testing.assert_close(_logits(mine), _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, field, value, attr", [
    ("mixtral", "num_experts_per_tok", 3, "top_k"),
    ("qwen3_moe", "norm_topk_prob", False, "norm_topk_prob"),
    ("deepseek_v3", "routed_scaling_factor", 1.0, "routed_scaling_factor"),
    ("deepseek_v3", "num_experts_per_tok", 2, "top_k"),
])
def test_patch_refuses_a_config_edited_after_the_model_was_built(arch, field, value, attr):
    # the edge: transformers copies these settings into the blocks when it builds them and ignores later config
    # edits; patch() plans from the config, so the patched model computed something else (0.5-2.3 off), silently
    from moekit.integrations.transformers import patch
    model = hf_tiny.build(arch).eval()
    want = _logits(model)
    setattr(model.config, field, value)
    torch.testing.assert_close(_logits(model), want)  # (transformers ignores the edit)
    with pytest.raises(ValueError, match=rf"\.{attr} = .* but the model's config has {field} = {value!r} and moekit's"):
        patch(model)
    torch.testing.assert_close(_logits(model), want)  # nothing changed
    setattr(model.config, field, getattr(hf_tiny.build(arch).config, field))
    assert patch(model)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)
