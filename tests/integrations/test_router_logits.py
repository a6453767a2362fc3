"""transformers' ``output_router_logits`` (and ``aux_loss``) on patched models (round 59,
:mod:`moekit.integrations._record`).

Every tiny architecture: the patched model records as many tensors as the original, each equal to the original's
(fp32), the same aux loss, and the output is the same with and without recording (bit for bit). Training with the
load-balancing loss (its coefficient raised to 1 so that a missing term shows): the loss and every gradient against
transformers' own model. The switch: config or kwargs, the inner model, off again after a recording forward that
raised; transformers' hooks installed after patch() (found by class and path) and before it (copied); the refusals.
Skipped without transformers.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
import hf_tiny13  # noqa: E402
import hf_tiny_archs  # noqa: E402

from moekit.integrations._record import make_record  # noqa: E402
from moekit.integrations.transformers import MoEBlockAdapter, patch, unpatch  # noqa: E402

ARCHS = ([("tiny", a) for a in hf_tiny.TINY] + [("archs", a) for a in hf_tiny_archs.TINY]
         + [("t13", a) for a in hf_tiny13.TINY13])


def _build(src, arch, **over):
    if src == "archs" and hf_tiny_archs.missing(arch):
        pytest.skip(hf_tiny_archs.missing(arch))
    if src == "t13":
        cfg_type, cls_name, base = hf_tiny13.TINY13[arch]
        saved = hf_tiny13.TINY13[arch]
        hf_tiny13.TINY13[arch] = (cfg_type, cls_name, dict(base, **over))
        try:
            model = hf_tiny13.build(arch)
        finally:
            hf_tiny13.TINY13[arch] = saved
        if model is None:
            pytest.skip(f"transformers {transformers.__version__} has no {cfg_type}")
        return model
    return (hf_tiny if src == "tiny" else hf_tiny_archs).build(arch, **over)


def _ids(b=2, s=7, seed=0):
    return torch.randint(3, 96, (b, s), generator=torch.Generator().manual_seed(seed))


def _main(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _records(o):
    return tuple(getattr(o, "router_logits", None) or ())


def _skip_if_none_recorded(ref, arch: str) -> None:
    """Skip (after the patched model was found to record as many: none) where the installed transformers' own model
    records no router logits for ``arch`` (5.17, the device's, for Llama 4, Gemma 4 and Inkling; 5.25 records them)."""
    if not _records(ref):
        pytest.skip(f"transformers {transformers.__version__} records no router logits for {arch} (nor does the "
                    "patched model)")


def _records_of(model):
    return [m.record for m in model.modules() if isinstance(m, MoEBlockAdapter) and m.record is not None]


def _step_both(model, ref_model, ids):
    """A training step with labels and router logits on the patched ``model`` and the reference: (out, ref), their
    losses backpropagated."""
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    ref = ref_model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    ref.loss.backward()
    return out, ref


def _by_transformers_names(model):
    """The patched model's parameters under transformers' names: its own, and the kept replaced blocks' (shared with
    the moekit layers, except converted stacks), also a layer-level MoE's members (Gemma 4)."""
    mine = dict(model.named_parameters())
    for n, m in model.named_modules():
        original = m.__dict__.get("_moekit_original")
        if isinstance(original, torch.nn.Module):
            mine.update({f"{n}.{k}": p for k, p in original.named_parameters()})
        elif isinstance(original, dict):
            layer = n.rpartition(".")[0]
            for member, mod in original.items():
                mine.update({f"{layer}.{member}.{k}": p for k, p in mod.named_parameters()})
    return mine


@pytest.mark.parametrize("src, arch", ARCHS, ids=[a for _, a in ARCHS])
def test_recorded_like_transformers(src, arch):
    model = _build(src, arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)  # (transformers' hooks installed before patch())
    patch(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
        plain = model(input_ids=ids)
    want = _records(ref)
    assert len(_records(out)) == len(want)
    for a, b in zip(_records(out), want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    r = _main(ref)
    torch.testing.assert_close(_main(out), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
    assert torch.equal(_main(plain), _main(out))  # recording changes nothing in the output
    assert not _records(plain)


@pytest.mark.parametrize("src, arch", [
    ("tiny", "mixtral"),  # output [0] of MixtralTopKRouter
    ("tiny", "llama4_text"),  # output [1] of Llama4Router (its router returns (scores, logits))
    ("archs", "minimax"),  # OutputRecorder(layer_name="mlp.gate"): the record sits at mlp.gate
    ("tiny", "deepseek_v4"),  # hash-routed layers: transformers records none of them, nor does moekit
    ("archs", "jetmoe"),  # output [4]; its attention's gating records too (not patched), in layer order
    ("t13", "gemma4"),  # a layer-level MoE (LayerMoEAdapter); its router records softmax probabilities
    ("t13", "inkling"),  # the appended shared expert's logit column is not recorded
])
def test_hooks_installed_after_patch(src, arch):
    # a model patched before its first recording forward: transformers' installer finds the records by class
    model = _build(src, arch)
    ref_model = copy.deepcopy(model)
    ids = _ids(seed=1)
    patch(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
        ref = ref_model(input_ids=ids, output_router_logits=True)
    assert len(_records(out)) == len(_records(ref))
    for a, b in zip(_records(out), _records(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _skip_if_none_recorded(ref, arch)


@pytest.mark.parametrize("src, arch", [("tiny", "mixtral"), ("tiny", "qwen2_moe"), ("tiny", "qwen3_moe"),
                                       ("tiny", "gpt_oss"), ("tiny", "olmoe")])
def test_training_with_the_aux_loss(src, arch):
    # loss = LM loss + 1.0 * aux loss; every gradient (router weights included: the aux loss reaches them through
    # the recorded logits) against transformers' own model with its eager experts
    model = _build(src, arch, router_aux_loss_coef=1.0)
    ref_model = copy.deepcopy(model)
    model.train(), ref_model.train()
    ids = _ids(seed=2)
    names = patch(model, restorable=True)  # (the replaced blocks kept: their tensors are the ones the layers use)
    out, ref = _step_both(model, ref_model, ids)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    assert ref.aux_loss.item() > 0.5  # (the term is large enough for its gradients to show)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    used = {id(p) for p in model.parameters()}
    mine = _by_transformers_names(model)
    checked = []
    for name, p in ref_model.named_parameters():
        q = mine[name]
        if id(q) not in used:  # a converted expert stack (gpt-oss): the moekit copy trains (tests/test_training.py)
            continue
        assert (q.grad is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item() + 1e-7,
                                       msg=name)
            checked.append(name)
    routers = [n for n in checked if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]
    assert len(routers) == len(names)


def test_switch_follows_each_forward():
    # the records follow transformers' own collector: the call's kwargs, else the config, the inner model's own
    model = hf_tiny.build("mixtral")
    ids = _ids()
    patch(model)
    assert len(_records_of(model)) == 2
    with torch.no_grad():
        assert len(_records(model(input_ids=ids, output_router_logits=True))) == 2
        assert not _records(model(input_ids=ids))
        model.config.output_router_logits = True  # the config asks
        assert len(_records(model(input_ids=ids))) == 2
        assert not _records(model(input_ids=ids, output_router_logits=False))  # the call's kwargs win
        assert len(_records(model.model(input_ids=ids))) == 2  # the inner model reads its own config
        model.config.output_router_logits = False
        # a recording forward that raised: the next forward records nothing
        norm = model.model.norm
        norm.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            model(input_ids=ids, output_router_logits=True)
        del norm.forward
        assert not _records(model(input_ids=ids))
        # a block called outside a model forward records nothing (no collector): its output is the plain one's
        block, x = model.model.layers[0].mlp, torch.randn(1, 3, 32)
        assert torch.equal(block(x), block.moe(x.reshape(3, 32)).reshape(1, 3, 32))


def test_threads_record_their_own_forwards():
    # two threads share one patched model: A records, B (running while A is between its layers) does not; A's record
    # is complete (the switch is transformers' collector, a ContextVar: per thread)
    import threading

    model = hf_tiny.build("mixtral")
    with torch.no_grad():
        ref = model(input_ids=_ids(), output_router_logits=True)
    patch(model)
    at_layer0, b_done, res = threading.Event(), threading.Event(), {}

    def pause(mod, args, out):
        if threading.current_thread().name == "A":
            at_layer0.set()
            b_done.wait(10)

    handle = model.model.layers[0].register_forward_hook(pause)

    def a():
        with torch.no_grad():
            res["A"] = model(input_ids=_ids(), output_router_logits=True)

    def b():
        at_layer0.wait(10)
        with torch.no_grad():
            res["B"] = model(input_ids=_ids(seed=1))
        b_done.set()

    threads = [threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handle.remove()
    assert not _records(res["B"]) and len(_records(res["A"])) == 2
    torch.testing.assert_close(res["A"].aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src, arch", [("tiny", "mixtral"), ("t13", "gemma4")])
def test_unpatch_and_patch_again_after_recording_while_patched(src, arch):
    # transformers installs its capture hooks once per model: first on the records (a recording forward while
    # patched); unpatch() carries them back to the routers, a second patch() onto the new records
    ref_model = _build(src, arch)
    model = copy.deepcopy(ref_model)
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, output_router_logits=True)
        for step in ("patched", "unpatched", "patched again"):
            if step != "unpatched":
                patch(model, restorable=True)
            else:
                unpatch(model)
            out = model(input_ids=ids, output_router_logits=True)
            assert len(_records(out)) == len(_records(ref)), step
            for a, b in zip(_records(out), _records(ref)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=step)
    _skip_if_none_recorded(ref, arch)


def test_blocks_not_where_the_config_says():
    # a model whose MoE blocks are not all where the config says: RuntimeError before anything changes
    model = hf_tiny.build("mixtral")
    layer = model.model.layers[1]
    layer.moved = layer.mlp
    del layer.mlp
    with pytest.raises(RuntimeError, match="patch found 1 MoE blocks but the config describes 2"):
        patch(model)
    assert not any(isinstance(m, MoEBlockAdapter) for m in model.modules())


def test_record_is_not_a_router():
    # the record stands where transformers' router was (mlp.gate); called like a router it says what it is
    model = hf_tiny.build("mixtral")
    patch(model)
    rec = model.model.layers[0].mlp.gate
    assert isinstance(rec, transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter)
    assert not list(rec.parameters()) and not list(rec.buffers())
    with pytest.warns(UserWarning, match="unpatch"):
        keys = list(model.state_dict())
    assert not any(".mlp.gate" in k for k in keys)  # no state_dict keys of its own
    with pytest.raises(ValueError, match=r"router_logits \[T, 4\].*compute_router_logits"):
        rec(torch.randn(3, 32))
    twin = pickle.loads(pickle.dumps(model))  # the run-time class pickles (rebuilt from the router's class)
    ids = _ids()
    with torch.no_grad():
        a, b = model(input_ids=ids, output_router_logits=True), twin(input_ids=ids, output_router_logits=True)
    assert all(torch.equal(x, y) for x, y in zip(_records(a), _records(b), strict=True))


def test_refusals():
    # a hand-built adapter has no record: a recording forward refuses (before: patch() refused any such config)
    model = hf_tiny.build("mixtral")
    names = patch(model)
    first = model.get_submodule(names[0])
    model.model.layers[0].mlp = MoEBlockAdapter(first.moe, first.plan)
    with pytest.raises(NotImplementedError, match="output_router_logits.*built without a record"):
        model(input_ids=_ids(), output_router_logits=True)
    with torch.no_grad():
        model(input_ids=_ids())  # a forward that does not record runs
    # a block holding two routers of the recorded class: one record cannot stand for both
    model = hf_tiny.build("mixtral")
    block = model.model.layers[0].mlp
    block.second = copy.deepcopy(block.gate)
    name, why = make_record(model, "model.layers.0.mlp", block, 4)
    assert name is None and "2 MixtralTopKRouter" in why
    # patch() refuses such a model when its config asks for router logits, before changing anything
    model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="2 MixtralTopKRouter"):
        patch(model)
    assert not any(isinstance(m, MoEBlockAdapter) for m in model.modules())


def test_unpatch_records_through_transformers_again():
    model = hf_tiny.build("qwen3_moe")
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
    patch(model)
    unpatch(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(_records(out), _records(ref), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_gpu_training_through_the_triton_layers(arch):
    # on a GPU the patched layers run the Triton backend (gate, routing, experts): the loss with the aux term and
    # every gradient against transformers' model on the same GPU (fp32; round 59: the Triton gate gave no gradient)
    model = hf_tiny.build(arch, router_aux_loss_coef=1.0).cuda().train()
    ref_model = copy.deepcopy(model)
    ids = _ids(seed=3).cuda()
    names = patch(model, restorable=True)
    assert model.get_submodule(names[0]).moe.backend == "triton"
    out, ref = _step_both(model, ref_model, ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    mine = _by_transformers_names(model)
    routers = 0
    for name, p in ref_model.named_parameters():
        if p.grad is None:
            continue
        q = mine[name]
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=2e-3, atol=2e-3 * p.grad.abs().max().item() + 1e-6, msg=name)
        routers += name.endswith("mlp.gate.weight")
    assert routers == len(names)


@pytest.mark.parametrize("src, arch", [("tiny", "mixtral"), ("t13", "gemma4")])
def test_gradient_checkpointing_with_the_aux_loss(src, arch):
    # transformers' gradient checkpointing recomputes each decoder layer in the backward, where its collector is not
    # set: the patched block builds the same autograd graph either way (Gemma 4's record, a softmax, too), so the
    # recomputation matches and the loss and gradients are transformers' (round 59's review: CheckpointError)
    model = _build(src, arch, router_aux_loss_coef=1.0)
    ref_model = copy.deepcopy(model)
    ids = _ids(seed=4)
    patch(model, restorable=True)
    for m in (model, ref_model):
        m.train()
        m.gradient_checkpointing_enable()
    out, ref = _step_both(model, ref_model, ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    mine = _by_transformers_names(model)
    compared = 0
    for name, p in ref_model.named_parameters():
        q = mine.get(name)
        if p.grad is None or q is None or q.grad is None:
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item() + 1e-7, msg=name)
        compared += 1
    assert compared >= len(list(ref_model.parameters())) // 2


def test_layers_compiled_one_by_one():
    # decoder layers compiled each on its own (fullgraph) run inside an eager model forward: the patched blocks do
    # not read transformers' collector there (dynamo cannot trace a ContextVar), a forward without recording runs
    model = hf_tiny.build("mixtral")
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids)
    patch(model, backend="torch")
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer.compile(fullgraph=True, backend="eager")
    with torch.no_grad():
        out = model(input_ids=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5 * ref.logits.abs().max().item())
    torch._dynamo.reset()


def test_a_block_on_the_meta_device_changes_nothing():
    # patch() checks every block's tensors before it replaces any (before: the blocks before it stayed patched)
    model = hf_tiny.build("mixtral")
    model.model.layers[1].mlp.to_empty(device="meta")
    with pytest.raises(ValueError, match="meta device"):
        patch(model)
    assert not any(isinstance(m, MoEBlockAdapter) for m in model.modules())
