"""Round 64: the internal CUDA graphs' invalidation, on CPU with *faithful* fake graphs.

The ``fake_graphs`` fixture of conftest re-runs the layer as it is at replay time, so it cannot show a stale graph.
``faithful`` here freezes the layer at capture the way a CUDA graph does: a deep copy sharing every tensor's storage
(in-place edits are seen, a new tensor, module, hook or attribute is not). A replay whose output differs from the
plain eager call is a stale graph. Each case names the change that a replay used to miss.
"""

from __future__ import annotations

import copy
import gc
import types

import pytest
import torch

import moekit
from moekit.experts.graph_lock import GraphPool
from moekit.loading.modules import RouterLinear, SharedMLP
from moekit.loading.routings import ExpertScaleRouting
from moekit.runner import MoERunner

from graph_fakes import install_fake_graphs

E, K, H, I = 8, 2, 32, 16
pytestmark = pytest.mark.interpreter  # CPU layers on the Triton backend (a GPU host runs test_graphed_gpu.py)


class _Graph:
    replays = 0

    def __init__(self, keep_graph=False):
        self.run = None

    def instantiate(self):
        pass

    def replay(self):
        _Graph.replays += 1
        with torch.no_grad():
            self.run()


def _tensors(obj, seen, out):
    if id(obj) in seen or isinstance(obj, (types.FunctionType, types.ModuleType, type)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[id(obj)] = obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, seen, out)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors(v, seen, out)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            _tensors(v, seen, out)


def _frozen(fn):
    """``fn`` (a layer's bound method or a closure over it) on a copy of the layer frozen now, tensors shared."""
    layer = fn.__self__ if isinstance(getattr(fn, "__self__", None), MoERunner) else next(
        c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, MoERunner))
    found = {}
    _tensors(layer, set(), found)
    memo = {i: (torch.nn.Parameter(t.detach(), t.requires_grad) if isinstance(t, torch.nn.Parameter) else t.detach())
            for i, t in found.items()}
    frozen = copy.deepcopy(layer, memo)
    if getattr(fn, "__self__", None) is layer:
        return getattr(frozen, fn.__func__.__name__)
    cells = tuple(types.CellType(frozen if c.cell_contents is layer else c.cell_contents) for c in fn.__closure__)
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)


@pytest.fixture
def faithful(monkeypatch):
    """Fake graphs whose replay runs the layer frozen at capture (:func:`_frozen`)."""
    return install_fake_graphs(monkeypatch, _Graph, _frozen)


def _layer(**kw):
    g = torch.Generator().manual_seed(0)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="triton", **kw)
    re_ = layer.routed_experts
    layer.load_expert_weights(torch.randn(re_.w13_weight.shape, generator=g) * 0.1,
                              torch.randn(re_.w2_weight.shape, generator=g) * 0.1)
    return layer.eval()


def _plain(layer, *args):
    graphs = layer.__dict__["_graphs"]
    layer.__dict__["_graphs"] = None
    try:
        return layer(*args)
    finally:
        layer.__dict__["_graphs"] = graphs


def _agrees(layer, *args):
    """The layer's (maybe replayed) output equals its plain eager one; returns whether a graph replayed."""
    before = _Graph.replays
    with torch.no_grad():
        out, ref = layer(*args), _plain(layer, *args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    return _Graph.replays > before


def _warm(layer, *args):
    _agrees(layer, *args)
    assert _agrees(layer, *args), "the second call replays"


def _routing(scale):
    r = ExpertScaleRouting(E)
    with torch.no_grad():
        r.per_expert_scale.fill_(scale)
    return r.requires_grad_(False)


def test_a_routing_module_swapped_on_the_router(faithful):
    layer = _layer(custom_routing_function=_routing(1.0))
    x, lg = torch.randn(3, H), torch.randn(3, E)
    _warm(layer, x, lg)
    layer.router.custom_routing_function = _routing(5.0)  # was replayed with the old module's scale
    _agrees(layer, x, lg)


@pytest.mark.parametrize("how", ["param", "data", "assign"])
def test_the_bucket_gate_weight_replaced(faithful, how):
    # the gate runs inside the bucket graphs (not folded: user shared experts) and its tensors were not watched
    shared = torch.nn.Sequential(torch.nn.Linear(H, H, bias=False))
    layer = _layer(gate=RouterLinear(H, E, fp32=True, backend="triton"), shared_experts=shared, eager_graph_tokens=64)
    x = torch.randn(13, H)
    _warm(layer, x)
    new = torch.randn(E, H)
    if how == "param":
        layer.gate.weight = torch.nn.Parameter(new)
    elif how == "data":
        layer.gate.weight.data = new
    else:
        layer.gate.load_state_dict({"weight": new}, assign=True)
    _agrees(layer, x)
    _agrees(layer, torch.randn(3, H))


def test_a_folded_modules_child_swapped_then_edited_or_hooked(faithful):
    layer = _layer(shared_experts=SharedMLP(H, 16))
    x, lg = torch.randn(3, H), torch.randn(3, E)
    _warm(layer, x, lg)
    layer.shared_experts.down_proj = torch.nn.Linear(16, H, bias=False)
    _warm(layer, x, lg)
    layer.shared_experts.down_proj.weight = torch.nn.Parameter(torch.randn(H, 16))  # the new child's: unwatched
    _agrees(layer, x, lg)
    handle = layer.shared_experts.down_proj.register_forward_hook(lambda m, i, o: o * 0)
    _agrees(layer, x, lg)
    _agrees(layer, x, lg)
    handle.remove()

    class Counting(torch.nn.Linear):  # not an exact nn.Linear: never folded, so it runs on every call
        calls = 0

        def forward(self, v):
            Counting.calls += 1
            return super().forward(v)

    layer.shared_experts.down_proj = Counting(16, H, bias=False)
    for _ in range(3):
        _agrees(layer, x, lg)
    assert Counting.calls == 6  # three calls, each with its plain reference
    assert not layer._graph_plan.whole_logits


def test_an_expert_output_norm_swapped_for_a_user_module(faithful):
    class UserNorm(torch.nn.Module):
        def forward(self, o):
            return o * 2.0

    from moekit.loading.blocks import RMSNorm
    norm = RMSNorm(H, with_scale=True)
    with torch.no_grad():
        norm.weight.fill_(1.5)
    layer = _layer(expert_output_norm=norm)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    _warm(layer, x, lg)
    layer.routed_experts.expert_output_norm = UserNorm()  # not graph-safe: a layer built with it never graphs
    assert not _agrees(layer, x, lg) and not _agrees(layer, x, lg)


def test_a_router_swapped_in_keeps_its_own_bucket_rule():
    def coupled(hidden_states, gating_output, topk, renormalize):  # graph-safe, not batch invariant
        s = torch.softmax(gating_output.float(), -1)
        w, ids = torch.topk(s - s.mean(0, keepdim=True), topk, -1)
        return torch.sigmoid(w), ids.to(torch.int32)
    coupled._moekit_graph_safe = True

    built = _layer(custom_routing_function=coupled, eager_graph_tokens=64)
    layer = _layer(eager_graph_tokens=64)
    assert layer.eager_graph_tokens == 64
    layer.router = built.router  # padded buckets would feed padding rows into a batch-coupled function
    assert layer.eager_graph_tokens == built.eager_graph_tokens == 8


def test_hooks_on_folded_or_inner_modules_run_on_every_call(faithful):
    layer = _layer(gate=torch.nn.Linear(H, E, bias=False), shared_experts=SharedMLP(H, 16))
    _warm(layer, torch.randn(3, H))
    seen = []
    layer.gate.register_forward_hook(lambda m, i, o: seen.append(1))
    for _ in range(4):
        with torch.no_grad():
            layer(torch.randn(3, H))
    assert len(seen) == 4  # was 1: the hook ran at the recapture only
    other = _layer(shared_experts=SharedMLP(H, 16), eager_graph_tokens=64)
    a = other.shared_experts.register_forward_hook(lambda m, i, o: o * 2)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    _agrees(other, x, lg)
    _agrees(other, x, lg)
    a.remove()
    other.shared_experts.register_forward_hook(lambda m, i, o: o * -5)  # same count of hooks: was not seen
    _agrees(other, x, lg)
    for t in (3, 13):  # a hook on the experts (every graph runs them) keeps the graphs off
        other.routed_experts.register_forward_hook(lambda m, i, o: o * 0)
        x, lg = torch.randn(t, H), torch.randn(t, E)
        assert not _agrees(other, x, lg)


def test_a_trainable_routing_parameter_keeps_its_gradient(faithful):
    routing = ExpertScaleRouting(E)  # Gemma 4's per-expert scale: requires grad by default
    layer = _layer(custom_routing_function=routing).train()
    x, lg = torch.randn(3, H), torch.randn(3, E)
    for _ in range(2):
        out = layer(x, lg)
        assert out.requires_grad
        out.sum().backward()
        assert routing.per_expert_scale.grad is not None
        routing.per_expert_scale.grad = None


def test_autocast_keeps_graphs_off_for_routing_functions(faithful, monkeypatch):
    import moekit.experts.graphed_plan as gp
    from moekit.experts.graphed_plan import take_graphs
    layer = _layer(custom_routing_function=_routing(1.0))
    assert take_graphs(layer, torch.randn(3, H)) is not None
    layer._graphs.lock.release()
    monkeypatch.setattr(gp, "_autocast", lambda: True)  # CUDA autocast on (a routing function's ops follow it)
    assert take_graphs(layer, torch.randn(3, H)) is None


def test_a_tensor_attribute_of_a_routing_module(faithful):
    class Biased(torch.nn.Module):
        _moekit_graph_safe = True

        def __init__(self):
            super().__init__()
            self.bias = torch.zeros(E)  # a plain attribute, not a buffer

        def forward(self, hidden_states, gating_output, topk, renormalize):
            w, ids = torch.topk((gating_output + self.bias).softmax(-1), topk)
            return w, ids.to(torch.int32)

    routing = Biased()
    layer = _layer(custom_routing_function=routing)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    _warm(layer, x, lg)
    routing.bias = torch.arange(E, dtype=torch.float32)  # raised "Boolean value of Tensor ... is ambiguous"
    _agrees(layer, x, lg)


def test_tensor_subclass_inputs_get_no_whole_graph(faithful):
    class Sub(torch.Tensor):
        pass

    layer = _layer(gate=torch.nn.Linear(H, E, bias=False))
    for t in (3, 2, 5):  # every subclass shared one whole-graph key: [2, H] replayed the T = 3 graph
        x = torch.randn(t, H).as_subclass(Sub)
        with torch.no_grad():
            out = layer(x)
        assert out.shape == (t, H)
        torch.testing.assert_close(out.as_subclass(torch.Tensor), _plain(layer, x).as_subclass(torch.Tensor))


def test_the_shared_pool_gives_back_its_graphs_and_buffers(faithful):
    pool = GraphPool()
    a, b = (_layer(runner_args=dict(graph_pool=pool), eager_graph_tokens=64) for _ in range(2))
    for layer in (a, b):
        _agrees(layer, torch.randn(13, H), torch.randn(13, E))
    assert pool._live == 2 and pool._buffers
    del a
    gc.collect()
    assert pool._live == 1  # a cache dropped uncleared gives its graphs back (was kept: the handle never renewed)
    b._graphs.clear()
    assert pool._live == 0 and not pool._buffers  # and the static buffers go with the last graph
