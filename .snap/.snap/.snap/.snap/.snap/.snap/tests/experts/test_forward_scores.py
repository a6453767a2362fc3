"""``MoERunner.forward_with_scores``: the forward's output and the routing weights it used, from one routing.

- the weights' bits travel through a graph's one output (pack / unpack: 16-bit, float32, odd widths, K = 1);
- on CPU (no graphs) and through the internal graphs (a fake CUDA graph re-runs the captured function:
  conftest.py), ``out`` is ``forward``'s and ``weights`` are ``router.select_experts(x, logits)[0]``,
  bit for bit: gate inside or logits passed, 3-D input, buckets with padding rows, shared experts, scaled and
  zero-expert routing, the empty batch;
- the scores graphs are keyed apart from the forward's, and returned tensors are not overwritten by later replays;
- patched transformers blocks that return router scores (gpt-oss, OpenAI privacy filter) return these weights.
(Real capture: tests/experts/test_graphed_gpu.py.)"""

import os
import sys

import pytest
import torch

import moekit
from moekit import runner
from moekit.loading.modules import RouterLinear, SharedMLP
from moekit.experts.graphed_plan import pack_scores, unpack_scores

H, E, K = 32, 8, 2


def _layer(zero: int = 0, **kw):
    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine (tests/conftest.py): CPU layers on the Triton
        pytest.skip("CPU layers on the Triton backend need the interpreter")  # backend need the interpreter
    kw.setdefault("gate", RouterLinear(H, E + zero, backend="triton"))
    if zero:  # LongCat's zero experts: Z = len(bias) - E
        kw.update(zero_expert_type="identity", e_score_correction_bias=torch.zeros(E + zero), scoring_func="sigmoid")
    layer = moekit.FusedMoE(E, kw.pop("top_k", K), H, 16, params_dtype=torch.float32, device="cpu",
                            backend="triton", **kw)
    re = layer.routed_experts
    g = torch.Generator().manual_seed(0)
    layer.load_expert_weights(torch.randn(re.w13_weight.shape, generator=g) * 0.1,
                              torch.randn(re.w2_weight.shape, generator=g) * 0.1)
    return layer.eval()


def _want(layer, x, logits=None):
    """(forward's output, select_experts' weights) of the same inputs, computed apart."""
    h = x.reshape(-1, x.shape[-1])
    lg = layer.gate(h) if logits is None else logits
    return layer(x, logits), layer.router.select_experts(h, lg)[0]


@pytest.mark.parametrize("dtype, width, k", [
    (torch.bfloat16, 32, 2),   # 2K 16-bit columns per float32 weight
    (torch.float16, 33, 1),    # odd width, K = 1
    (torch.float32, 7, 8),     # float32: K columns as they are
    (torch.float64, 5, 3),     # float64: the weights as values (exact)
])
def test_pack_unpack_round_trip(dtype, width, k):
    g = torch.Generator().manual_seed(1)
    routed = torch.randn(6, width, generator=g).to(dtype)
    w = torch.rand(6, k, generator=g)
    w[0, 0] = float("nan")  # any bits travel, NaN included
    packed = pack_scores(routed, w)
    r2, w2 = unpack_scores(packed, k)
    assert r2.is_contiguous() and w2.is_contiguous() and w2.dtype == torch.float32
    assert torch.equal(r2, routed) and torch.equal(w2.view(torch.int32), w.view(torch.int32))
    r3, w3 = unpack_scores(pack_scores(routed, w.to(torch.bfloat16)), k)  # weights in another dtype: as float32
    assert torch.equal(w3[1:], w[1:].to(torch.bfloat16).float())
    packed.zero_()  # fresh tensors: the static output may be overwritten
    assert torch.equal(r2, routed)


@pytest.mark.parametrize("kw", [
    {},                                                   # softmax, renormalised
    dict(scoring_func="sigmoid", routed_scaling_factor=2.5, renormalize=False),  # scaled output, unscaled weights
    dict(shared_experts=SharedMLP(H, 16)),                # the tail adds the shared experts
    dict(zero=2),                                         # LongCat's zero experts: their slots masked
    dict(top_k=E),                                        # K = E
], ids=["softmax", "sigmoid_scaled", "shared", "zero_experts", "k_eq_e"])
def test_cpu_same_as_forward_and_select_experts(kw):
    layer = _layer(**kw)
    with torch.no_grad():
        for shape in ((5, H), (2, 3, H), (1, H), (0, H)):
            x = torch.randn(*shape)
            out, w = layer.forward_with_scores(x)
            ref, wref = _want(layer, x)
            assert out.shape == x.shape and torch.equal(out, ref) and torch.equal(w, wref), shape
            lg = torch.randn(x.reshape(-1, H).shape[0], E + kw.get("zero", 0))
            out, w = layer.forward_with_scores(x, lg)  # logits passed
            ref, wref = _want(layer, x, lg)
            assert torch.equal(out, ref) and torch.equal(w, wref), shape


def test_graphs_gate_inside_buckets_and_fresh_outputs(fake_graphs):
    layer = _layer(eager_graph_tokens=64)
    kept = []
    with torch.no_grad():
        for t in (3, 13, 16, 3, 40):
            x = torch.randn(t, H)
            out, w = layer.forward_with_scores(x)
            ref, wref = _want(layer, x)
            assert torch.equal(out, ref) and torch.equal(w, wref), t
            kept.append((out, w, ref, wref))
    keys = list(layer._graphs._entries)
    scores = [key[0] for key in keys if key[-1] == "scores"]
    assert scores == [3, 16, 40]  # one scores graph per bucket
    # _want's forward calls made the forward's own graphs (whole at T = 3, buckets): keyed apart
    assert len(keys) == 6 and fake_graphs.replays >= 4
    assert all(torch.equal(a, c) and torch.equal(b, d) for a, b, c, d in kept)  # not overwritten
    before = fake_graphs.replays
    with torch.no_grad():
        x = torch.randn(9, H)  # bucket 16: replayed, nothing captured
        out, w = layer.forward_with_scores(x)
    assert fake_graphs.replays == before + 1 and len(layer._graphs) == 6
    ref, wref = _want(layer, x)
    assert torch.equal(out, ref) and torch.equal(w, wref)


def test_graphs_with_logits_and_shared_experts(fake_graphs):
    layer = _layer(gate=torch.nn.Linear(H, E, bias=False), shared_experts=SharedMLP(H, 16))  # gate not invariant
    with torch.no_grad():
        for t in (2, 5, 2):
            x = torch.randn(1, t, H)
            out, w = layer.forward_with_scores(x)  # the gate runs eagerly, route -> experts from the graph
            ref, wref = _want(layer, x)
            assert out.shape == x.shape and torch.equal(out, ref) and torch.equal(w, wref), t
    assert sum(key[-1] == "scores" for key in layer._graphs._entries) == 2  # T = 2 and 5
    with torch.enable_grad():  # autograd wanted: plain path, same answer
        x = torch.randn(4, H, requires_grad=True)
        out, w = layer.forward_with_scores(x)
        ref, wref = _want(layer, x)
        assert torch.equal(out, ref) and torch.equal(w, wref)


@pytest.mark.parametrize("logits", [False, True], ids=["gate_inside", "logits_passed"])
def test_direct_replays_of_a_checked_key_skip_the_checks(fake_graphs, monkeypatch, logits):
    """A later call of an input key (shape, dtype, device of x, and of the logits when passed) whose checked call
    a scores graph served goes straight to that graph: no checks, the same bits, fresh tensors. The forward's
    direct keys are tagged apart (a forward call of the same key never gets the packed output); new weights
    and autograd take the checked path again."""
    layer = _layer(eager_graph_tokens=64)
    checks = []
    real = runner.check_hidden
    monkeypatch.setattr(runner, "check_hidden",
                        lambda lay, h, *a: (lay is layer and checks.append(tuple(h.shape)), real(lay, h, *a)))
    kept = []
    with torch.no_grad():
        for lead in [(13,), (13,), (13,), (2, 13), (2, 13)]:  # bucket 16, 2-D and 3-D keys
            x = torch.randn(*lead, H)
            lg = torch.randn(x.numel() // H, E) if logits else None
            kept.append((x, lg) + layer.forward_with_scores(x, lg))
        assert checks == [(13, H), (2, 13, H)]  # the first call of each key only
        assert fake_graphs.replays == 3
        for x, lg, out, w in kept:  # the same bits as the checked calls, not overwritten by later replays
            ref, wref = _want(layer, x, lg)
            assert torch.equal(out, ref) and torch.equal(w, wref)
        tags = sorted(str(key[-1]) for key in layer._graphs._direct)
        assert tags == ["None", "None", "scores", "scores"]  # one key per input shape, each function's own
        x = torch.randn(13, H)  # a forward call of a scores key: the forward's output, not the packed one
        lg = torch.randn(13, E) if logits else None
        assert torch.equal(layer(x, lg), _want(layer, x, lg)[0])
        re = layer.routed_experts  # new weights: the state differs, the graphs go, the checked path again
        re.adopt_weights(torch.randn_like(re.w13_weight) * 0.1, torch.randn_like(re.w2_weight) * 0.1)
        before = len(checks)
        out, w = layer.forward_with_scores(x, lg)
        ref, wref = _want(layer, x, lg)
        assert len(checks) == before + 2 and torch.equal(out, ref) and torch.equal(w, wref)
    with torch.enable_grad():  # autograd wanted: checked, eager
        x = torch.randn(13, H, requires_grad=True)
        before = len(checks)
        out, w = layer.forward_with_scores(x, lg)
        assert len(checks) == before + 1 and torch.equal(w, layer.router.select_experts(
            x, layer.gate(x) if lg is None else lg)[0])


@pytest.mark.parametrize("arch", ["gpt_oss", "openai_privacy_filter"])
def test_patched_blocks_return_the_forwards_weights(arch):
    """The adapter's router scores are the weights the layer routed with (/ K for the privacy filter), and close
    to what the transformers block returned."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integrations"))
    import hf_tiny
    import hf_tiny_archs
    from moekit.integrations.transformers import MoEBlockAdapter, patch

    if arch in hf_tiny_archs.TINY:
        why = hf_tiny_archs.missing(arch)
        if why:
            pytest.skip(why)
        model = hf_tiny_archs.build(arch)
    else:
        model = hf_tiny.build(arch, seed=0)
    blocks = {n: m for n, m in model.named_modules() if n.endswith("mlp") and hasattr(m, "experts")}
    name, block = next(iter(blocks.items()))
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_out, ref_scores = block(x)
    patch(model)
    adapter = model.get_submodule(name)
    assert isinstance(adapter, MoEBlockAdapter)
    with torch.no_grad():
        out, scores = adapter(x)
        moe, h = adapter.moe, x.reshape(-1, x.shape[-1])
        want = moe.router.select_experts(h, moe.gate(h))[0]
        if arch == "openai_privacy_filter":
            want = want / want.shape[-1]
    assert out.shape == x.shape and torch.equal(out, moe(h).reshape(x.shape))
    assert torch.equal(scores, want.to(x.dtype))
    torch.testing.assert_close(scores, ref_scores.reshape(scores.shape).to(scores.dtype), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref_out.reshape(out.shape), rtol=1e-4, atol=1e-5)
