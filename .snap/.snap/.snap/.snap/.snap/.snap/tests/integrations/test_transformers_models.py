"""Every supported architecture as a tiny random transformers model (fp32, eager experts = reference):

- patch(model): logits equal the unpatched model's (fp32, 1e-5 of max |logit|), greedy generate gives
  the same tokens, and router/expert weights are shared (same storage) where the layouts allow;
- save_pretrained -> load_moe_layers: every block's output equals the transformers block's output;
- register(): experts_implementation="moekit" runs moekit's experts (once per MoE block and forward,
  counted) and matches eager; check_registered() raises for the blocks the switch does not reach
  (Llama 4; LongCat-Flash before transformers 5.25) instead of letting them run transformers' own experts
  silently.
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
from moekit.integrations.transformers import MoEBlockAdapter, check_registered, patch, register  # noqa: E402

ARCHS = list(hf_tiny.TINY)
#: experts classes without @use_experts_implementation in some transformers release (LongCat-Flash before 5.25)
NOT_SWITCHED = ("longcat_flash", "llama4_text")
#: transformers releases whose text-only Llama4ForConditionalGeneration.forward raises on every call
#: (AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'): an upstream bug
LLAMA4_WRAPPER_FORWARD_BROKEN = {"5.24.0"}


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


def _moe_blocks(model):
    return [n for n, m in model.named_modules() if hasattr(m, "experts") and n.endswith(("mlp", "feed_forward"))]


def _switch_reaches(arch) -> bool:
    """Whether the installed transformers decorates every experts class of ``arch`` for the switch."""
    from moekit.integrations.transformers import _SWITCH_ATTRS

    model = hf_tiny.build(arch, seed=3)
    experts = [model.get_submodule(b).experts for b in _moe_blocks(model)]
    return all(hasattr(e, a) for e in experts for a in _SWITCH_ATTRS)


def _count_fused_experts(monkeypatch):
    from moekit.ops import api as experts_mod

    calls = []
    real = experts_mod.fused_experts
    monkeypatch.setattr(experts_mod, "fused_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_register_experts_implementation(arch, monkeypatch):
    if not _switch_reaches(arch):
        assert arch in NOT_SWITCHED, f"transformers {transformers.__version__} dropped the switch from {arch}"
        pytest.skip(f"transformers {transformers.__version__}: the switch does not reach {arch} (tested below)")
    calls = _count_fused_experts(monkeypatch)
    model = hf_tiny.build(arch, seed=3)
    ids = _ids(model, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    assert not calls
    assert register() == "moekit"
    with pytest.raises(ValueError, match="runs experts_implementation='eager', not 'moekit'"):
        check_registered(model)
    model.set_experts_implementation("moekit")
    blocks = _moe_blocks(model)
    assert check_registered(model) == [b + ".experts" for b in blocks]
    with torch.no_grad():
        out = model(ids).logits
    assert len(calls) == len(blocks), "moekit must run the experts of every MoE block, once per forward"
    _close(out, ref)


@pytest.mark.parametrize("arch", NOT_SWITCHED)
def test_register_is_not_silent_where_the_switch_does_not_reach(arch, monkeypatch):
    if _switch_reaches(arch):
        pytest.skip(f"transformers {transformers.__version__} decorates {arch}'s experts (tested above)")
    calls = _count_fused_experts(monkeypatch)
    register()
    model = hf_tiny.build(arch, seed=3)
    model.config._experts_implementation = "moekit"  # what from_pretrained(..., experts_implementation=) sets
    with torch.no_grad():
        model(_ids(model, seed=3))
    assert not calls  # transformers ran its own experts: the config's "moekit" is not honoured ...
    blocks = _moe_blocks(model)
    with pytest.raises(NotImplementedError, match=rf"does not reach {len(blocks)} MoE block.*{blocks[0]}.*patch\(model\)"):
        check_registered(model)  # ... and check_registered says so
    patch(model)  # the path that works for them
    with torch.no_grad():
        model(_ids(model, seed=3))


def test_without_transformers_the_entry_points_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    for fn, args in ((register, ()), (patch, (object(),)), (check_registered, (object(),))):
        with pytest.raises(ImportError, match=r"pip install 'moekit\[transformers\]'"):
            fn(*args)


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


def _llama4_wrapper(seed=6):
    tc = dict(hidden_size=32, intermediate_size=16, intermediate_size_mlp=40, num_hidden_layers=2, num_local_experts=4,
              num_experts_per_tok=1, head_dim=8, vocab_size=96, num_attention_heads=4, num_key_value_heads=2)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=tc, vision_config=vc)).eval()
    hf_tiny._randomise(model, seed)
    return model, _ids(model.language_model, b=1, s=7, seed=seed)


LLAMA4_NAMES = ["language_model.model.layers.0.feed_forward", "language_model.model.layers.1.feed_forward"]


def test_llama4_multimodal_wrapper(tmp_path):
    """Llama4ForConditionalGeneration: MoE blocks live at language_model.model.layers.N.feed_forward.

    Logits come from the wrapper's text model (``model.language_model``, the module patch() changes), not
    from the wrapper's own forward, which some transformers releases break (see the next test)."""
    model, ids = _llama4_wrapper()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = model.language_model(input_ids=ids).logits
    layers = load_moe_layers(tmp_path)
    assert list(layers) == LLAMA4_NAMES
    x = torch.randn(5, 32)
    with torch.no_grad():
        _close(layers[LLAMA4_NAMES[1]](x), model.get_submodule(LLAMA4_NAMES[1])(x)[0])
    assert patch(model) == LLAMA4_NAMES
    with torch.no_grad():
        _close(model.language_model(input_ids=ids).logits, ref)


@pytest.mark.skipif(
    transformers.__version__ in LLAMA4_WRAPPER_FORWARD_BROKEN,
    reason=f"transformers {transformers.__version__}: Llama4ForConditionalGeneration.forward raises on text-only "
    "input (AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'), an upstream bug",
)
def test_llama4_multimodal_wrapper_forward():
    """The wrapper's own forward (text only) gives the same logits once patched."""
    model, ids = _llama4_wrapper()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert patch(model) == LLAMA4_NAMES
    with torch.no_grad():
        _close(model(input_ids=ids).logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_on_cuda_uses_triton_and_keeps_logits(arch):
    # the CUDA path end to end: backend "auto" resolves to the Triton routing + experts kernels
    # (T = 18: a padded token-bucket graph; T = 6: exact-T graphs, whole or route -> experts, also for the
    # graph-safe routing functions; each run twice: capture, then replay)
    model = hf_tiny.build(arch).to("cuda")
    ids = _ids(model).to("cuda")
    with torch.no_grad():
        refs = [model(i).logits for i in (ids, ids[:, :3])]
    replaced = patch(model)
    assert replaced
    assert all(model.get_submodule(n).moe.backend == "triton" for n in replaced)
    with torch.no_grad():
        for i, ref in zip((ids, ids[:, :3]), refs):
            for _ in range(2):
                _close(model(i).logits, ref, rel=1e-4)  # fp32 kernels (ieee dot) against transformers' fp32 loop


def test_patched_layers_share_a_graph_pool_and_their_limit():
    # patch gives a model's layers one GraphPool and MODEL_GRAPH_TOKENS (2048), or the limit asked
    for asked, want in ((None, 2048), (16, 16)):
        model = hf_tiny.build("qwen3_moe").to("cuda" if torch.cuda.is_available() else "cpu")  # triton: GPU or interp
        moes = [model.get_submodule(n).moe for n in patch(model, backend="triton", eager_graph_tokens=asked)]
        assert moes and [m.eager_graph_tokens for m in moes] == [want] * len(moes)
        assert len({id(m._graphs.pool) for m in moes}) == 1


def test_experts_switch_sees_every_weight_change():
    # round 49: gpt-oss's converted stacks were cached under (w13 pointer, w13 version, down_proj version): a bias
    # edited in place, a replaced bias or down_proj (equal version counters) kept the stale copies; inference
    # tensors (a model built under inference_mode) raised on the version counter
    from moekit.integrations._experts import moekit_experts_forward

    model = hf_tiny.build("gpt_oss", seed=3)
    ex = model.model.layers[0].mlp.experts
    assert ex.is_transposed or not ex.is_concatenated  # the converted (cached) path
    g = torch.Generator().manual_seed(0)
    e, h = ex.gate_up_proj.shape[0], model.config.hidden_size
    x = torch.randn(6, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)

    def fresh():  # what the module's weights give now, without the cache
        saved, ex._moekit_converted = ex._moekit_converted, None
        try:
            return moekit_experts_forward(ex, x, ids, w)
        finally:
            ex._moekit_converted = saved

    with torch.no_grad():
        edits = (lambda: ex.gate_up_proj_bias.add_(1.0),
                 lambda: setattr(ex, "down_proj_bias", torch.nn.Parameter(ex.down_proj_bias + 5.0)),
                 lambda: setattr(ex, "down_proj", torch.nn.Parameter(torch.randn_like(ex.down_proj))))
        for edit in edits:
            before = moekit_experts_forward(ex, x, ids, w)
            edit()
            after = moekit_experts_forward(ex, x, ids, w)
            assert not torch.equal(before, after) and torch.equal(after, fresh())
    with torch.inference_mode():
        model = hf_tiny.build("gpt_oss", seed=3)
        ex = model.model.layers[0].mlp.experts
        assert moekit_experts_forward(ex, x, ids, w).shape == x.shape
