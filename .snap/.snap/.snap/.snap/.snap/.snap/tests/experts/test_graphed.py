"""The internal CUDA-graph cache on CPU: when a layer has one, when a call may use it, copies and pickles.
(Capture and replay, bit-identity and invalidation run on a GPU: tests/experts/test_graphed_gpu.py.)"""

import copy
import os
import pickle

import pytest
import torch

import moekit
from moekit.experts.graphed import MODEL_GRAPH_TOKENS, GraphCache, GraphPool, graph_bucket, pad_index
from moekit.runner import DEFAULT_EAGER_GRAPH_TOKENS


def _layer(backend="triton", **kw):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine (tests/conftest.py): the
        pytest.skip("CPU layers on the Triton backend need the interpreter")  # graphs run in test_graphed_gpu.py
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, device="cpu", backend=backend, **kw)
    re = layer.routed_experts
    layer.load_expert_weights(torch.randn_like(re.w13_weight) * 0.1, torch.randn_like(re.w2_weight) * 0.1)
    return layer


def test_which_layers_graph():
    assert _layer().eager_graph_tokens == DEFAULT_EAGER_GRAPH_TOKENS == 8  # layers of a model: MODEL_GRAPH_TOKENS
    assert _layer(eager_graph_tokens=3).eager_graph_tokens == 3
    assert _layer(eager_graph_tokens=0).eager_graph_tokens == 0
    assert _layer(backend="torch").eager_graph_tokens == 0  # the reference path synchronises
    assert _layer(custom_routing_function=lambda x, g, k, r: torch.topk(g, k)).eager_graph_tokens == 0
    table = torch.randint(0, 8, (50, 2))
    assert _layer(hash_indices_table=table).eager_graph_tokens == 0  # input_ids are checked on the host
    assert _layer(use_grouped_topk=True, num_expert_group=2, topk_group=1).eager_graph_tokens == 8
    assert _layer(runner_args=dict(eager_graph_tokens=5)).eager_graph_tokens == 5


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_eager_graph_tokens_checked(bad):
    with pytest.raises((TypeError, ValueError), match="eager_graph_tokens"):
        _layer(eager_graph_tokens=bad)


def test_cpu_calls_run_eagerly():
    layer = _layer()
    x, lg = torch.randn(3, 32), torch.randn(3, 8)
    assert not layer._graphs.eligible(x, lg)
    ref = _layer(eager_graph_tokens=0)
    ref.routed_experts.adopt_weights(layer.routed_experts.w13_weight, layer.routed_experts.w2_weight)
    assert torch.equal(layer(x, lg), ref(x, lg)) and len(layer._graphs) == 0


def test_state_change_clears():
    cache = GraphCache(4)
    cache._entries[("k",)] = object()
    cache._state = ("a",)
    cache.clear()
    assert len(cache) == 0 and cache._state is None


def test_copies_and_pickles_carry_settings_only():
    layer = _layer(eager_graph_tokens=4)
    layer._graphs._entries[("fake",)] = object()  # stands for a captured graph
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.eager_graph_tokens == 4 and len(clone._graphs) == 0
        x, lg = torch.randn(2, 32), torch.randn(2, 8)
        assert torch.equal(clone(x, lg), layer(x, lg))
    layer.to(torch.float32)  # .to() drops the graphs
    assert len(layer._graphs) == 0


def test_token_buckets():
    # exact up to 8; multiples of 8 up to 64, of 32 up to 512, of 128 beyond; capped at the limit
    got = {t: graph_bucket(t, 64) for t in (1, 7, 8, 9, 15, 16, 17, 33, 57, 63, 64)}
    assert got == {1: 1, 7: 7, 8: 8, 9: 16, 15: 16, 16: 16, 17: 24, 33: 40, 57: 64, 63: 64, 64: 64}
    assert [graph_bucket(t, 1000) for t in (65, 96, 97, 257, 512, 513, 999)] == [96, 96, 128, 288, 512, 640, 1000]
    assert len({graph_bucket(t, 2048) for t in range(1, 2049)}) == 41
    assert graph_bucket(49, 50) == 50 and graph_bucket(3, 3) == 3  # never above the limit
    assert len({graph_bucket(t, 64) for t in range(1, 65)}) == 15  # graphs per input key at the default
    assert pad_index(3, 8, "cpu").tolist() == [0, 1, 2, 0, 0, 0, 0, 0]  # padding rows repeat token 0
    assert pad_index(5, 5, "cpu").tolist() == [0, 1, 2, 3, 4]


def test_eligible_token_limits(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cache = GraphCache(64)
    ok = lambda t, **kw: cache.eligible(torch.empty(t, 4), torch.empty(t, 2), **kw)  # noqa: E731
    assert [ok(t) for t in (0, 1, 9, 64, 65)] == [False, True, True, True, False]
    assert [ok(t, whole=True) for t in (1, 8, 9)] == [True, True, False]  # whole forwards: exact T <= 8
    assert [GraphCache(5).eligible(torch.empty(t, 4), None, whole=True) for t in (5, 6)] == [True, False]


def test_graph_pool_is_lazy_and_never_copied():
    pool = GraphPool()
    assert pool._handle is None  # building layers touches no CUDA
    assert copy.deepcopy(pool) is not pool and pickle.loads(pickle.dumps(pool))._handle is None


def test_graph_limit_settable_and_model_rule():
    layer = _layer()
    layer.eager_graph_tokens = 300
    assert layer.eager_graph_tokens == 300 == layer._graphs.max_tokens
    with pytest.raises(ValueError, match="eager_graph_tokens"):
        layer.eager_graph_tokens = -1
    plain = _layer(backend="torch")
    plain.eager_graph_tokens = 64  # a layer that never graphs stays at 0
    assert plain.eager_graph_tokens == 0
    # a model's layers graph up to T = 2048 whatever their expert bytes (round 22: large experts too)
    assert MODEL_GRAPH_TOKENS == 2048


def test_pool_handles_are_not_reused_once_every_graph_is_gone(monkeypatch):
    """PyTorch asserts when a capture reuses a pool whose graphs are all gone while a block of it is held
    (seen on H200): a cleared cache takes a fresh handle; a shared GraphPool does once its last graph goes."""
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, next(handles)))
    cache = GraphCache(8)
    first = cache._pool()
    assert cache._pool() == first
    cache.clear()
    assert cache._pool() != first
    pool = GraphPool()
    h = pool.handle()
    pool.acquire()
    pool.acquire()
    pool.release(1)
    assert pool.handle() == h  # a graph is still in it
    pool.release(1)
    assert pool.handle() != h


def test_routing_functions_declared_graph_safe():
    """moekit's named routings declare themselves graph-safe: exact-T graphs only (T <= 8; a torch function's
    rows are not promised batch invariant); an undeclared function, or a subclass that does not declare it
    again, never graphs."""
    import functools

    from moekit.loading.routings import ExpertScaleRouting, llama4_routing, pnorm_routing
    from moekit.routing.custom import declared_graph_safe

    class Sub(ExpertScaleRouting):
        pass

    assert declared_graph_safe(llama4_routing) and declared_graph_safe(functools.partial(pnorm_routing, p=1.0))
    assert declared_graph_safe(ExpertScaleRouting(8)) and not declared_graph_safe(Sub(8))
    assert not declared_graph_safe(lambda *a: None)
    layer = _layer(custom_routing_function=llama4_routing)
    assert layer.eager_graph_tokens == 8 and not layer._graphs.buckets
    layer.eager_graph_tokens = 2048  # (a model's rule) still exact-T only
    assert layer.eager_graph_tokens == 8 and layer._graphs.max_tokens == 2048
    assert _layer(custom_routing_function=Sub(8)).eager_graph_tokens == 0


def test_graph_lock_one_holder_and_released_after_every_forward():
    # round 49: two threads filled one set of static buffers at once (48 of 300 calls wrong on an H100). A forward
    # holds the graphs' lock from the first fill to the last read; a second holder gets False (it runs eagerly)
    pool = GraphPool()
    a, b, own = GraphCache(8, pool), GraphCache(8, pool), GraphCache(8)
    assert a.lock is b.lock is pool.lock and own.lock is not pool.lock  # a pool's layers share buffers: one lock
    x = torch.zeros(2, 4)
    assert a.lock.take(x) and not b.lock.take(x) and own.lock.take(x)
    a.lock.release()
    assert b.lock.take(x)
    b.lock.release()
    own.lock.release()
    assert copy.deepcopy(pool).lock is not pool.lock and pickle.loads(pickle.dumps(a)).lock is not a.lock
    layer = _layer()
    x, lg = torch.randn(3, 32), torch.randn(3, 8)
    out = layer(x, lg)
    assert not layer._graphs.lock._lock.locked()
    with pytest.raises(ValueError):
        layer(x, torch.randn(3, 5))  # a wrong logits width raises inside the held forward: released all the same
    assert not layer._graphs.lock._lock.locked()
    assert layer._graphs.lock.take(x)  # held by someone else: this forward runs eagerly, the same values
    try:
        assert torch.equal(layer(x, lg), out)
        w, _ = layer.forward_with_scores(x, lg)
        assert torch.equal(w, out)
    finally:
        layer._graphs.lock.release()
