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
last holder's makes its stream wait for the work the last holder enqueued (an event recorded on that stream at
the switch; a holder on the same stream as the last pays nothing, stream order suffices).
"""

from __future__ import annotations

import threading
from typing import Hashable

import torch


def _stream_id(device: torch.device) -> int:
    """The raw handle of the current stream of ``device`` (CUDA; no Stream object where torch has the raw getter)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


class GraphLock:
    """A non-blocking lock over a set of graphs, ordering its holders' CUDA streams (see the module docs)."""

    __slots__ = ("_lock", "_last")

    def __init__(self):
        self._lock = threading.Lock()
        self._last: torch.cuda.Stream | None = None  # the last holder's CUDA stream

    def take(self, x: torch.Tensor) -> bool:
        """Hold the graphs for a forward on ``x``; False (nothing held) when another caller holds them."""
        if not self._lock.acquire(blocking=False):
            return False
        if isinstance(x, torch.Tensor) and x.is_cuda:  # (a wrong argument: the forward's checks name it)
            last = self._last
            if last is None or last.device != x.device or last.cuda_stream != _stream_id(x.device):
                if torch.cuda.is_current_stream_capturing():
                    # a user's capture (on its own stream): no graphs are replayed inside it, and its stream must not
                    # wait on work outside the capture; this forward runs the plain kernels
                    self._lock.release()
                    return False
                stream = torch.cuda.current_stream(x.device)
                if last is not None and last.device == x.device:
                    stream.wait_stream(last)  # the last holder's replays and reads, enqueued before it let go
                self._last = stream
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
        if self._live == 0:
            self._handle = None

    # a copied or pickled layer gets a pool of its own
    def __deepcopy__(self, memo):
        return GraphPool()

    def __reduce__(self):
        return GraphPool, ()
