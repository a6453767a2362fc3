"""The issue-#13 architectures of the DeepSeek-V3 and MiniMax-M2 families, Inkling and Gemma 4, as tiny random
transformers models (fp32, eager experts = the reference), one build per type:

- save_pretrained -> load_moe_layers reproduces every MoE block (Gemma 4: the MoE part of the decoder layer);
- register(): experts_implementation="moekit" keeps the logits (types with an experts switch);
- patch(model) keeps the logits (or the last hidden state of text-only towers) and greedy generate.
Types missing from the installed transformers skip.
"""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny13  # noqa: E402

from moekit import load_moe_layers  # noqa: E402
from moekit.integrations.transformers import _SWITCH_ATTRS, LayerMoEAdapter, MoEBlockAdapter, patch, register  # noqa: E402
from moekit.loading.architectures import plan_layers  # noqa: E402


def _close(out, ref, rel=1e-5):
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * ref.abs().max().item())


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _module(model, name):
    """The module at a load_moe_layers path (text-only towers have no ``model.`` prefix)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.removeprefix("model."))


def _block_ref(spec, block, x):
    if not spec.layer_level:
        out = block(x)
        return out[0] if isinstance(out, tuple) else out
    x = x.reshape(-1, x.shape[-1])
    _, w, idx = block.router(x)  # Gemma 4: the MoE half of the decoder layer
    return block.post_feedforward_layernorm_2(block.experts(block.pre_feedforward_layernorm_2(x), idx, w))


@pytest.mark.parametrize("arch", list(hf_tiny13.TINY13))
def test_architecture(arch, tmp_path):
    model = hf_tiny13.build(arch)
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no {hf_tiny13.TINY13[arch][0]}")
    spec, plans = plan_layers(model.config.to_dict())
    assert plans
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = _out(model, ids)
    gen = hasattr(model, "lm_head") and arch not in hf_tiny13.NO_GENERATE
    ref_gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False) if gen else None

    hf_tiny13.save(arch, model, tmp_path)
    layers = load_moe_layers(tmp_path)
    assert [p.name for p in plans] == list(layers)
    x = torch.randn(1, 9, plans[0].outer_hidden_size, generator=torch.Generator().manual_seed(1))
    for name, layer in layers.items():
        with torch.no_grad():
            _close(layer(x), _block_ref(spec, _module(model, name), x).reshape(x.shape))

    reached = all(hasattr(_module(model, n).experts, a) for n in layers for a in _SWITCH_ATTRS)
    if spec.experts_switch and not reached:  # the spec claims the switch: only a release before it may lack it
        assert arch in hf_tiny13.SWITCH_SINCE_5_25 and tuple(map(int, transformers.__version__.split(".")[:2])) < (5, 25), arch
    if spec.experts_switch and reached:
        register()
        model.set_experts_implementation("moekit")
        _close(_out(model, ids), ref)
        model.set_experts_implementation("eager")

    replaced = patch(model)
    assert len(replaced) == len(plans)
    for name in replaced:
        mod = model.get_submodule(name)
        moe = (mod.experts if spec.layer_level else mod).moe
        assert isinstance(mod, MoEBlockAdapter) or isinstance(mod.experts, LayerMoEAdapter)
        assert moe.routed_experts.loaded
    _close(_out(model, ids), ref)
    if gen:
        assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False), ref_gen)
    assert patch(model) == []


@pytest.mark.parametrize("arch", ["ergo", "muse_spark"])
def test_expert_output_norm_blocks_on_triton(arch, tmp_path):
    # the expert output norms (Ergo: per expert, Muse Spark: one) on the Triton backend (the interpreter
    # on CPU): the loaded blocks equal transformers' blocks, as on the torch backend above
    model = hf_tiny13.build(arch)
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no {hf_tiny13.TINY13[arch][0]}")
    spec, plans = plan_layers(model.config.to_dict())
    hf_tiny13.save(arch, model, tmp_path)
    layers = load_moe_layers(tmp_path, backend="triton")
    x = torch.randn(1, 7, plans[0].outer_hidden_size, generator=torch.Generator().manual_seed(3))
    for name, layer in layers.items():
        assert layer.backend == "triton" and layer.routed_experts.expert_output_norm is not None
        with torch.no_grad():
            _close(layer(x), _block_ref(spec, _module(model, name), x).reshape(x.shape))


def test_ergo_quantised_on_load(tmp_path):
    # Ergo quantised to fp8 block on load: the routed experts and the shared MLP (its [in, out] checkpoint
    # weights transposed first) run fp8, the shared MLP keeps its output norm; the layer stays within fp8's
    # error of the full-precision layer (relative RMS; e4m3 weights and activations through relu2)
    from moekit.loading.quant_shared import QuantSharedMLP

    model = hf_tiny13.build("ergo")
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no ergo")
    hf_tiny13.save("ergo", model, tmp_path)
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    full, quant = load_moe_layers(tmp_path), load_moe_layers(tmp_path, quant_config=fp8)
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    for name, layer in quant.items():
        shared = layer.shared_experts
        assert isinstance(shared, QuantSharedMLP) and layer.routed_experts.quant is not None
        assert torch.equal(shared.norm.weight, _module(model, name).shared_experts.norm.weight)
        with torch.no_grad():
            ref, out = full[name](x), layer(x)
        assert ((out - ref).norm() / ref.norm()).item() < 0.08


def test_missing_expert_norm_weight_is_named(tmp_path):
    # a checkpoint without a block's expert output norm weight does not load (the weight would be uninitialised)
    from safetensors.torch import load_file, save_file

    model = hf_tiny13.build("ergo")
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no ergo")
    hf_tiny13.save("ergo", model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    key = "layers.1.feed_forward.expert_output_norm.scale"
    del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(KeyError, match="expert_output_norm"):
        load_moe_layers(tmp_path)
