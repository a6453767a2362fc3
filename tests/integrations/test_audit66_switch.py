"""Round 66: transformers' experts switch reads the gate function the experts module runs (its ``act_fn``), refuses
quantised experts classes clearly (their own experts interface), and patch() names the block and the config fields of
an invalid grouping. Each case names the edge it covers."""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_quant  # noqa: E402
import hf_tiny  # noqa: E402
import hf_tiny13  # noqa: E402

from moekit.integrations.transformers import check_registered, patch, register  # noqa: E402


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _switch_error(model, ids) -> float:
    model.set_experts_implementation("eager")
    ref = _logits(model, ids)
    model.set_experts_implementation(register())
    check_registered(model)
    got = _logits(model, ids)
    model.set_experts_implementation("eager")
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_switch_runs_deepseek_v4s_hidden_act(act):
    # edge: DeepseekV4Experts applies ACT2FN[config.hidden_act] after its clamp; the switch ran silu whatever it said
    # (relative error 0.43 for gelu); load_moe_layers and patch() followed it
    model = hf_tiny.build("deepseek_v4", hidden_act=act)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    assert _switch_error(model, ids) < 1e-5


def test_switch_runs_lfm2s_silu_whatever_a_stray_hidden_act_says():
    # edge: Lfm2MoeExperts run F.silu always (its config has no hidden_act); a config.json carrying one anyway changed
    # the switch's answer: gelu silently (7e-2 off), relu a false NotImplementedError
    from transformers import CONFIG_MAPPING
    cfg_type, cls_name, base = hf_tiny13.TINY13["lfm2_moe"]
    if cfg_type not in CONFIG_MAPPING:
        pytest.skip("this transformers has no LFM2-MoE")
    cfg_cls = CONFIG_MAPPING[cfg_type]
    fields = hf_tiny13._fields(cfg_cls)
    for act in ("gelu", "relu"):
        kw = {k: v for k, v in hf_tiny13.COMMON.items() if k in fields}
        kw.update(base, hidden_act=act)
        torch.manual_seed(0)
        model = hf_tiny13._model_class(cls_name, cfg_type)(cfg_cls(**kw)).float().eval()
        hf_tiny._randomise(model, 0)
        ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
        assert _switch_error(model, ids) < 1e-5, act


def test_switch_on_fp8_experts_is_refused_clearly():
    # edge: transformers' FP8Experts dispatch through their own FP8ExpertsInterface, which register() did not reach:
    # check_registered said the block ran moekit, then the forward raised transformers' "`moekit` is not a valid
    # experts implementation registered" KeyError
    from transformers.integrations import finegrained_fp8
    model = hf_quant.fp8_model("qwen3_moe").eval()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    model.set_experts_implementation(register())
    with pytest.raises(NotImplementedError, match=r"model.layers.1.mlp \(FP8Experts: quantised experts\).*patch"):
        check_registered(model)
    with pytest.raises(NotImplementedError, match="does not run FP8Experts.*patch"):
        old, finegrained_fp8.fp8_linear = finegrained_fp8.fp8_linear, hf_quant.ref_fp8_linear
        try:
            _logits(model, ids)
        finally:
            finegrained_fp8.fp8_linear = old
    with pytest.raises(ValueError, match="none of transformers' own"):  # a name of FP8ExpertsInterface's own
        register("deepgemm_megamoe")


def test_patch_names_the_block_and_fields_of_an_invalid_grouping():
    # edge: patch() refused n_group = 3 over 8 experts in FusedMoE's words alone (no block, no config field), where
    # load_moe_layers names the block and the config.json fields
    model = hf_tiny.build("deepseek_v3", n_group=3, topk_group=1)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp: num_expert_group \(3\) must divide .*model.config "
                                         r"gives num_expert_group = 3 \(n_group\)"):
        patch(model)


class _Wrap(torch.nn.Module):
    """A user's logging / profiling wrapper around a block."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, h, *args, **kwargs):
        return self.inner(h, *args, **kwargs)


@pytest.mark.parametrize("replace", [_Wrap, lambda block: torch.nn.Identity()])
def test_patch_of_a_wrapped_or_replaced_block_says_so(replace):
    # edge: a block wrapped or replaced by user code failed with a bare KeyError('experts.down_proj'); the model is
    # left as it was (all or nothing)
    model = hf_tiny.build("qwen3_moe")
    layer = [i for i, block in enumerate(model.model.layers) if hasattr(block.mlp, "experts")][-1]
    model.model.layers[layer].mlp = replace(model.model.layers[layer].mlp)
    before = [type(block.mlp) for block in model.model.layers]
    with pytest.raises(RuntimeError, match=rf"model.layers.{layer}.mlp is a \w+ without the tensor "
                                           r"'experts.down_proj'.*patch the model before wrapping"):
        patch(model)
    assert [type(block.mlp) for block in model.model.layers] == before


def test_patch_arguments_are_named_as_arguments():
    # edge: a bad backend or eager_graph_tokens was reported as "the model's config: model.layers.0.mlp: ..."
    model = hf_tiny.build("qwen3_moe")
    with pytest.raises(ValueError, match=r"^patch\(\): backend must be one of"):
        patch(model, backend="cuda")
    with pytest.raises(ValueError, match=r"^patch\(\): eager_graph_tokens must be None or an int >= 0, got -1"):
        patch(model, eager_graph_tokens=-1)


def test_patch_of_a_block_with_a_config_is_a_type_error():
    # edge: DeepSeek-V3's MoE block has a .config, so patch(block) got past the model check and raised a RuntimeError
    # about a block count (other families: TypeError)
    model = hf_tiny.build("deepseek_v3")
    with pytest.raises(TypeError, match="got DeepseekV3MoE, which holds none of them"):
        patch(model.model.layers[1].mlp)
