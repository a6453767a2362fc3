"""unpatch(model): the inverse of patch() on tiny random transformers models (fp32, eager experts = the reference).

After patch() + unpatch() the model holds its original module objects again (same modules, parameters, hooks) and
computes exactly what it computed before (torch.equal); unpatch returns the paths patch returned; the
output_router_logits pre-hooks are gone; patch() works again afterwards. Skipped without transformers.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
from test_arch_audit_fixes import _build, _out  # noqa: E402
from test_transformers_models import _llama4_wrapper  # noqa: E402

from moekit.integrations import _restore  # noqa: E402
from moekit.integrations.transformers import MoEBlockAdapter, patch, unpatch  # noqa: E402

GUARD = "_moekit_router_logits_guard"

#: (builder, model type): one case per code path of patch()
CASES = [
    ("tiny", "qwen3_moe"),  # shared expert + gate, stacks shared in moekit's layout
    ("tiny", "mixtral"),  # the plain block: router + fused stacks, all shared
    ("tiny", "deepseek_v3"),  # grouped routing with a selection-bias buffer (wrapped as a moekit parameter)
    ("tiny", "gpt_oss"),  # transposed interleaved stacks (converted copies) and the (hidden, scores) output
    ("tiny", "llama4_text"),  # transposed stacks and the (hidden [T, H], router_logits) output
    ("tiny", "longcat_flash"),  # zero experts: the first E rows of an [E + Z] stack
    ("tiny", "deepseek_v4"),  # hash routing from input_ids
    ("archs", "dbrx"),  # flat [E * I, H] stacks split into copies
    ("archs", "openai_privacy_filter"),  # token classification, router scores divided by K
    ("archs", "jetmoe"),  # expert stacks on the block itself (no experts module)
    ("t13", "inkling"),  # shared experts appended to the routed stacks (a copy)
    ("t13", "gemma4"),  # layer-level MoE: the decoder layer's router / experts / norms swapped, the layer stays
]


def _ids(model, seed=0):
    vocab = getattr(model.config, "vocab_size", None) or model.config.get_text_config().vocab_size
    return torch.randint(3, min(vocab, 96), (2, 7), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, **kw):
    with torch.no_grad():
        return _out(model(input_ids=ids, **kw))


def _snapshot(model):
    """Everything patch() may touch: the module objects by path, the parameters and buffers (objects), the forward
    (pre-)hooks of every module and moekit's attributes."""
    mods = dict(model.named_modules())
    return dict(
        modules={n: id(m) for n, m in mods.items()},
        params={n: id(p) for n, p in model.named_parameters()},
        buffers={n: id(b) for n, b in model.named_buffers()},
        hooks={n: (list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in mods.items()},
        moekit={n: sorted(k for k in vars(m) if k.startswith("_moekit")) for n, m in mods.items()},
        training={n: m.training for n, m in mods.items()},
    )


@pytest.mark.parametrize("src, arch", CASES)
def test_unpatch_restores_exactly(src, arch, monkeypatch):
    # every family: the original modules come back and the output is bit for bit the unpatched one's
    model = _build(src, arch, monkeypatch)
    ids = _ids(model)
    ref, before = _run(model, ids), _snapshot(model)
    names = patch(model, restorable=True)
    assert names and all(n in before["modules"] for n in names)
    assert unpatch(model) == names
    assert _snapshot(model) == before
    assert not any(isinstance(m, MoEBlockAdapter) for m in model.modules())
    assert torch.equal(_run(model, ids), ref)
    # patch again after unpatch: the same blocks, the patched output again; and back once more
    assert patch(model, restorable=True) == names
    torch.testing.assert_close(_run(model, ids), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert unpatch(model) == names and unpatch(model) == []  # a second unpatch finds nothing to restore
    assert _snapshot(model) == before and torch.equal(_run(model, ids), ref)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_output_router_logits_works_again(arch):
    # patched, the moekit layers record them; unpatched, the pre-hooks patch() installed (switching the records) are
    # removed and transformers' routers record them again
    model = hf_tiny.build(arch)
    ids = _ids(model)
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
    # (transformers 5.17, the device's: DeepSeek-V3's output has no router_logits field; 5.25 records them. The
    # guard's refusal and its removal are checked either way, the recorded logits where the family returns them)
    records = hasattr(ref, "router_logits")
    assert ref.router_logits if records else arch == "deepseek_v3"
    patch(model)
    assert patch(model) == []  # double patch: one guard per model, no second adapter
    with torch.no_grad():
        mid = model(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(mid.logits, ref.logits, rtol=1e-5, atol=1e-5 * ref.logits.abs().max().item())
    if records:
        for a, b in zip(mid.router_logits, ref.router_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unpatch(model)
    assert not any(GUARD in vars(m) for m in model.modules())
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    if records:
        assert all(torch.equal(a, b) for a, b in zip(out.router_logits, ref.router_logits, strict=True))
    model.config.output_router_logits = True  # switched on in the config: no hook refuses it either
    assert torch.equal(_run(model, ids), ref.logits)


def test_never_patched_model():
    # a model never patched (and a plain torch module) is left as it is: []
    model = hf_tiny.build("mixtral")
    before = _snapshot(model)
    assert unpatch(model) == [] and _snapshot(model) == before
    assert unpatch(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("bad", [None, "model", torch.zeros(2), [torch.nn.Linear(2, 2)]])
def test_not_a_module(bad):
    # anything but a torch.nn.Module: TypeError naming the argument
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unpatch(bad)


def test_llama4_wrapper_all_guards_removed():
    # a multimodal wrapper: blocks at language_model.model.layers.N, a guard on each transformers model inside
    model, ids = _llama4_wrapper()
    ref, before = _run(model.language_model, ids), _snapshot(model)
    names = patch(model, restorable=True)
    assert sum(GUARD in vars(m) for m in model.modules()) >= 3  # the wrapper, language_model, its .model, ...
    assert unpatch(model) == names
    assert _snapshot(model) == before and torch.equal(_run(model.language_model, ids), ref)


def test_submodel_patched_unpatched_from_container():
    # patch() on the inner transformers model, unpatch() on the model holding it: paths relative to the argument
    model = hf_tiny.build("qwen3_moe")
    ids = _ids(model)
    ref, before = _run(model, ids), _snapshot(model)
    names = patch(model.model)
    assert names and not names[0].startswith("model.")
    assert unpatch(model) == ["model." + n for n in names]
    assert _snapshot(model) == before and torch.equal(_run(model, ids), ref)


@pytest.mark.parametrize("src, arch", [("tiny", "mixtral"), ("t13", "gemma4")])
def test_mode_changed_while_patched(src, arch, monkeypatch):
    # model.train() while patched: the restored blocks take the model's mode, not the one they had at patch time
    model = _build(src, arch, monkeypatch)
    names = patch(model)
    model.train()
    unpatch(model)
    assert all(m.training for n in names for m in model.get_submodule(n).modules())


def test_deepcopy_of_patched_model():
    # a deep copy of a patched model unpatches on its own (its kept blocks and hook handles are the copy's)
    model = hf_tiny.build("gpt_oss")
    ids = _ids(model)
    ref = _run(model, ids)
    names = patch(model, restorable=True)
    twin = copy.deepcopy(model)
    assert unpatch(twin) == names and torch.equal(_run(twin, ids), ref)
    assert not any(GUARD in vars(m) for m in twin.modules())
    assert all(isinstance(model.get_submodule(n), MoEBlockAdapter) for n in names)  # the original stays patched
    with torch.no_grad():  # its router-logit records are its own (the copy's pre-hooks switch the copy's records)
        rec, ref_rec = model(input_ids=ids, output_router_logits=True), twin(input_ids=ids, output_router_logits=True)
    assert len(rec.router_logits) == len(ref_rec.router_logits) == len(names)
    for a, b in zip(rec.router_logits, ref_rec.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hand_built_adapter_stays():
    # an adapter patch() did not install (no original kept) stays, and so does the guard of the model holding it
    model = hf_tiny.build("mixtral")
    ids = _ids(model)
    names = patch(model)
    first = model.get_submodule(names[0])
    model.get_submodule(names[0].rpartition(".")[0]).mlp = MoEBlockAdapter(first.moe, first.plan)
    assert unpatch(model) == names[1:]
    assert isinstance(model.get_submodule(names[0]), MoEBlockAdapter)
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        _run(model, ids, output_router_logits=True)


@pytest.mark.parametrize("src, arch, free", [
    ("tiny", "mixtral", True),  # stacks shared with the moekit layer: kept without asking (no memory cost)
    ("tiny", "qwen3_moe", True),  # shared experts and gate shared too
    ("tiny", "gpt_oss", False),  # converted copies: the originals are dropped unless restorable=True
    ("tiny", "llama4_text", False),  # transposed stacks: likewise
    ("archs", "dbrx", False),  # flat stacks split into copies: likewise
])
def test_restorable_only_where_asked_or_free(src, arch, free, monkeypatch):
    # patch() keeps an original only where it costs nothing, or with restorable=True; otherwise unpatch() refuses the
    # model before changing anything (all or nothing). The tiny models' stacks are far below the 1 MiB a kept block
    # may cost: the allowance is 0 here (the 1 % rule stays)
    monkeypatch.setattr(_restore, "FREE_BYTES", 0)
    model = _build(src, arch, monkeypatch)
    ids = _ids(model)
    ref = _run(model, ids)
    names = patch(model)
    if free:
        assert unpatch(model) == names and torch.equal(_run(model, ids), ref)
        return
    patched = _snapshot(model)
    with pytest.raises(ValueError, match="restorable=True") as err:
        unpatch(model)
    assert names[0] in str(err.value) and "KiB)" in str(err.value)
    assert _snapshot(model) == patched  # nothing put back, the guards stay
    with pytest.raises(TypeError, match="restorable must be a bool, got 'yes'"):
        patch(model, restorable="yes")  # checked before anything, on a model patched already too


@pytest.mark.parametrize("arch", ["deepseek_v3", "longcat_flash"])
def test_small_converted_tensors_stay_free(arch):
    # a bf16 model: the layer widens the bf16 selection bias to float32 (a copy of a few bytes); the block is still
    # kept without restorable=True (round 50 review: such a block was dropped and unpatch refused the model)
    model = hf_tiny.build(arch).to(torch.bfloat16)
    ids = _ids(model)
    ref = _run(model, ids)
    names = patch(model)
    assert unpatch(model) == names and torch.equal(_run(model, ids), ref)


def test_weights_replaced_after_patch_refused():
    # the layer's weights replaced after patch (load_state_dict(assign=True)): the kept blocks hold the old tensors, so
    # unpatch refuses before changing anything instead of bringing the old weights back
    model = hf_tiny.build("mixtral")
    names = patch(model)
    with pytest.warns(UserWarning, match="unpatch"):
        state = model.state_dict()
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    patched = _snapshot(model)
    with pytest.raises(ValueError, match="no longer share") as err:
        unpatch(model)
    assert names[0] in str(err.value) and _snapshot(model) == patched


def test_unpatch_of_the_inner_model_frees_the_outer_hook():
    # patch(model), then unpatch(model.model): the outer model's pre-hook stays (unpatch cannot reach it) but no
    # longer refuses output_router_logits, as nothing below it is patched (round 50 review)
    model = hf_tiny.build("mixtral")
    ids = _ids(model)
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
    names = patch(model)
    assert unpatch(model.model) == [n.removeprefix("model.") for n in names]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits) and len(out.router_logits) == len(ref.router_logits)


@pytest.mark.parametrize("src, arch", [("tiny", "mixtral"), ("t13", "gemma4")])
def test_state_dict_of_a_patched_model_warns(src, arch, monkeypatch):
    # round 52's audit: save_pretrained of a patched model wrote moekit's keys silently, which from_pretrained then
    # reported MISSING and initialised at random: state_dict warns (a block or Gemma 4's layer-level MoE), and after
    # unpatch it is transformers' own again, without a warning
    import warnings

    model = _build(src, arch, monkeypatch)
    want = set(model.state_dict())
    patch(model)
    with pytest.warns(UserWarning, match="moekit's state_dict keys.*unpatch"):
        keys = set(model.state_dict())
    assert any(".moe." in k for k in keys) and keys != want
    unpatch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(model.state_dict()) == want


def test_register_and_check_registered_refuse_what_they_cannot_use():
    # round 52's audit: register(3) registered a non-str name; check_registered on a patched model said its blocks
    # were "not decorated ... use patch(model)"
    from moekit.integrations.transformers import check_registered, register

    with pytest.raises(TypeError, match="name must be a str"):
        register(3)
    with pytest.raises(ValueError, match="non-empty"):
        register("")
    register()
    model = hf_tiny.build("mixtral")
    patch(model)
    with pytest.raises(ValueError, match="was patched by moekit"):
        check_registered(model)


@pytest.mark.parametrize("src, arch", [("tiny", "mixtral"), ("tiny", "gpt_oss"), ("t13", "gemma4")])
def test_a_block_failing_to_build_puts_back_those_before_it(src, arch, monkeypatch):
    # all or nothing: the last block's layer fails to build (here: an injected error) after the others were replaced;
    # the model is left exactly as it was (modules, parameters, hooks, output) and patch() works afterwards
    # (before: the blocks before it stayed patched). Blocks: a plain one, converted copies, a layer-level MoE.
    import moekit.integrations.transformers as tf

    model = _build(src, arch, monkeypatch)
    ids = _ids(model)
    ref, before = _run(model, ids), _snapshot(model)
    built, real = [], tf.moekit_from_block

    def failing(module, *args):
        built.append(module)
        if len(built) == len(names_all):
            raise MemoryError("injected: no memory for the last block's layer")
        return real(module, *args)

    names_all = list(tf._planned_blocks(model, tf.plan_layers(tf._model_config_dict(model), "")[1]))
    assert len(names_all) >= 2  # (a block replaced before the failing one)
    monkeypatch.setattr(tf, "moekit_from_block", failing)
    with pytest.raises(MemoryError, match="injected"):
        patch(model)
    assert _snapshot(model) == before and torch.equal(_run(model, ids), ref)
    monkeypatch.setattr(tf, "moekit_from_block", real)
    assert len(patch(model)) == len(names_all)
    torch.testing.assert_close(_run(model, ids), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


#: the CASES whose layers hold converted copies of the expert stacks
CONVERTED = {"gpt_oss", "llama4_text", "dbrx", "openai_privacy_filter", "inkling"}


def _routed(model):
    return [m.moe.routed_experts for m in model.modules() if hasattr(m, "moe") and hasattr(m.moe, "routed_experts")]


def _stack_names(ex):
    return [n for n in ("w13_weight", "w2_weight", "w13_bias", "w2_bias") if getattr(ex, n, None) is not None]


@pytest.mark.parametrize("src, arch, converted", [(s, a, a in CONVERTED) for s, a in CASES])
def test_unpatch_carries_trained_copies_back(src, arch, converted, monkeypatch):
    # round 60: what training changed in a layer's converted copies (gpt-oss's interleaved transposed stacks and
    # biases, Llama 4's transposed, DBRX's flat splits, Inkling's appended shared experts) is written back into the
    # block's own stacks by unpatch(): patching again gives the changed weights bit for bit (before: the untrained
    # stacks came back). Shared stacks need nothing (no carry is kept for them). The "training" here: every expert
    # weight and bias changed in place, elementwise and differently per element
    from moekit.integrations._restore import CARRY

    model = _build(src, arch, monkeypatch)
    ids = _ids(model)
    ref = _run(model, ids)
    names = patch(model, restorable=True)
    assert any(CARRY in m.__dict__ for m in model.modules()) == converted
    want = []
    with torch.no_grad():
        for ex in _routed(model):
            for n in _stack_names(ex):
                t = getattr(ex, n)
                t.mul_(torch.linspace(0.5, 1.5, t.numel(), dtype=t.dtype).view_as(t)).add_(0.01)
            want.append({n: getattr(ex, n).detach().clone() for n in _stack_names(ex)})
    trained = _run(model, ids)
    assert unpatch(model) == names
    assert not any(CARRY in m.__dict__ for m in model.modules())
    after = _run(model, ids)  # transformers' own blocks, on the trained stacks
    assert not torch.equal(after, ref)
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-4 * trained.abs().max().item())
    patch(model, restorable=True)
    for ex, w in zip(_routed(model), want, strict=True):
        for n, t in w.items():
            assert torch.equal(getattr(ex, n), t), n



def test_unpatch_after_an_optimizer_step_on_gpt_oss():
    # the user's path: patch, train (autograd through the converted copies, one SGD step), unpatch, save: the state
    # dict transformers saves holds the trained experts, in its own layout
    model = hf_tiny.build("gpt_oss")
    ids = _ids(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    patch(model, restorable=True)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    copies = [{n: getattr(ex, n).detach().clone() for n in _stack_names(ex)} for ex in _routed(model)]
    unpatch(model)
    saved = model.state_dict()
    assert all(not torch.equal(saved[k], v) for k, v in before.items())  # every expert stack and bias trained
    patch(model, restorable=True)
    for ex, w in zip(_routed(model), copies, strict=True):
        assert all(torch.equal(getattr(ex, n), t) for n, t in w.items())


def test_carry_back_keeps_the_rows_the_layer_does_not_read():
    # the inverse of a conversion that reads only some rows (a transposed stack of E + Z rows of which the first E are
    # the experts: convert_stacks' slice, e.g. LongCat's zero experts in an older layout): the rows read get the
    # layer's weights (transposed back), the others keep theirs
    import dataclasses
    import types

    import moekit.integrations.transformers as tf
    from moekit.integrations._blocks import carry_back

    model = hf_tiny.build("longcat_flash")
    spec, plans = tf.plan_layers(tf._model_config_dict(model), "")
    plan, spec = plans[0], dataclasses.replace(spec, memory_layout="transposed")
    e = plan.num_experts
    _, i2, h = model.get_submodule(plan.name).experts.gate_up_proj.shape
    g = torch.Generator().manual_seed(0)
    stacks = {"experts.gate_up_proj": torch.randn(e + 2, h, i2, generator=g),
              "experts.down_proj": torch.randn(e + 2, i2 // 2, h, generator=g)}
    old = {k: v.clone() for k, v in stacks.items()}
    w13, w2 = torch.randn(e, i2, h, generator=g), torch.randn(e, h, i2 // 2, generator=g)
    carry_back(stacks, spec, plan, types.SimpleNamespace(routed_experts=types.SimpleNamespace(w13_weight=w13,
                                                                                             w2_weight=w2)))
    assert torch.equal(stacks["experts.gate_up_proj"][:e], w13.transpose(1, 2))
    assert torch.equal(stacks["experts.down_proj"][:e], w2.transpose(1, 2))
    assert all(torch.equal(stacks[k][e:], old[k][e:]) for k in stacks)


def test_quantised_weights_requires_grad_restored_by_rollback_and_unpatch():
    # (round 60 review) building a layer freezes quantised expert weights and scales, which are the block's own
    # parameters: a failed patch() and unpatch() give back their requires_grad flags
    import moekit.integrations.transformers as tf
    from test_transformers_fp8 import _model

    model, _ = _model(decoder_sparse_step=1)
    for n, p in model.named_parameters():
        if ".experts." in n and "scale" not in n:
            p.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert sum(flags.values()) > 0
    real, built = tf.moekit_from_block, []
    blocks = len(list(tf._planned_blocks(model, tf.plan_layers(tf._model_config_dict(model), "")[1])))

    def failing(module, *args):
        built.append(module)
        if len(built) == blocks:
            raise MemoryError("injected")
        return real(module, *args)

    tf.moekit_from_block = failing
    try:
        with pytest.raises(MemoryError):
            patch(model)
    finally:
        tf.moekit_from_block = real
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    patch(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)  # (frozen while patched)
    unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_untrained_copies_are_not_written_back():
    # (round 60 review) unpatch() writes converted copies back only where they changed since patch() (in place, or
    # replaced): an inference user's unpatch leaves the block's stacks untouched (no write into shared or read-only
    # storage, no time or memory spent)
    model = hf_tiny.build("gpt_oss")
    stacks = {n: p for n, p in model.named_parameters() if ".experts." in n}
    versions = {n: p._version for n, p in stacks.items()}
    ids = _ids(model)
    patch(model, restorable=True)
    _run(model, ids)
    unpatch(model)
    assert {n: p._version for n, p in stacks.items()} == versions


def test_changes_through_data_and_in_copies_are_carried_back():
    # (round 60 review) changes are found by value: an edit through .data (no version bump) and a deep copy of the
    # patched model (its version counters restart) are carried back all the same
    model = hf_tiny.build("llama4_text")
    patch(model, restorable=True)
    ex = _routed(model)[0]
    ex.w13_weight.data.add_(0.5)
    want = ex.w13_weight.detach().clone()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        unpatch(m)
        patch(m, restorable=True)
        assert torch.equal(_routed(m)[0].w13_weight, want)
