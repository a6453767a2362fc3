"""The architectures of issue #13, each as a tiny random transformers model (fp32, eager experts = reference):

- patch(model): logits equal the unpatched model's, greedy generate gives the same tokens;
- save_pretrained -> load_moe_layers: every MoE block's output equals the transformers block's output;
- register(): experts_implementation="moekit" matches eager (types with transformers' experts switch);
- the text towers load from a multimodal wrapper's checkpoint layout; refused types say why.
Types missing from the installed transformers skip with the reason.
"""

import copy
import functools
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny_archs as tiny  # noqa: E402

from moekit import load_moe_layers  # noqa: E402
from moekit.integrations.transformers import MoEBlockAdapter, patch, register  # noqa: E402
from moekit.loading.architectures import plan_layers, spec_for  # noqa: E402

TYPES = list(tiny.TINY)
GENERATIVE = [t for t in TYPES if tiny.TINY[t][0].endswith("ForCausalLM")]


def _skip(model_type):
    why = tiny.missing(model_type)
    if why:
        pytest.skip(why)


@functools.lru_cache(maxsize=None)
def _built(model_type):
    return tiny.build(model_type)


def _model(model_type):
    _skip(model_type)
    return copy.deepcopy(_built(model_type))


def _close(out, ref, rel=1e-5):
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * ref.abs().max().item())


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _ids(b=2, s=7, seed=0):
    return torch.randint(3, 96, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", TYPES)
def test_patch_keeps_outputs(model_type):
    model = _model(model_type)
    ids = _ids()
    with torch.no_grad():
        ref = _out(model(input_ids=ids))
    plans = plan_layers(model.config.to_dict())[1]
    replaced = patch(model)
    assert len(replaced) == len(plans) > 0
    assert all(isinstance(model.get_submodule(n), MoEBlockAdapter) for n in replaced)
    with torch.no_grad():
        _close(_out(model(input_ids=ids)), ref)
    assert patch(model) == []


@pytest.mark.parametrize("model_type", GENERATIVE)
def test_patch_keeps_greedy_generate(model_type):
    model = _model(model_type)
    prompt = _ids(1, 5, seed=1)
    ref = model.generate(prompt, max_new_tokens=3, do_sample=False)
    patch(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False), ref)


@pytest.mark.parametrize("model_type", TYPES)
def test_load_moe_layers_reproduces_every_block(model_type, tmp_path):
    model = _model(model_type)
    model.save_pretrained(tmp_path)
    layers = load_moe_layers(tmp_path)
    modules = dict(model.named_modules())
    assert layers
    g = torch.Generator().manual_seed(2)
    for name, layer in layers.items():
        block = next(modules[n] for n in modules if n and name.endswith(n) and n.count(".") >= 2)
        x = torch.randn(2, 5, layer.moe_config.hidden_size, generator=g)
        with torch.no_grad():
            ref = block(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            _close(layer(x.reshape(10, -1)), ref.reshape(10, -1))


SWITCH = [t for t in TYPES if spec_for({"model_type": tiny.config_type(t)}).experts_switch]


@pytest.mark.parametrize("model_type", SWITCH)
def test_register_experts_implementation(model_type):
    model = _model(model_type)
    ids = _ids(seed=3)
    with torch.no_grad():
        ref = _out(model(input_ids=ids))
    model.set_experts_implementation(register())
    with torch.no_grad():
        _close(_out(model(input_ids=ids)), ref)


@pytest.mark.parametrize("model_type", sorted(tiny.WRAPPED))
def test_text_tower_loads_from_a_wrapper_checkpoint(model_type, tmp_path):
    """A multimodal wrapper's checkpoint: the text tower's keys under the wrapper's stack path."""
    from safetensors.torch import load_file, save_file

    model = _model(model_type)
    model.save_pretrained(tmp_path / "text")
    sd = load_file(next((tmp_path / "text").glob("*.safetensors")))
    stack = tiny.WRAPPED[model_type]
    key = "thinker_config.text_config" if model_type == "qwen3_omni_moe" else "text_config"
    cfg = {"model_type": model_type}
    node = cfg
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = model.config.to_dict()
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    (wrapped / "config.json").write_text(json.dumps(cfg))
    lead = "model.layers." if any(k.startswith("model.layers.") for k in sd) else "layers."
    save_file({(stack + "." + k[len(lead):]) if k.startswith(lead) else "lm." + k: v for k, v in sd.items()},
              str(wrapped / "model.safetensors"))
    direct, layers = load_moe_layers(tmp_path / "text"), load_moe_layers(wrapped)
    assert [n.split(".", n.count(".") - 2)[-1] for n in layers] == [n.split(".", n.count(".") - 2)[-1] for n in direct]
    assert all(n.startswith(stack + ".") for n in layers)
    x = torch.randn(6, tiny.H)
    for a, b in zip(direct.values(), layers.values()):
        with torch.no_grad():
            _close(b(x), a(x))


@pytest.mark.parametrize("model_type", ["zaya", "ernie4_5_vl_moe", "switch_transformers", "nllb-moe", "doge"])
def test_refused_types_say_why(model_type):
    with pytest.raises(NotImplementedError, match="not supported by moekit: .*(router|modality)"):
        plan_layers({"model_type": model_type, "hidden_size": 8})


@pytest.mark.parametrize("p", [2.0, None])
def test_dbrx_other_weight_norms(p, tmp_path):
    """DBRX with moe_normalize_expert_weights = 2 (named routing "pnorm") or None (no renormalisation)."""
    _skip("dbrx")
    ffn = dict(tiny.TINY["dbrx"][1]["ffn_config"], moe_normalize_expert_weights=p)
    model = tiny.build("dbrx", ffn_config=ffn)
    ids = _ids(seed=4)
    with torch.no_grad():
        ref = _out(model(input_ids=ids))
    model.save_pretrained(tmp_path)
    layer = load_moe_layers(tmp_path)["transformer.blocks.1.ffn"]
    x = torch.randn(6, tiny.H)
    with torch.no_grad():
        _close(layer(x), model.get_submodule("transformer.blocks.1.ffn")(x[None])[0])
    patch(model)
    with torch.no_grad():
        _close(_out(model(input_ids=ids)), ref)
