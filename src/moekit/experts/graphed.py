"""Internal CUDA graphs for small token counts: eager calls without the host tax.

    out = fn(*inputs)      a layer's whole forward, or its route -> experts part (see .graphed_plan)

An eager call of ``fn`` enqueues a handful of kernels through Python (checks, config lookup, Triton's
argument binding): on an H200 ~300-400 µs of host time at T = 1 against ~50 µs of GPU time for
Qwen3-30B-A3B. :class:`GraphCache` captures ``fn`` once per key (the caller's: token count, input
shapes, dtypes, device) on static input buffers and replays it afterwards::

    copy inputs into the static buffers (one op: copy_ / torch._foreach_copy_); graph.replay(); out.clone()

The first call of a key runs ``fn`` eagerly on the static buffers (compiling the kernels, running its
checks; its result is that call's output), then captures it. A replay runs the same kernels with the
same config as the eager call, so its output is bit-identical to it (a GPU test asserts this).

When a call is eligible (:meth:`GraphCache.eligible`): ``1 <= T <= max_tokens``, a CUDA input, not
traced by torch.compile, not inside an outer CUDA-graph capture (the layer's kernels are then captured
into the caller's graph as usual; ``torch.cuda.is_current_stream_capturing``, one runtime query, is the
only exact test and stays), and no autograd wanted (grad disabled, or no input requiring it).
The owner decides at construction whether ``fn`` is graph-safe at all (the layer allows it for the
Triton backend, its local executor and score-based routers: never for collectives, hash routing's
input-id checks or user routing functions).

Invalidation: the caller passes ``state``, a hashable image of everything ``fn`` reads outside its
inputs (data pointers of the weights and buffers, routing settings; :func:`watched_fingerprint`).
When it changes, every graph is dropped and recaptured on demand. Weights updated in place
(``load_*``, ``load_state_dict``) need no recapture: a graph reads them by address.

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

from typing import Callable, Hashable, Sequence

import torch

from .._checks import check_int

_Tensor = torch.Tensor


class _Entry:
    """One captured graph: its static inputs (``copy_`` targets, in call order) and static output."""

    __slots__ = ("graph", "inputs", "out")

    def __init__(self, graph, inputs, out):
        self.graph, self.inputs, self.out = graph, inputs, out


def tensor_key(x) -> tuple | None:
    """What a replay needs to match exactly: ``(shape, dtype, device index)`` of ``x`` (None for None;
    a plain ``torch.Tensor`` only, a subclass never matches: ``False``)."""
    if x is None:
        return None
    if type(x) is not _Tensor:
        return False
    return x.shape, x.dtype, x.get_device()


def watched_fingerprint(tensor_dicts: Sequence[dict], child_dicts: Sequence[dict] = ()) -> tuple:
    """The data pointers of the tensors in ``tensor_dicts`` (modules' ``_parameters`` / ``_buffers``,
    read directly: no generators) and the identity of the modules in ``child_dicts`` (``_modules``):
    any re-assignment, ``set_``, ``.data =`` to new memory, ``.to()`` or ``load_state_dict(assign=True)``
    changes it; in-place updates do not."""
    ptrs = [t.data_ptr() for d in tensor_dicts for t in d.values() if t is not None]
    ptrs.extend([m for d in child_dicts for m in d.values()])
    return tuple(ptrs)


class GraphCache:
    """CUDA graphs of ``fn(*inputs) -> out`` per input key, for token counts ``T <= max_tokens``
    (0 disables). Holds no reference to its owner: ``fn`` and ``state`` are passed by the caller.
    """

    def __init__(self, max_tokens: int, pool=None):
        self.max_tokens = check_int("eager_graph_tokens", max_tokens, minimum=0)
        self.pool = pool
        self._entries: dict[Hashable, _Entry] = {}
        self._state: Hashable = None
        self._own_pool = None

    def __len__(self) -> int:
        return len(self._entries)

    def eligible(self, x: torch.Tensor, logits: torch.Tensor | None, tokens: int | None = None) -> bool:
        """Whether a call on these inputs may use (or capture) a graph; cheap, no synchronisation.
        ``tokens``: ``T`` when ``x`` is not ``[T, H]``."""
        t = x.shape[0] if tokens is None else tokens
        if torch.compiler.is_compiling() or not x.is_cuda or not 0 < t <= self.max_tokens:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (logits is not None and logits.requires_grad)):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def sync_state(self, state: Hashable) -> None:
        """Drop every graph when ``state`` (see the module docstring) differs from the captured one."""
        if state != self._state:
            self.clear()
            self._state = state

    def lookup(self, key: Hashable) -> _Entry | None:
        return self._entries.get(key)

    @staticmethod
    def replay(entry: _Entry, inputs: Sequence[torch.Tensor], copy: bool = True) -> torch.Tensor:
        """Copy ``inputs`` into the static inputs (one op), replay, return the output (a copy unless
        ``copy=False``: the static output, which the next replay overwrites)."""
        if len(inputs) == 1:
            entry.inputs[0].copy_(inputs[0])
        else:
            torch._foreach_copy_(entry.inputs, inputs)
        entry.graph.replay()
        return entry.out.clone() if copy else entry.out

    def __call__(self, fn: Callable, x: torch.Tensor, logits: torch.Tensor, state: Hashable, *,
                 copy: bool = True) -> torch.Tensor:
        """``fn(x, logits)``, replayed from a graph (captured on the first call of this key).
        The caller checked :meth:`eligible`. ``state``: see the module docstring."""
        self.sync_state(state)
        key = (x.shape[0], x.dtype, logits.dtype, logits.shape[1], x.device)
        entry = self._entries.get(key)
        if entry is None:
            return self.capture(key, fn, (x, logits))
        return self.replay(entry, (x, logits), copy)

    def capture(self, key: Hashable, fn: Callable, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run ``fn(*static inputs)`` eagerly (its result is returned: this call's answer), then capture
        it into a graph stored under ``key``. The caller checked :meth:`eligible` and :meth:`sync_state`."""
        device = inputs[0].device
        with torch.cuda.device(device), torch.inference_mode(False), torch.no_grad():
            # static inputs: plain (never inference) tensors, contiguous, outside the graph's pool
            static = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in inputs]
            for s, t in zip(static, inputs):
                s.copy_(t)
            out = fn(*static)  # eager warm-up on the static buffers: compiles, checks; this call's answer
            graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph (not bare capture_begin/end): it registers the RNG generators with the
            # capture; bare calls left the default generator's offset tracking broken for later
            # torch.rand calls ("Offset increment outside graph capture", seen on H200)
            with torch.cuda.graph(graph, pool=self._pool(), capture_error_mode="thread_local"):
                static_out = fn(*static)
        self._entries[key] = _Entry(graph, static, static_out)
        return out

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
