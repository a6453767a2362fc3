"""Fixtures of the layer-graph tests: ``fake_graphs``, CUDA graphs on CPU."""

import contextlib

import pytest
import torch

from moekit.experts.graphed import GraphCache


class _FakeGraph:
    replays = 0

    def __init__(self, keep_graph=False):
        self.keep_graph, self.instantiated = keep_graph, not keep_graph

    def instantiate(self):
        self.instantiated = True

    def replay(self):
        _FakeGraph.replays += 1
        with torch.no_grad():
            self.run()


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA graphs on CPU: capture records the function, replay re-runs it into the static output."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    real_eligible, real_capture = GraphCache.eligible, GraphCache.capture

    def eligible(self, x, logits, tokens=None, whole=False):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
            return real_eligible(self, x, logits, tokens, whole)

    def capture(self, key, fn, inputs, rows=None):
        out = real_capture(self, key, fn, inputs, rows)
        e = self._entries[key]
        e.graph.run = lambda: e.out.copy_(fn(*e.inputs))
        return out

    monkeypatch.setattr(GraphCache, "eligible", eligible)
    monkeypatch.setattr(GraphCache, "capture", capture)
    _FakeGraph.replays = 0
    return _FakeGraph
