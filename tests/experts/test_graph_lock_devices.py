"""GraphLock's stream ordering over several devices and the internal graphs' capture stream, on CPU with fake CUDA
streams (round 69; the GPU twins: test_multi_device_gpu.py, test_streams_gpu.py).

A GraphPool's layers may sit on two GPUs (patch() / load_moe_layers give a device_map model one pool). The lock kept
ONE last holder, and a holder on another device skipped the wait, so cuda:0 stream sa -> cuda:1 -> cuda:0 stream sb
ordered sb after nothing while sa's replay could still read the static buffers sb's replay overwrites."""

import contextlib

import pytest
import torch
from cuda_fakes import on  # noqa: E402

from moekit.experts import graph_lock, graphed
from moekit.experts.graph_lock import GraphPool, capture_stream
from moekit.experts.graphed import GraphCache


class FakeStream:
    """A CUDA stream: what was enqueued on it, and the waits it was told to make (``wait_stream``: everything
    enqueued on the other stream so far, as torch's event recorded at the call)."""

    def __init__(self, device: int, name: str):
        self.device, self.name, self.enqueued, self.waits = torch.device("cuda", device), name, [], []

    def wait_stream(self, other):
        self.waits.append((other.name, list(other.enqueued)))

    def __repr__(self):
        return self.name




@pytest.fixture
def streams(monkeypatch):
    """``current``: device index -> its current FakeStream (set it before a take)."""
    current = {}
    monkeypatch.setattr(graph_lock, "_stream_id", lambda index: id(current[index]))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: current[index])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return current


def _forward(lock, current, dev, stream, what):
    current[dev] = stream
    assert lock.take(on(dev))
    stream.enqueued.append(what)  # the holder's fill / replay / reads of the static buffers
    lock.release()


def test_a_holder_on_another_device_in_between_keeps_the_same_device_ordered(streams):
    lock = GraphPool().lock
    sa, sb, s1 = FakeStream(0, "sa"), FakeStream(0, "sb"), FakeStream(1, "s1")
    _forward(lock, streams, 0, sa, "A")
    _forward(lock, streams, 1, s1, "B")
    _forward(lock, streams, 0, sb, "C")
    assert sb.waits == [("sa", ["A"])]  # round 69: none (the last holder was on cuda:1)
    assert s1.waits == [] and sa.waits == []  # nothing to order across devices: their buffers and graphs are apart


def test_the_single_device_switch_and_the_same_stream(streams):
    lock = GraphPool().lock
    sa, sb = FakeStream(0, "sa"), FakeStream(0, "sb")
    _forward(lock, streams, 0, sa, "A")
    _forward(lock, streams, 0, sa, "A2")  # same stream: stream order, no wait
    _forward(lock, streams, 0, sb, "C")
    assert sa.waits == [] and sb.waits == [("sa", ["A", "A2"])]
    s1 = FakeStream(1, "s1")
    _forward(lock, streams, 1, s1, "B")
    _forward(lock, streams, 0, sb, "D")  # back on cuda:0 on its last holder's stream: nothing to wait for
    assert sb.waits == [("sa", ["A", "A2"])]
    s2 = FakeStream(1, "s2")
    _forward(lock, streams, 1, s2, "E")  # each device keeps its own last holder
    assert s2.waits == [("s1", ["B"])]


def test_the_wait_covers_everything_enqueued_on_the_last_holders_stream(streams):
    # (finding 6, documented in graph_lock's module docstring, unchanged: the event is recorded at the switch)
    lock = GraphPool().lock
    main, side = FakeStream(0, "main"), FakeStream(0, "side")
    _forward(lock, streams, 0, main, "forward")
    main.enqueued.append("unrelated")
    _forward(lock, streams, 0, side, "side forward")
    assert side.waits == [("main", ["forward", "unrelated"])]


def test_a_capturing_stream_takes_nothing(streams, monkeypatch):
    lock = GraphPool().lock
    sa, sb = FakeStream(0, "sa"), FakeStream(0, "sb")
    _forward(lock, streams, 0, sa, "A")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    streams[0] = sb
    assert not lock.take(on(0)) and not lock._lock.locked() and sb.waits == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _forward(lock, streams, 0, sb, "C")
    assert sb.waits == [("sa", ["A"])]


def test_one_capture_stream_per_device(monkeypatch):
    made = []

    class Stream:
        def __init__(self, device=None):
            self.device = device
            made.append(self)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(graph_lock, "_CAPTURE_STREAMS", {})
    s0, s1 = capture_stream(0), capture_stream(1)
    assert (s0.device, s1.device) == (0, 1) and capture_stream(0) is s0 and capture_stream(1) is s1
    assert len(made) == 2


def test_captures_run_on_the_devices_capture_stream(fake_graphs, monkeypatch):
    # round 69: torch.cuda.graph without stream= captured on torch's process-wide default capture stream, made on the
    # device current at the first capture (a cuda:1 layer's capture then ran in a cuda:0 stream)
    given, asked, stream = [], [], object()

    def graph(*args, **kwargs):
        given.append(kwargs.get("stream"))
        return contextlib.nullcontext()

    monkeypatch.setattr(graphed, "capture_stream", lambda index: (asked.append(index), stream)[1])
    monkeypatch.setattr(torch.cuda, "graph", graph)
    cache = GraphCache(8)
    x = torch.randn(2, 4)
    cache.capture(("k",), lambda t: t * 2, (x,))
    assert given == [stream] and asked == [x.device.index]
