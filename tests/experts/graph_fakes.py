"""CUDA graphs on CPU for the layer-graph tests (``conftest.fake_graphs``, ``test_graphed_audit64.faithful``)."""

import contextlib

import torch

from moekit.experts import graphed
from moekit.experts.graphed import GraphCache


def install_fake_graphs(monkeypatch, graph_cls, runner):
    """CUDA graphs on CPU: ``graph_cls`` stands for ``torch.cuda.CUDAGraph`` and a capture sets the entry's
    ``graph.run`` to ``runner(fn)``'s result called on the entry's static inputs into its static output."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph_cls)
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(graphed, "capture_stream", lambda index: None)  # (the device's capture stream: none on CPU)
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
        e, run = self._entries[key], runner(fn)
        e.graph.run = lambda: e.out.copy_(run(*e.inputs))
        return out

    monkeypatch.setattr(GraphCache, "eligible", eligible)
    monkeypatch.setattr(GraphCache, "capture", capture)
    graph_cls.replays = 0
    return graph_cls
