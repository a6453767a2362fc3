"""Fixtures of the layer-graph tests: ``fake_graphs``, CUDA graphs on CPU."""

import pytest
import torch

from graph_fakes import install_fake_graphs


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
    return install_fake_graphs(monkeypatch, _FakeGraph, lambda fn: fn)
