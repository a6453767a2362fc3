"""What layers share of their internal CUDA graphs: a :class:`GraphPool` (memory pool, static buffers) and the
:class:`GraphLock` saying who may use a set of graphs now: one caller at a time, in stream order.

A graph has fixed input and output buffers (one set per layer, or per model where the layers share a
:class:`~moekit.experts.graphed.GraphPool`), and a forward fills them, replays, and reads the output (a bucket
graph's static output is read later in the forward, by the shared experts' sum). Two threads doing that at once
overwrite each other's inputs and outputs: round 49's audit measured 48 of 300 calls wrong on one layer from two
threads (H100), and two layers of one pool corrupting each other.

:meth:`GraphLock.take` is non-blocking: a caller that finds the graphs in use runs its forward eagerly (the same
kernels; SPEC §9 makes graph replays and eager calls the same bits), so threads never wait on each other's host
work. Holders on different CUDA streams are ordered on the device too: a holder whose current stream is not the
last holder's on the same device makes its stream wait for that stream (``wait_stream``: an event recorded on the
last holder's stream at the switch). That waits for everything enqueued there up to the switch: the last holder's
replays and reads, and also any work enqueued on that stream after the holder let go (a layer run on a side stream
to overlap with the main stream waits, at each switch, for the main stream's work so far, unrelated work too). A
holder on the same stream as the last pays nothing: stream order suffices. The last holder is kept per device
(round 69: one last holder for all devices let a pool's layers on two GPUs skip the wait: cuda:0 stream A, then a
cuda:1 call, then cuda:0 stream B ordered B after nothing, though A's replay could still be reading the static
buffers B's replay overwrote).

Captures run on :func:`capture_stream`, one side stream per device (round 69: torch.cuda.graph's default capture
stream is one for the process, made on the device current at the first capture: a cuda:1 layer's capture after a
cuda:0 one ran in a cuda:0 stream).
"""

from __future__ import annotations

import threading
from typing import Hashable

import torch


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # (device index) -> the current stream's handle


def _stream_id(index: int) -> int:
    """The raw handle of the current stream of CUDA device ``index`` (no Stream object where torch has the raw
    getter)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


#: :func:`capture_stream`'s streams, by device index
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(index: int) -> torch.cuda.Stream:
    """The side stream the internal graphs of CUDA device ``index`` are captured on, made at its first capture.

    One per device for the process, as torch's own default capture stream is one for the process: every cache and
    pool of a device captures on the same stream (so cuBLAS calls folded into the graphs allocate one workspace for
    that stream, not one per pool, and a :class:`GraphCache` without a :class:`GraphPool` needs no stream of its
    own). Nothing else is kept: a capture synchronises the device first (``torch.cuda.graph``) and leaves nothing
    pending on the stream."""
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS.setdefault(index, torch.cuda.Stream(device=index))
    return stream


class GraphLock:
    """A non-blocking lock over a set of graphs, ordering its holders' CUDA streams (see the module docs)."""

    __slots__ = ("_lock", "_last", "_last_id")

    def __init__(self):
        self._lock = threading.Lock()
        self._last: dict[int, tuple[int, torch.cuda.Stream]] = {}  # device index -> its last holder's (raw, stream)
        self._last_id: tuple[int, int] | None = None  # the last holder's (device index, raw handle): the per-call test

    def take(self, x: torch.Tensor) -> bool:
        """Hold the graphs for a forward on ``x``; False (nothing held) when another caller holds them. The per-call
        cost on the last holder's stream: one lock, the device index and the raw stream handle (round 51: ints, not
        ``torch.device`` / ``Stream`` objects)."""
        if not self._lock.acquire(blocking=False):
            return False
        if isinstance(x, torch.Tensor) and x.is_cuda:  # (a wrong argument: the forward's checks name it)
            index = x.get_device()
            now = (index, _stream_id(index))
            if now != self._last_id:
                if torch.cuda.is_current_stream_capturing():
                    # a user's capture (on its own stream): no graphs are replayed inside it, and its stream must not
                    # wait on work outside the capture; this forward runs the plain kernels
                    self._lock.release()
                    return False
                last = self._last.get(index)  # this device's last holder (round 69: not the last of any device)
                if last is None or last[0] != now[1]:
                    stream = torch.cuda.current_stream(index)
                    if last is not None:
                        stream.wait_stream(last[1])  # everything enqueued on the last holder's stream so far
                    self._last[index] = (now[1], stream)
                self._last_id = now
        return True

    def release(self) -> None:
        self._lock.release()

    # copies and pickles get a lock of their own
    def __deepcopy__(self, memo):
        return GraphLock()

    def __reduce__(self):
        return GraphLock, ()


class GraphPool:
    """One CUDA-graph memory pool shared by several layers' caches (made on first use, so building
    layers on a CPU-only machine never touches CUDA). Its layers share static buffers, so they share one
    :class:`GraphLock` too: one forward at a time replays (others run eagerly), in stream order."""

    __slots__ = ("_handle", "_buffers", "_live", "lock")

    def __init__(self):
        self._handle = None
        self._buffers: dict[Hashable, torch.Tensor] = {}  # the layers' static input / output rows
        self._live = 0  # graphs captured into the current handle and not dropped
        self.lock = GraphLock()

    def handle(self):
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle

    def acquire(self) -> None:
        self._live += 1

    def release(self, graphs: int) -> None:
        """``graphs`` were dropped; when none is left the next capture takes a fresh handle (see
        :meth:`~.graphed.GraphCache.clear`)."""
        self._live = max(0, self._live - graphs)
        if self._live == 0:  # no graph reads the static buffers any more: their memory goes too (round 64: kept)
            self._handle = None
            self._buffers.clear()

    # a copied or pickled layer gets a pool of its own
    def __deepcopy__(self, memo):
        return GraphPool()

    def __reduce__(self):
        return GraphPool, ()
