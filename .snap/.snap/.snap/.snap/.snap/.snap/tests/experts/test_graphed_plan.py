"""What a layer's internal graphs may fold (whole forward or route -> experts only), when they are dropped,
and the replay path's decisions, on CPU: a fake CUDA graph replays by re-running the captured function
on the static buffers, so key matching, skipped checks, copies and invalidation run without a GPU.
(Real capture and bit-identity: tests/experts/test_graphed_gpu.py.)"""

import pytest
import torch

import moekit
from moekit.experts import graphed, graphed_plan
from moekit import runner
from moekit.experts.graphed import GraphCache
from moekit.loading.modules import RouterLinear, SharedMLP

H, E = 32, 8
# CPU layers on the Triton backend: the interpreter (tests/conftest.py sets it on machines without CUDA); a GPU machine
# runs the real graphs in test_graphed_gpu.py
pytestmark = pytest.mark.interpreter


def _layer(**kw):
    layer = moekit.FusedMoE(E, 2, H, 16, params_dtype=torch.float32, device="cpu", backend="triton", **kw)
    re = layer.routed_experts
    layer.load_expert_weights(torch.randn_like(re.w13_weight) * 0.1, torch.randn_like(re.w2_weight) * 0.1)
    return layer.eval()


class UserShared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(H, H, bias=False)

    def forward(self, x):
        return self.lin(x)


class MyLinear(torch.nn.Linear):
    pass


def _plan(layer):
    return layer._make_graph_plan()


def test_plan_fold_rule():
    p = _plan(_layer())
    assert p.whole_logits and not p.whole_gate and not p.folds  # the benchmark layers: one whole graph
    p = _plan(_layer(gate=torch.nn.Linear(H, E, bias=False)))
    assert p.whole_gate and p.folds
    assert _plan(_layer(gate=RouterLinear(H, E, fp32=True))).whole_gate
    assert not _plan(_layer(gate=MyLinear(H, E))).whole_gate  # a subclass may do anything
    shared = SharedMLP(H, 16)
    p = _plan(_layer(shared_experts=shared, shared_expert_gate=torch.nn.Linear(H, 1, bias=False)))
    assert p.whole_logits and shared in p.folded and shared.down_proj in p.watched
    assert not _plan(_layer(shared_experts=UserShared())).whole_logits  # user module: partial graph
    odd = SharedMLP(H, 16)
    odd.down_proj = MyLinear(16, H)
    assert not _plan(_layer(shared_experts=odd)).whole_logits
    assert not _plan(_layer(routed_input_transform=torch.nn.Identity())).whole_logits


def _set(p, t):
    with torch.no_grad():
        p.set_(t)


def test_state_follows_replaced_tensors_not_inplace_updates():
    gate = RouterLinear(H, E)
    layer = _layer(gate=gate, shared_experts=SharedMLP(H, 16))
    re = layer.routed_experts
    s0 = layer._graph_state()
    layer.load_expert_weights(torch.randn_like(re.w13_weight), torch.randn_like(re.w2_weight))  # in place
    assert layer._graph_state() == s0
    edits = [
        lambda: setattr(re, "w13_weight", torch.nn.Parameter(re.w13_weight.clone(), requires_grad=False)),
        lambda: setattr(re.w2_weight, "data", re.w2_weight.data.clone()),
        lambda: layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True),
        lambda: _set(layer.shared_experts.up_proj.weight, torch.randn(16, H)),
        lambda: setattr(layer.shared_experts, "gate_proj", torch.nn.Linear(H, 16, bias=False)),
        lambda: setattr(gate, "fp32", True),
        lambda: gate.register_forward_hook(lambda m, i, o: None),
        lambda: layer.router.spec.__class__ and setattr(layer.router, "spec", layer.router.spec.__class__(
            **{**layer.router.spec.__dict__, "renormalize": False})),
        # the attribute names are read once: a new public attribute, one deleted, one swapped at the same size
        lambda: setattr(gate, "logit_extra", 1.0),
        lambda: setattr(gate, "logit_extra", 2.0),
        lambda: delattr(gate, "logit_extra"),
        lambda: (delattr(gate, "logit_softcap"), setattr(gate, "logit_other", 5.0)),
        lambda: setattr(gate, "logit_other", 3.0),
    ]
    for i, edit in enumerate(edits):
        before = layer._graph_state()
        edit()
        assert layer._graph_state() != before, i
        assert layer._graph_state() == layer._graph_state(), i  # and stable after it


def test_setattr_on_the_layer_drops_plan_and_graphs():
    layer = _layer()
    _plan(layer)
    layer._graphs._entries["fake"] = object()
    layer.eval()  # training flag: kept
    assert layer._graph_plan is not None and len(layer._graphs) == 1
    layer.gate = torch.nn.Linear(H, E, bias=False)
    assert layer._graph_plan is None and len(layer._graphs) == 0


def _plain(layer, **kw):
    ref = _layer(eager_graph_tokens=0, **kw)
    ref.load_state_dict(layer.state_dict())
    return ref


@pytest.mark.parametrize("lead", [(3,), (2, 2)])
def test_whole_graph_replays_skip_checks_and_return_fresh_tensors(fake_graphs, lead):
    layer = _layer()
    ref = _plain(layer)
    outs = []
    for seed in range(3):
        x, lg = torch.randn(*lead, H), torch.randn(*lead, E)
        out = layer(x, lg)
        assert out.shape == x.shape and torch.equal(out, ref(x, lg))
        outs.append((out, ref(x, lg)))
    assert len(layer._graphs) == 1 and fake_graphs.replays == 2
    assert all(torch.equal(a, b) for a, b in outs)  # not overwritten by later replays
    with pytest.raises(TypeError, match="dtype"):  # another dtype is another key: checked, not replayed
        layer(torch.randn(*lead, H, dtype=torch.float64), torch.randn(*lead, E))


def test_whole_graph_recaptured_after_new_weights(fake_graphs):
    layer = _layer()
    x, lg = torch.randn(2, H), torch.randn(2, E)
    layer(x, lg)
    layer(x, lg)
    re = layer.routed_experts
    re.adopt_weights(torch.randn_like(re.w13_weight), torch.randn_like(re.w2_weight))
    assert torch.equal(layer(x, lg), _plain(layer)(x, lg))
    assert fake_graphs.replays == 1 and len(layer._graphs) == 1
    layer(x, lg)
    assert fake_graphs.replays == 2


def test_gate_and_shared_folded(fake_graphs):
    gate, shared = RouterLinear(H, E), SharedMLP(H, 16)
    sgate = torch.nn.Linear(H, 1, bias=False)
    layer = _layer(gate=gate, shared_experts=shared, shared_expert_gate=sgate)
    ref = _plain(layer, gate=RouterLinear(H, E), shared_experts=SharedMLP(H, 16),
                 shared_expert_gate=torch.nn.Linear(H, 1, bias=False))
    for _ in range(3):
        x = torch.randn(4, H)
        assert layer(x).requires_grad and torch.equal(layer(x), ref(x))  # grad on, weights want it:
    assert fake_graphs.replays == 0 and len(layer._graphs) == 0  # the gate's logits want grad: all eager
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, H)
            assert torch.equal(layer(x), ref(x))
    assert fake_graphs.replays == 2 and len(layer._graphs) == 1  # one whole graph


def test_no_replay_with_grad_or_user_modules(fake_graphs):
    layer = _layer()
    x, lg = torch.randn(2, H), torch.randn(2, E)
    layer(x, lg)
    with torch.enable_grad():
        layer(x, lg.requires_grad_())
    assert fake_graphs.replays == 0
    user = _layer(shared_experts=UserShared())
    user(x, lg.detach())
    user(x, lg.detach())  # the partial graph: route -> experts replayed, the user module run eagerly
    assert fake_graphs.replays == 1 and len(user._graphs) == 1
    assert graphed.tensor_key(torch.nn.Parameter(x)) is False  # subclasses never match a key


@pytest.mark.parametrize("shared", [False, True])
def test_token_buckets_pad_and_cut(fake_graphs, shared):
    """Above T = 8 the route -> experts graph of T's bucket serves the call (a whole-graph layer too):
    rows 0..T-1 are the call's, the padding repeats row 0, the output is cut to T rows; one graph per
    bucket; with shared experts the static rows are consumed at once (copy=False), never returned."""
    kw = dict(shared_experts=SharedMLP(H, 16)) if shared else {}
    layer = _layer(eager_graph_tokens=64, **kw)
    ref = _plain(layer, **(dict(shared_experts=SharedMLP(H, 16)) if shared else {}))
    ref.load_state_dict(layer.state_dict())
    seen, outs = [], []
    with torch.no_grad():
        for t in (9, 13, 16, 9, 40, 33, 64, 63):
            x, lg = torch.randn(t, H), torch.randn(t, E)
            out = layer(x, lg)
            assert out.shape == (t, H) and torch.allclose(out, ref(x, lg), rtol=1e-5, atol=1e-6), t
            outs.append((out, out.clone()))
            seen.append(len(layer._graphs))
            static = layer._graphs._entries[next(iter(layer._graphs._entries))].inputs[0]
            if t == 13:  # the bucket-16 rows of this call: its 13 tokens, then token 0 three times
                assert torch.equal(static[:13], x) and torch.equal(static[13:], x[:1].expand(3, H))
    assert seen == [1, 1, 1, 1, 2, 2, 3, 3]  # buckets 16, 40, 64
    assert fake_graphs.replays == 5
    assert all(torch.equal(a, b) for a, b in outs)  # returned rows are not the static rows
    rows = [e.inputs[0].shape[0] for e in layer._graphs._entries.values()]
    assert rows == [16, 40, 64] and len({e.inputs[0].data_ptr() for e in layer._graphs._entries.values()}) == 1
    with torch.no_grad():
        x = torch.randn(65, H)
        layer(x, torch.randn(65, E))  # above the limit: eager, no graph
    assert len(layer._graphs) == 3 and fake_graphs.replays == 5


def test_large_buckets_keep_the_rows_there(fake_graphs):
    """Above 64 rows the padding is whatever the static rows hold (zeros first, then earlier inputs):
    no index op; the real rows' outputs are unaffected."""
    layer = _layer(eager_graph_tokens=300)
    ref = _plain(layer)
    with torch.no_grad():
        for t in (70, 90, 70):  # bucket 96 each time
            x, lg = torch.randn(t, H), torch.randn(t, E)
            assert torch.allclose(layer(x, lg), ref(x, lg), rtol=1e-5, atol=1e-6), t
            static = layer._graphs._entries[next(iter(layer._graphs._entries))].inputs[0]
            assert static.shape[0] == 96 and torch.equal(static[:t], x)
            if t == 90:
                last = x
        assert torch.equal(static[70:90], last[70:]) and not static[90:].any()  # earlier rows, then zeros
    assert len(layer._graphs) == 1 and fake_graphs.replays == 2


def test_layers_of_one_pool_share_buffers(fake_graphs):
    """Two layers on one GraphPool: one set of bucket buffers (input, logits, output) between them,
    interleaved calls each get their own layer's output."""
    pool = graphed.GraphPool()
    layers = [_layer(eager_graph_tokens=64, runner_args=dict(graph_pool=pool)) for _ in range(2)]
    refs = [_plain(layer) for layer in layers]
    with torch.no_grad():
        for t in (13, 40, 13, 64):
            x, lg = torch.randn(t, H), torch.randn(t, E)
            outs = [layer(x, lg) for layer in layers]
            for out, ref in zip(outs, refs):
                assert torch.allclose(out, ref(x, lg), rtol=1e-5, atol=1e-6), t
    assert sorted(k[0] for k in pool._buffers) == ["in0", "in1", "out"]
    assert not layers[0]._graphs._buffers and len(layers[0]._graphs) == len(layers[1]._graphs) == 3


def test_graph_safe_routing_function_exact_graphs_only(fake_graphs):
    """A layer on moekit's Gemma 4 routing (a module holding per_expert_scale): T <= 8 replays a graph,
    above runs eagerly; a new per_expert_scale tensor (another address) drops the graphs."""
    from moekit.loading.routings import ExpertScaleRouting

    def build():
        routing = ExpertScaleRouting(E)
        with torch.no_grad():
            routing.per_expert_scale.uniform_(0.5, 1.5)
        return _layer(custom_routing_function=routing)

    layer = build()
    ref = _plain(layer, custom_routing_function=ExpertScaleRouting(E))
    with torch.no_grad():
        for t in (3, 3, 13, 13):
            x, lg = torch.randn(t, H), torch.randn(t, E)
            assert torch.allclose(layer(x, lg), ref(x, lg), rtol=1e-5, atol=1e-6), t
        assert len(layer._graphs) == 1 and fake_graphs.replays == 1  # T = 13: eager, no bucket
        routing = layer.router.custom_routing_function
        routing.per_expert_scale = torch.nn.Parameter(routing.per_expert_scale * 2)
        ref.router.custom_routing_function.per_expert_scale.mul_(2)
        x, lg = torch.randn(3, H), torch.randn(3, E)
        assert torch.allclose(layer(x, lg), ref(x, lg), rtol=1e-5, atol=1e-6)
        assert fake_graphs.replays == 1 and len(layer._graphs) == 1  # recaptured, not replayed


def test_buckets_take_strided_and_3d_inputs(fake_graphs):
    """Rows of a wider tensor (a column slice: row stride > H) and [B, S, H] inputs fill a bucket like
    contiguous ones (index_select / copy_ read any strides); the output has the input's shape."""
    layer = _layer(eager_graph_tokens=64)
    ref = _plain(layer)
    with torch.no_grad():
        for t in (13, 16, 13):
            wide = torch.randn(t, 2 * H)[:, :H]
            lg = torch.randn(t, 2 * E)[:, 1 : E + 1]
            assert torch.allclose(layer(wide, lg), ref(wide.contiguous(), lg.contiguous()), rtol=1e-5, atol=1e-6)
        x = torch.randn(2, 7, H)
        out = layer(x, torch.randn(14, E))
        assert out.shape == (2, 7, H) and len(layer._graphs) == 1  # T = 14: bucket 16 again


def test_router_settings_drop_the_graphs(fake_graphs):
    """A graph bakes in a custom router's plain settings (its scaling factor, the function itself): changing
    them drops the graphs, so the next call is run and captured with the new ones."""
    from moekit.loading.routings import llama4_routing, pnorm_routing

    layer = _layer(custom_routing_function=llama4_routing)
    ref = _plain(layer, custom_routing_function=llama4_routing)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    with torch.no_grad():
        layer(x, lg)
        layer(x, lg)
        assert fake_graphs.replays == 1
        for r in (layer.router, ref.router):
            r.routed_scaling_factor = 2.5
        assert torch.allclose(layer(x, lg), ref(x, lg), rtol=1e-5, atol=1e-6) and fake_graphs.replays == 1
        for r in (layer.router, ref.router):
            r.custom_routing_function = pnorm_routing
        assert torch.allclose(layer(x, lg), ref(x, lg), rtol=1e-5, atol=1e-6) and fake_graphs.replays == 1
        layer(x, lg)
        assert fake_graphs.replays == 2


def test_undeclared_routing_function_set_later_never_graphs(fake_graphs):
    from moekit.loading.routings import llama4_routing

    layer = _layer(custom_routing_function=llama4_routing)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    with torch.no_grad():
        layer(x, lg)
        layer.router.custom_routing_function = lambda h, g, k, r: llama4_routing(h, g, k, r)  # not declared
        layer(x, lg)
        layer(x, lg)
    assert fake_graphs.replays == 0 and len(layer._graphs) == 1  # the first call's graph: never replayed


def test_batch_invariant_gate_inside_the_bucket_graphs(fake_graphs):
    """A Triton RouterLinear (batch invariant) runs inside the route -> experts graphs of the token buckets: their
    one input is x (no logits copy, no eager gate launch); a torch-backend gate stays outside (cuBLAS is not batch
    invariant), as it does when router_logits are passed, and switching the backend drops the graphs."""
    layer = _layer(gate=RouterLinear(H, E, fp32=True, backend="triton"), shared_experts=UserShared(),
                   eager_graph_tokens=64)
    ref = _plain(layer, gate=RouterLinear(H, E, fp32=True, backend="triton"), shared_experts=UserShared())
    assert layer._make_graph_plan().bucket_gate is layer.gate and not layer._graph_plan.whole_gate
    with torch.no_grad():
        for t in (13, 13, 40, 3):  # buckets 16, 16, 40 and the exact T = 3 (user shared experts: no whole graph)
            x = torch.randn(t, H)
            assert torch.allclose(layer(x), ref(x), rtol=1e-5, atol=1e-6), t
        keys = list(layer._graphs._entries)
        assert [k[0] for k in keys] == [16, 40, 3] and all(k[2] is None for k in keys)  # (rows, dtype, no logits)
        assert all(len(e.inputs) == 1 for e in layer._graphs._entries.values()) and fake_graphs.replays == 1
        layer(torch.randn(13, H), torch.randn(13, E))  # logits passed: the gate-less graph of bucket 16
        assert len(layer._graphs) == 4 and list(layer._graphs._entries)[-1][2] == torch.float32
        layer.gate.backend = "torch"  # a setting of a watched module: the graphs go, the gate runs eagerly
        x = torch.randn(13, H)
        assert torch.allclose(layer(x), ref(x), rtol=1e-5, atol=1e-6)
        assert [k[2] for k in layer._graphs._entries] == [torch.float32]
    with torch.enable_grad():  # the gate's weight wants grad: it runs eagerly, the routed part may still replay
        layer.gate.backend = "triton"
        x = torch.randn(13, H)
        out = layer(x)
        assert out.requires_grad and [k[2] for k in layer._graphs._entries] == [torch.float32]


def test_bucket_gate_needs_a_gate_reading_the_routed_input():
    # (Gemma 4: the gate reads the block input before routed_input_transform: outside the graphs)
    gate = RouterLinear(H, E, backend="triton")
    assert _plan(_layer(gate=gate)).bucket_gate is gate
    assert _plan(_layer(gate=torch.nn.Linear(H, E, bias=False))).bucket_gate is None  # no batch_invariant
    layer = _layer(gate=RouterLinear(H, E, backend="triton"), gate_input="block",
                   routed_input_transform=torch.nn.Identity())
    assert _plan(layer).bucket_gate is None


def test_compile_traces_no_graph_machinery(monkeypatch):
    # torch.compile of a fresh layer (no plan yet): the traced forward must not build the plan or touch the
    # graphs (round 22's H200 failure: torch 2.11's dynamo could not trace the plan's settings readers)
    def refuse(*_a, **_k):
        raise AssertionError("graph machinery traced under torch.compile")

    layer = _layer()
    for name in ("graph_plan", "capture_whole", "replay_whole"):
        monkeypatch.setattr(graphed_plan, name, refuse)
        monkeypatch.setattr(runner, name, refuse, raising=False)
    monkeypatch.setattr(GraphCache, "eligible", refuse)
    x, lg = torch.randn(5, H), torch.randn(5, E)
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend="eager")(x, lg)
    torch.testing.assert_close(out, _plain(layer)(x, lg))
    assert layer._graph_plan is None and len(layer._graphs) == 0


@pytest.mark.parametrize("shared", [None, "moekit", "user"])
def test_bucket_replays_of_a_checked_key_skip_the_checks(fake_graphs, monkeypatch, shared):
    """A call without logits whose input key (shape, dtype, device) already replayed a bucket graph (gate
    inside) goes straight to it: no checks, no plan or key work, the same bits, a fresh tensor (or the static
    rows consumed by routed + shared at once). Autograd, new weights, another key: the checked path again."""
    mk = {None: lambda: None, "moekit": lambda: SharedMLP(H, 16), "user": UserShared}[shared]
    layer = _layer(gate=RouterLinear(H, E, fp32=True, backend="triton"), shared_experts=mk(), eager_graph_tokens=64)
    ref = _plain(layer, gate=RouterLinear(H, E, fp32=True, backend="triton"), shared_experts=mk())
    checks = []
    real = runner.check_hidden  # (counted for this layer only: ref's calls are not)
    monkeypatch.setattr(runner, "check_hidden",
                        lambda lay, h, *a: (lay is layer and checks.append(tuple(h.shape)), real(lay, h, *a)))
    with torch.no_grad():
        outs = []
        for lead in [(13,), (13,), (13,), (2, 13), (2, 13), (40,)]:  # buckets 16 (2-D and 3-D keys) and 40
            x = torch.randn(*lead, H)
            out = layer(x)
            assert out.shape == x.shape and torch.allclose(out, ref(x), rtol=1e-5, atol=1e-6), lead
            outs.append((out, ref(x)))
        assert checks == [(13, H), (2, 13, H), (40, H)]  # the first call of each key only
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in outs)  # not overwritten later
        assert fake_graphs.replays == 3 and len(layer._graphs._direct) == 3
        re = layer.routed_experts  # new weights: the state differs, the graphs go, the checked path again
        re.adopt_weights(torch.randn_like(re.w13_weight) * 0.1, torch.randn_like(re.w2_weight) * 0.1)
        ref.routed_experts.adopt_weights(re.w13_weight, re.w2_weight)
        x = torch.randn(13, H)
        assert torch.allclose(layer(x), ref(x), rtol=1e-5, atol=1e-6) and len(checks) == 4
        assert list(layer._graphs._direct) == [(graphed.tensor_key(x), None, None)]
    x = torch.randn(13, H, requires_grad=True)  # autograd wanted: checked, and eager
    with torch.enable_grad():
        layer(x)
        assert len(checks) == 5
    with pytest.raises(TypeError, match="dtype"), torch.no_grad():  # another dtype: another key, checked
        layer(torch.randn(13, H, dtype=torch.float64))


def test_bucket_replays_with_logits_skip_the_checks(fake_graphs, monkeypatch):
    """The same with router logits passed (gpt-oss's and Llama 4's adapters run the gate themselves): keyed by
    both inputs; logits the forward would reshape or cast are never a direct key (checked every call)."""
    layer = _layer(shared_experts=UserShared(), eager_graph_tokens=64)  # user shared experts: no whole graphs
    ref = _plain(layer, shared_experts=UserShared())
    ref.shared_experts.load_state_dict(layer.shared_experts.state_dict())
    checks = []
    real = runner.check_hidden  # (counted for this layer only: ref's calls are not)
    monkeypatch.setattr(runner, "check_hidden",
                        lambda lay, h, *a: (lay is layer and checks.append(tuple(h.shape)), real(lay, h, *a)))
    with torch.no_grad():
        for t in (13, 13, 13, 5, 5):
            x, lg = torch.randn(t, H), torch.randn(t, E)
            assert torch.allclose(layer(x, lg), ref(x, lg), rtol=1e-5, atol=1e-6), t
        assert checks == [(13, H), (5, H)] and len(layer._graphs._direct) == 2
        x, lg = torch.randn(13, H), torch.randn(13, E)
        layer(x, lg.double())  # another logits dtype: another key, checked once, then direct
        layer(x, lg.double())
        assert len(checks) == 3
        for _ in range(2):  # [1, T, E] logits are reshaped by the forward: checked every call
            assert torch.allclose(layer(x, lg[None]), ref(x, lg), rtol=1e-5, atol=1e-6)
        assert len(checks) == 5 and len(layer._graphs._direct) == 3
        monkeypatch.setattr(graphed, "DIRECT_KEYS", 3)  # full: a new key is checked every call
        for _ in range(2):
            layer(torch.randn(14, H), torch.randn(14, E))
        assert len(checks) == 7 and len(layer._graphs._direct) == 3
