"""Internal CUDA graphs of a layer's routed path for small token counts: eager calls without the host tax.

    routed = fn(x [T, H], logits [T, N])        route -> experts (+ zero experts, output scale): moekit's ops

An eager call of ``fn`` enqueues a handful of kernels through Python (checks, config lookup, Triton's
argument binding): on an H200 ~300-400 µs of host time at T = 1 against ~50 µs of GPU time for
Qwen3-30B-A3B. :class:`GraphCache` captures ``fn`` once per token count ``T <= max_tokens`` (and input
dtypes, logit width, device) on static input buffers and replays it afterwards::

    static_x.copy_(x); static_logits.copy_(logits); graph.replay(); out = static_out (.clone())

The first call of a key runs ``fn`` eagerly on the static buffers (compiling the kernels; its result is
that call's output), then captures it. A replay runs the same kernels with the same config as the eager
call, so its output is bit-identical to it (a GPU test asserts this).

When a call is eligible (:meth:`GraphCache.eligible`): ``1 <= T <= max_tokens``, a CUDA input, not
traced by torch.compile, not inside an outer CUDA-graph capture (the layer's kernels are then captured
into the caller's graph as usual), and no autograd wanted (grad disabled, or no input requiring it).
The owner decides at construction whether ``fn`` is graph-safe at all (the layer allows it for the
Triton backend, its local executor and score-based routers: never for collectives, hash routing's
input-id checks or user routing functions).

Invalidation: the caller passes ``state``, a hashable image of everything ``fn`` reads outside its
inputs (data pointers, dtypes and shapes of the weights and buffers, routing settings). When it
changes, every graph is dropped and recaptured on demand. Weights updated in place (``load_*``,
``load_state_dict``) need no recapture: a graph reads them by address.

Memory: graphs of one cache share one private pool (``pool``, a ``torch.cuda.graph_pool_handle()``;
by default the cache's own). It holds the routing outputs and the experts' scratch of the largest T
(for T <= 8: ~2 MB for Qwen3-30B-A3B, ~5 MB for DeepSeek-V3), rounded up by the caching allocator to
its segment sizes (2 MB / 20 MB), plus each T's static input and output rows. Several layers may share
one pool when they run one after another on one stream (each output is consumed before the next
replay). The memory is released when the cache is cleared or its owner is deleted.

Outputs: with ``copy=True`` (default) a fresh tensor; ``copy=False`` returns the static output itself,
which the next replay overwrites: only for a caller that consumes it at once (e.g. ``routed + shared``).
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch

from .._checks import check_int


class _Entry:
    __slots__ = ("graph", "x", "logits", "out")

    def __init__(self, graph, x, logits, out):
        self.graph, self.x, self.logits, self.out = graph, x, logits, out


class GraphCache:
    """CUDA graphs of ``fn(x, logits) -> out`` per token count ``T <= max_tokens`` (0 disables).

    Holds no reference to its owner: ``fn`` and ``state`` are passed at each call.
    """

    def __init__(self, max_tokens: int, pool=None):
        self.max_tokens = check_int("eager_graph_tokens", max_tokens, minimum=0)
        self.pool = pool
        self._entries: dict[tuple, _Entry] = {}
        self._state: Hashable = None
        self._own_pool = None

    def __len__(self) -> int:
        return len(self._entries)

    def eligible(self, x: torch.Tensor, logits: torch.Tensor) -> bool:
        """Whether a call on these inputs may use (or capture) a graph; cheap, no synchronisation."""
        if torch.compiler.is_compiling() or not x.is_cuda or not 0 < x.shape[0] <= self.max_tokens:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or logits.requires_grad):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def __call__(self, fn: Callable, x: torch.Tensor, logits: torch.Tensor, state: Hashable, *,
                 copy: bool = True) -> torch.Tensor:
        """``fn(x, logits)``, replayed from a graph (captured on the first call of this key).
        The caller checked :meth:`eligible`. ``state``: see the module docstring."""
        if state != self._state:
            self.clear()
            self._state = state
        key = (x.shape[0], x.dtype, logits.dtype, logits.shape[1], x.device)
        entry = self._entries.get(key)
        if entry is None:
            out, self._entries[key] = self._capture(fn, x, logits)
            return out
        entry.x.copy_(x)
        entry.logits.copy_(logits)
        entry.graph.replay()
        return entry.out.clone() if copy else entry.out

    def _capture(self, fn: Callable, x: torch.Tensor, logits: torch.Tensor):
        device = x.device
        with torch.cuda.device(device), torch.inference_mode(False), torch.no_grad():
            # static inputs: plain (never inference) tensors, contiguous, outside the graph's pool
            sx = torch.empty(x.shape, dtype=x.dtype, device=device)
            sl = torch.empty(logits.shape, dtype=logits.dtype, device=device)
            sx.copy_(x)
            sl.copy_(logits)
            out = fn(sx, sl)  # eager warm-up on the static buffers: compiles; this call's answer
            graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph (not bare capture_begin/end): it registers the RNG generators with the
            # capture; bare calls left the default generator's offset tracking broken for later
            # torch.rand calls ("Offset increment outside graph capture", seen on H200)
            with torch.cuda.graph(graph, pool=self._pool(), capture_error_mode="thread_local"):
                static_out = fn(sx, sl)
        return out, _Entry(graph, sx, sl, static_out)

    def _pool(self):
        if self.pool is not None:
            return self.pool
        if self._own_pool is None:
            self._own_pool = torch.cuda.graph_pool_handle()
        return self._own_pool

    def clear(self) -> None:
        """Drop every graph and static buffer (their memory returns to the caching allocator)."""
        self._entries.clear()
        self._state = None

    # copies and pickles carry the settings, never graphs or a pool
    def __getstate__(self) -> dict:
        return {"max_tokens": self.max_tokens, "pool": None}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_tokens"], state["pool"])

    def __repr__(self) -> str:
        return f"GraphCache(max_tokens={self.max_tokens}, graphs={len(self._entries)})"
