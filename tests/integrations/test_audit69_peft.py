"""Round 69 (audit of moekit with PEFT's LoRA; PEFT itself is not a test dependency: its wrappers are mimicked by
modules of the same shape). LoRA layers added inside patched blocks were dropped by ``unpatch()`` without a word; a
block PEFT wrapped before ``patch()`` was refused with messages blaming the config; PEFT's ``target_parameters`` on a
moekit layer's stacks replaced ``routed_experts`` by a wrapper that failed with an AttributeError; the experts switch
looked gpt-oss's gate function up by the class name, which a parametrization (PEFT's expert LoRA) renames."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.nn.utils import parametrize

import moekit

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from moekit.integrations.transformers import check_registered, patch, register, unpatch  # noqa: E402


class FakeLora(torch.nn.Module):
    """The shape of a PEFT LoRA layer: the wrapped module as ``base_layer``, a low-rank delta, ``get_base_layer``."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight)

    def get_base_layer(self):
        return self.base_layer

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def _ids():
    return torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))


def test_unpatch_refuses_to_drop_adapter_layers():
    # edge: a LoRA layer injected into the moekit layer's gate after patch(); unpatch() put the transformers block
    # back without it (what it trained lost, silently): refused now, naming the path, the model left patched
    model = hf_tiny.build("mixtral")
    patch(model)
    moe = model.model.layers[0].mlp.moe
    moe.gate = FakeLora(moe.gate)
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    with pytest.raises(ValueError, match=r"PEFT adapter layers .*layers\.0\.mlp\.moe\.gate.*merge_and_unload"):
        unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, before)


def test_unpatch_after_the_adapter_is_merged_away():
    # guard: with the adapter layer gone again (merge_and_unload puts the base module back), unpatch() works
    model = hf_tiny.build("mixtral")
    patch(model)
    moe = model.model.layers[0].mlp.moe
    moe.gate = FakeLora(moe.gate)
    moe.gate = moe.gate.get_base_layer()
    unpatch(model)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_patch_refuses_a_block_with_adapter_layers(model_type):
    # edge: get_peft_model before patch(): the wrapped gate's 'gate.base_layer.weight' was "a tensor with no place"
    # blaming config fields (Mixtral) or "router.e_score_correction_bias is needed" (DeepSeek-V3)
    model = hf_tiny.build(model_type)
    layer = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate"))
    mlp = model.model.layers[layer].mlp
    mlp.gate = FakeLora(mlp.gate) if isinstance(mlp.gate, torch.nn.Linear) else _wrap_router(mlp.gate)
    with pytest.raises(ValueError, match="holds PEFT adapter layers.*patch\\(\\) the model before get_peft_model"):
        patch(model)
    assert not any(type(m).__module__.startswith("moekit") for m in model.modules())


def _wrap_router(router):
    class Wrapped(torch.nn.Module):  # the shape of PEFT's modules_to_save wrapper
        def __init__(self, m):
            super().__init__()
            self.original_module = m
            self.modules_to_save = torch.nn.ModuleDict({"default": m})

        def forward(self, *a, **kw):
            return self.original_module(*a, **kw)

    return Wrapped(router)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_switch_finds_gpt_oss_gate_function_under_a_parametrization():
    # edge: PEFT's LoRA on the expert stacks parametrizes them, renaming the class ParametrizedGptOssExperts: the
    # switch refused ("does not know the gate function"); it reads the class before parametrization now
    model = hf_tiny.build("gpt_oss")
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    for layer in model.model.layers:
        parametrize.register_parametrization(layer.mlp.experts, "gate_up_proj", _Identity())
    assert type(model.model.layers[0].mlp.experts).__name__.startswith("Parametrized")
    model.set_experts_implementation(register())
    check_registered(model)
    with torch.no_grad():
        got = model(input_ids=_ids()).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _StacksWrapper(torch.nn.Module):  # the shape of PEFT's ParamWrapper: holds the module, reads nothing through
    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    def forward(self, *a, **kw):
        return self.base_layer(*a, **kw)


def _layer():
    g = torch.Generator().manual_seed(0)
    layer = moekit.FusedMoE(8, 2, 32, 16, gate=torch.nn.Linear(32, 8, bias=False))
    layer.load_expert_weights(torch.randn(8, 32, 32, generator=g) / 6, torch.randn(8, 32, 16, generator=g) / 4)
    return layer


def test_routed_experts_wrapper_without_the_stacks_is_refused():
    # edge: PEFT target_parameters on "routed_experts.w13_weight" replaced routed_experts by its wrapper, and the
    # forward failed with "'ParamWrapper' object has no attribute 'w13_weight'" (the Triton backend: at
    # get_peft_model): refused at the assignment, naming the way that works; the layer keeps running
    layer = _layer()
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = layer(x)
    with pytest.raises(TypeError, match="routed_experts must be a moekit RoutedExperts, got _StacksWrapper"):
        layer.routed_experts = _StacksWrapper(layer.routed_experts)
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def test_a_wrapper_reading_through_to_the_experts_still_runs():
    # guard: torch's activation-checkpoint wrapper reads attributes through to the module it wraps: it runs
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layer = _layer()
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = layer(x)
    layer.routed_experts = checkpoint_wrapper(layer.routed_experts)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
