"""The internal CUDA-graph cache on CPU: when a layer has one, when a call may use it, copies and pickles.
(Capture and replay, bit-identity and invalidation run on a GPU: tests/experts/test_graphed_gpu.py.)"""

import copy
import pickle

import pytest
import torch

import moekit
from moekit.experts.graphed import GraphCache
from moekit.runner import DEFAULT_EAGER_GRAPH_TOKENS


def _layer(backend="triton", **kw):
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, device="cpu", backend=backend, **kw)
    re = layer.routed_experts
    layer.load_expert_weights(torch.randn_like(re.w13_weight) * 0.1, torch.randn_like(re.w2_weight) * 0.1)
    return layer


def test_which_layers_graph():
    assert _layer().eager_graph_tokens == DEFAULT_EAGER_GRAPH_TOKENS == 8
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
