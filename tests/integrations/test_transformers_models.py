"""Every supported architecture as a tiny random transformers model (fp32, eager experts = reference):

- patch(model): logits equal the unpatched model's (fp32, 1e-5 of max |logit|), greedy generate gives
  the same tokens, and router/expert weights are shared (same storage) where the layouts allow;
- save_pretrained -> load_moe_layers: every block's output equals the transformers block's output;
- register(): experts_implementation="moekit" runs moekit's experts and matches eager.
Skipped without transformers.
"""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from moekit import load_moe_layers  # noqa: E402
from moekit.loading.architectures import plan_layers  # noqa: E402
from moekit.integrations.transformers import MoEBlockAdapter, patch, register  # noqa: E402

ARCHS = list(hf_tiny.TINY)
SWITCH = [a for a in ARCHS if a not in ("longcat_flash", "llama4_text")]


def _close(out, ref, rel=1e-5):
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * scale)


def _ids(model, b=2, s=9, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_keeps_logits_and_generate(arch):
    model = hf_tiny.build(arch)
    ids = _ids(model)
    with torch.no_grad():
        ref = model(ids).logits
    ref_gen = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    blocks = {n: m for n, m in model.named_modules() if hasattr(m, "experts") and n.endswith(("mlp", "feed_forward"))}
    replaced = patch(model)
    assert replaced == list(blocks) and replaced
    with torch.no_grad():
        out = model(ids).logits
    _close(out, ref)
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False), ref_gen)
    for name in replaced:
        adapter, old = model.get_submodule(name), blocks[name]
        assert isinstance(adapter, MoEBlockAdapter)
        moe = adapter.moe
        router = old.gate if hasattr(old, "gate") else old.router
        router_w = router.classifier.weight if hasattr(router, "classifier") else router.weight
        assert moe.gate.weight.data_ptr() == router_w.data_ptr()  # shared, not copied
        assert moe.routed_experts.loaded  # the block's own tensors count as loaded
        if adapter.plan.fused_layout == "rows":
            assert moe.routed_experts.w13_weight.data_ptr() == old.experts.gate_up_proj.data_ptr()
            assert moe.routed_experts.w2_weight.data_ptr() == old.experts.down_proj.data_ptr()
    assert patch(model) == []  # idempotent: adapters are not patched again


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_then_load_moe_layers(arch, tmp_path):
    model = hf_tiny.build(arch, seed=1)
    model.save_pretrained(tmp_path)
    layers = load_moe_layers(tmp_path)
    plans = {p.name: p for p in plan_layers(model.config.to_dict())[1]}
    blocks = [n for n, m in model.named_modules() if hasattr(m, "experts") and n.endswith(("mlp", "feed_forward"))]
    assert list(layers) == blocks
    g = torch.Generator().manual_seed(2)
    h = model.config.hidden_size
    for name, layer in layers.items():
        x = torch.randn(2, 6, h, generator=g)
        ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=g)
        block = model.get_submodule(name)
        with torch.no_grad():
            needs_ids = plans[name].needs_input_ids
            ref = block(x, input_ids=ids) if needs_ids else block(x)
            ref = ref[0] if isinstance(ref, tuple) else ref  # gpt-oss, Llama 4: (hidden, scores/logits)
            out = layer(x.reshape(-1, h), input_ids=ids.reshape(-1) if needs_ids else None)
        _close(out, ref.reshape(out.shape))


@pytest.mark.parametrize("arch", SWITCH)
def test_register_experts_implementation(arch, monkeypatch):
    from moekit.ops import api as experts_mod

    calls = []
    real = experts_mod.fused_experts
    monkeypatch.setattr(experts_mod, "fused_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = hf_tiny.build(arch, seed=3)
    ids = _ids(model, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    assert register() == "moekit"
    model.set_experts_implementation("moekit")
    with torch.no_grad():
        out = model(ids).logits
    assert calls, "moekit's experts were not called"
    _close(out, ref)


def test_from_pretrained_with_moekit_experts(tmp_path):
    model = hf_tiny.build("mixtral", seed=4)
    model.save_pretrained(tmp_path)
    register()
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path, experts_implementation="moekit")
    assert loaded.config._experts_implementation == "moekit"
    ids = _ids(model, seed=4)
    with torch.no_grad():
        _close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_bf16_patched_is_as_close_to_fp32_as_transformers(arch):
    """bf16: compared with the fp32 eager model, the patched model errs no more than transformers' own."""
    ref_model = hf_tiny.build(arch, seed=5)
    ids = _ids(ref_model, seed=5)
    with torch.no_grad():
        ref = ref_model(ids).logits
    hf_bf16 = hf_tiny.build(arch, seed=5).to(torch.bfloat16)
    with torch.no_grad():
        base = (hf_bf16(ids).logits.float() - ref).norm() / ref.norm()
    patch(hf_bf16)
    with torch.no_grad():
        ours = (hf_bf16(ids).logits.float() - ref).norm() / ref.norm()
    assert ours <= 1.5 * base + 2e-3, (ours.item(), base.item())


def test_patch_rejects_unsupported_models():
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    with pytest.raises(NotImplementedError, match="not supported; supported architectures: Mixtral"):
        patch(transformers.LlamaForCausalLM(cfg))


def test_llama4_multimodal_wrapper(tmp_path):
    """Llama4ForConditionalGeneration: MoE blocks live at language_model.model.layers.N.feed_forward."""
    tc = dict(hidden_size=32, intermediate_size=16, intermediate_size_mlp=40, num_hidden_layers=2, num_local_experts=4,
              num_experts_per_tok=1, head_dim=8, vocab_size=96, num_attention_heads=4, num_key_value_heads=2)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)  # fmt: skip
    torch.manual_seed(6)
    model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=tc, vision_config=vc)).eval()
    hf_tiny._randomise(model, 6)
    ids = _ids(model.language_model, b=1, s=7, seed=6)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    names = ["language_model.model.layers.0.feed_forward", "language_model.model.layers.1.feed_forward"]
    layers = load_moe_layers(tmp_path)
    plans = {p.name: p for p in plan_layers(model.config.to_dict())[1]}
    assert list(layers) == names
    x = torch.randn(5, 32)
    with torch.no_grad():
        _close(layers[names[1]](x), model.get_submodule(names[1])(x)[0])
    assert patch(model) == names
    with torch.no_grad():
        _close(model(input_ids=ids).logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_on_cuda_uses_triton_and_keeps_logits(arch):
    # the CUDA path end to end: backend "auto" resolves to the Triton routing + experts kernels
    model = hf_tiny.build(arch).to("cuda")
    ids = _ids(model).to("cuda")
    with torch.no_grad():
        ref = model(ids).logits
    replaced = patch(model)
    assert replaced
    assert all(model.get_submodule(n).moe.backend == "triton" for n in replaced)
    with torch.no_grad():
        out = model(ids).logits
    _close(out, ref, rel=1e-4)  # fp32 kernels (ieee dot) against transformers' eager fp32 loop
