"""Internal CUDA graphs for small token counts: eager calls without the host tax.

    out = fn(*inputs)      a layer's whole forward, or its route -> experts part (see .graphed_plan)

An eager call of ``fn`` enqueues a handful of kernels through Python (checks, config lookup, Triton's
argument binding): on an H200 ~300-400 µs of host time at T = 1 against ~50 µs of GPU time for
Qwen3-30B-A3B. :class:`GraphCache` captures ``fn`` once per key (the caller's: token count, input
shapes, dtypes, device) on static input buffers and replays it afterwards::

    copy inputs into the static buffers (one op: copy_ / torch._foreach_copy_); graph.replay(); out.clone()

(where it may, one launch of a graph whose first and last nodes are the copies, set through the CUDA driver:
:mod:`.graphed_raw`).

The first call of a key runs ``fn`` eagerly on the static buffers (compiling the kernels, running its
checks; its result is that call's output), then captures it. A replay runs the same kernels with the
same config as the eager call, so its output is bit-identical to it (a GPU test asserts this).

Token buckets: a call of ``T <= EXACT_GRAPH_TOKENS`` (8) tokens has its own graph (the whole forward where
:mod:`.graphed_plan` allows). A larger call, up to ``max_tokens``, replays the route -> experts graph of
its **bucket** (:func:`graph_bucket`: ``T`` rounded up to a multiple of 8 up to 64, of 32 up to 512, of 128
beyond; at most ``max_tokens``). Its rows go into the first ``T`` rows of the static inputs (one op per
input) and the output is the first ``T`` rows. SPEC §9 makes this exact: on the Triton path a token's
output does not depend on the other rows of the batch, so the real rows have the bits of the plain call
of ``T`` tokens (a GPU test asserts it for every bucket). The padding rows:

- buckets of <= 64 rows (``REPEAT_PAD_TOKENS``): copies of token 0, written with the call's rows by one
  ``index_select`` per input; they touch no expert the call does not touch already (at decode the cost
  is weight bytes per expert, not rows);
- larger buckets: whatever the rows hold (zeros, or earlier calls' inputs): no extra op. Routing keeps
  every id in range for any finite or non-finite logits (a CPU test feeds NaN / inf rows), and a row's
  output is its own, so stale rows cost only their compute; at ``T > 64`` nearly every expert is touched.

Whole-forward graphs stay exact-``T`` only: a folded ``nn.Linear`` (cuBLAS) is not batch invariant. A batch-invariant
gate (moekit's Triton ``RouterLinear``) may start a bucket graph: ``fn(x)`` then computes the logits itself
(:mod:`.graphed_plan`).

When a call is eligible (:meth:`GraphCache.eligible`): ``1 <= T <= max_tokens`` (``<= 8`` for a whole
graph), a CUDA input, not
traced by torch.compile, not inside an outer CUDA-graph capture (the layer's kernels are then captured
into the caller's graph as usual; ``torch.cuda.is_current_stream_capturing``, one runtime query, is the
only exact test and stays), and no autograd wanted (grad disabled, or no input requiring it).
The owner decides at construction whether ``fn`` is graph-safe at all (the layer allows it for the
Triton backend, its local executor, score-based routers and routing functions declared graph-safe:
never for collectives, hash routing's input-id checks or other user routing functions), and whether
buckets may be used (``buckets``: the router is batch invariant; routing functions are not promised to
be, so their layers get exact-T graphs only, ``T <= 8``).

Invalidation: the caller passes ``state``, a hashable image of everything ``fn`` reads outside its
inputs (data pointers of the weights and buffers, routing settings; :func:`watched_fingerprint`).
When it changes, every graph is dropped and recaptured on demand. Weights updated in place
(``load_*``, ``load_state_dict``) need no recapture: a graph reads them by address.

Memory: graphs of one cache share one private pool (``pool``: a :class:`GraphPool` several layers share,
a ``torch.cuda.graph_pool_handle()``, or None for the cache's own). It holds the routing outputs and the
experts' scratch of the largest bucket (T = 64: ~3 MB for Qwen3-30B-A3B, ~10 MB for DeepSeek-V3), rounded
up by the caching allocator to its segment sizes (2 MB / 20 MB), and the exact graphs' static outputs. H200,
eight Qwen3-30B-A3B layers on one pool (``benchmarks/graph_cost.py``): the buckets 128 / 320 / 1024 / 2048
added 20 / 20 / 56 / 100 MiB of reserved memory, the static buffers 17 MiB; a capture costs ~1.7-4 ms per
layer (plus Triton's compile when the bucket's config is new: ~0.7 s once per process). The bucket
graphs read and write row prefixes of three zeroed ``[limit, *]`` buffers (input, logits, output; each
bucket graph copies its result into the output buffer), the pool's when a :class:`GraphPool` is shared,
so a model's layers hold one set between them. Layers that
run one after another on one stream may share a pool (``load_moe_layers`` and ``patch`` give a model's
layers one, and the buckets up to :data:`MODEL_GRAPH_TOKENS`): a replay's inputs are written just before it and
its output is consumed (cloned, or added to the shared experts) just after it, in stream order, and a
graph's intermediates are dead once its replay has run. The memory is released when the caches are
cleared or their owners deleted. Threads: a forward holds the cache's :class:`~.graph_lock.GraphLock` (the
pool's, shared by its layers) from the first fill to the last read; a forward of another thread that finds it
held runs eagerly, and holders on different streams are ordered on the device (round 49).

Outputs: with ``copy=True`` (default) a fresh tensor; ``copy=False`` returns the static output itself,
which the next replay overwrites: only for a caller that consumes it at once (e.g. ``routed + shared``).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch

from .._checks import check_int
from .graphed_raw import RawReplay, keeps_graph, rng_offset
from .graph_lock import GraphLock, GraphPool, capture_stream

_Tensor = torch.Tensor


#: calls of at most this many tokens get a graph of their own T (the whole forward where allowed)
EXACT_GRAPH_TOKENS = 8
#: graphs of at most this many rows pad a call by repeating token 0; larger ones keep the rows there
REPEAT_PAD_TOKENS = 64
#: at most this many caller input keys find their bucket graph directly (:meth:`GraphCache.direct`): a few hundred
#: bytes each; [B, S, H] inputs of every B x S <= 2048 would be ~15k keys. Keys past it take the checked path.
DIRECT_KEYS = 1024


def graph_bucket(t: int, max_tokens: int) -> int:
    """The token count of the graph a call of ``1 <= t <= max_tokens`` tokens replays: ``t`` itself up to
    8, else ``t`` rounded up to a multiple of 8 (<= 64), 32 (<= 512) or 128, and never above ``max_tokens``
    (at most 7, 31 or 127 padding rows: 41 graphs per input key up to T = 2048)."""
    if t <= EXACT_GRAPH_TOKENS:
        return t
    step = 8 if t <= 64 else 32 if t <= 512 else 128
    return min(-(-t // step) * step, max_tokens)


#: ``eager_graph_tokens`` of the layers of a model moekit loads or patches (they share a :class:`GraphPool`, so
#: the buckets' scratch is paid once per model), whatever their expert bytes. Small-expert layers (Qwen3-30B-A3B)
#: are host-bound there (an eager step at T = 1024: ~0.4 ms of GPU against ~0.5-1 ms of host). Large-expert
#: layers are not, but an eager call still leaves the GPU idle while the host enqueues the gate, routing and
#: alignment launches before the first GEMM: H200, round 22, transformers' DeepSeek-V3 block patched, eager ms
#: at 1x1024 / 1x2048: 6.59 / 7.30 with graphs up to 64 tokens, 5.97 / 6.52 up to 2048 (CUDA-graph time of
#: the block: 5.65 / 6.25). Round 11 had capped layers of more than 2 GiB of experts at 64.
MODEL_GRAPH_TOKENS = 2048


def pad_index(t: int, rows: int, device) -> torch.Tensor:
    """``[rows]`` int64: ``0 .. t-1``, then ``rows - t`` zeros (the padding rows repeat token 0)."""
    idx = torch.zeros(rows, dtype=torch.int64)
    idx[:t] = torch.arange(t)
    return idx.to(device)


class _Entry:
    """One captured graph: its static inputs (``copy_`` targets, in call order), static output, and per
    token count ``t`` below its rows the padding (:func:`_padding`) and output rows of a padded replay."""

    __slots__ = ("graph", "inputs", "out", "raw", "_pads")

    def __init__(self, graph, inputs, out, raw: RawReplay | None = None):
        self.graph, self.inputs, self.out = graph, inputs, out
        self.raw = raw  # the replay without torch ops, where it may be used (:mod:`.graphed_raw`)
        self._pads: dict[int, tuple] = {}

    def fill(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Write ``inputs`` (``t`` rows) into the static inputs, return the output rows of this call."""
        t = inputs[0].shape[0]
        if t == self.out.shape[0]:
            _fill(self.inputs, inputs, None)
            return self.out
        hit = self._pads.get(t)
        if hit is None:
            hit = self._pads[t] = (_padding(t, self.inputs), self.out[:t])
        _fill(self.inputs, inputs, hit[0])
        return hit[1]


def _padding(t: int, static: Sequence[torch.Tensor]) -> tuple:
    """``(index | None, first t rows of each static input)`` for a call of ``t`` rows into a graph of more:
    up to 64 rows the padding repeats token 0 (an index for ``index_select``), above it keeps the rows
    already there (zeros, or earlier calls' inputs: see the module docstring)."""
    rows = static[0].shape[0]
    idx = pad_index(t, rows, static[0].device) if rows <= REPEAT_PAD_TOKENS else None
    return idx, [s[:t] for s in static]


def _fill(static: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], padding: tuple | None) -> None:
    """One op per input at most: ``copy_`` (``_foreach_copy_`` for several) into ``static`` (``padding``
    None: as many rows) or into its first rows, or ``index_select`` through the padding's index."""
    idx, heads = padding if padding is not None else (None, static)
    if idx is not None:
        for s, x in zip(static, inputs):
            torch.index_select(x, 0, idx, out=s)
    elif len(inputs) == 1:
        heads[0].copy_(inputs[0])
    else:
        torch._foreach_copy_(heads, inputs)


def tensor_key(x) -> tuple | None:
    """What a replay needs to match exactly: ``(shape, dtype, device index)`` of ``x`` (None for None;
    a plain ``torch.Tensor`` only, a subclass never matches: ``False``)."""
    if x is None:
        return None
    if type(x) is not _Tensor:
        return False
    return x.shape, x.dtype, x.get_device()


def inputs_want_grad(x: torch.Tensor, logits: torch.Tensor | None) -> bool:
    """Autograd would track a call on these inputs (a graph replay would not): grad is enabled and ``x`` or the
    logits require grad."""
    return torch.is_grad_enabled() and (x.requires_grad or (logits is not None and logits.requires_grad))


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

    def __init__(self, max_tokens: int, pool=None, buckets: bool = True):
        self.max_tokens = check_int("eager_graph_tokens", max_tokens, minimum=0)
        self.pool = pool
        self.buckets = bool(buckets)  # False: exact-T graphs only (T <= 8), for a router not batch invariant
        self.off = False  # True while its owner's modules may not be graphed (a swapped-in router or experts)
        self._entries: dict[Hashable, _Entry] = {}
        self._direct: dict[Hashable, _Entry] = {}  # the caller's input key -> the bucket graph it replays
        self._buffers: dict[Hashable, torch.Tensor] = {}  # the bucket graphs' buffers (without a GraphPool)
        self._state: Hashable = None
        self._own_pool = None
        # one forward at a time fills, replays and reads these graphs (the pool's lock where buffers are shared)
        self.lock = pool.lock if isinstance(pool, GraphPool) else GraphLock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def limit(self) -> int:
        """The largest T a call may replay: ``max_tokens``, or at most 8 without buckets."""
        return self.max_tokens if self.buckets else min(self.max_tokens, EXACT_GRAPH_TOKENS)

    def eligible(self, x: torch.Tensor, logits: torch.Tensor | None, tokens: int | None = None,
                 whole: bool = False) -> bool:
        """Whether a call on these inputs may use (or capture) a graph; cheap, no synchronisation.
        ``tokens``: ``T`` when ``x`` is not ``[T, H]``; ``whole``: for a whole-forward graph (exact T <= 8)."""
        t = x.shape[0] if tokens is None else tokens
        limit = self.limit if not whole else min(self.max_tokens, EXACT_GRAPH_TOKENS)
        if torch.compiler.is_compiling() or not x.is_cuda or not 0 < t <= limit:
            return False
        if inputs_want_grad(x, logits):
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
        """Fill the static inputs (one op per input at most), replay, return the output (a copy unless
        ``copy=False``: the static output, which the next replay overwrites). Inputs with fewer rows
        than the graph's (a bucket) fill its first rows; the output is cut to them. The entry's
        :class:`~.graphed_raw.RawReplay` runs the same copies and graph in one launch where it may."""
        if entry.raw is not None:
            out = entry.raw.replay(inputs, copy)
            if out is not None:
                return out
        out = entry.fill(inputs)
        entry.graph.replay()
        return out.clone() if copy else out

    def __call__(self, fn: Callable, x: torch.Tensor, logits: torch.Tensor | None, state: Hashable, *,
                 copy: bool = True, direct: Hashable = None, tag: Hashable = None) -> torch.Tensor:
        """``fn(x, logits)`` for ``x [T, H]``, ``logits [T, E]`` (or ``fn(x)`` when ``logits`` is None: the
        gate is inside), replayed from the graph of ``T``'s bucket (captured on the first call of its key).
        The caller checked :meth:`eligible`. ``state``: see the module docstring. ``direct``: the caller's key
        of this (checked) input; :meth:`direct` then finds this graph by it until the graphs are dropped. ``tag``:
        which of the owner's functions ``fn`` is, when it has several (their graphs are keyed apart)."""
        self.sync_state(state)
        rows = graph_bucket(x.shape[0], self.max_tokens)
        if logits is None:
            key, inputs = (rows, x.dtype, None, x.device, tag), (x,)
        else:
            key, inputs = (rows, x.dtype, logits.dtype, logits.shape[1], x.device, tag), (x, logits)
        entry = self._entries.get(key)
        if entry is None:
            out = self.capture(key, fn, inputs, rows)
        else:
            out = self.replay(entry, inputs, copy)
        # (tensor_key gives False for a subclass: never a direct key)
        if direct and False not in direct and len(self._direct) < DIRECT_KEYS:
            self._direct[direct] = self._entries[key]
        return out

    def direct(self, key: Hashable) -> _Entry | None:
        """The graph a call of the caller's input ``key`` replayed (see :meth:`__call__`), or None."""
        return self._direct.get(key)

    def capture(self, key: Hashable, fn: Callable, inputs: Sequence[torch.Tensor],
                rows: int | None = None) -> torch.Tensor:
        """Run ``fn(*static inputs)`` eagerly (its result is returned: this call's answer), then capture
        it into a graph stored under ``key``. The caller checked :meth:`eligible` and :meth:`sync_state`.
        ``rows``: a bucket's token count (``inputs`` are ``[T, ...]``, ``T <= rows``): the static inputs
        and output are row prefixes of buffers of :attr:`limit` rows (the pool's, when a
        :class:`GraphPool` is shared), filled as :meth:`replay` fills them; the graph copies its output
        into the output buffer."""
        device = inputs[0].device
        with torch.cuda.device(device), torch.inference_mode(False), torch.no_grad():
            # static inputs: plain (never inference) tensors, contiguous, outside the graph's pool
            if rows is None:
                static = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in inputs]
                for s, t in zip(static, inputs):
                    s.copy_(t)
            else:
                static = [self._buffer(f"in{i}", t)[:rows] for i, t in enumerate(inputs)]
                t = inputs[0].shape[0]
                _fill(static, inputs, _padding(t, static) if t < rows else None)
            rng = rng_offset(device)
            out = fn(*static)  # eager warm-up on the static buffers: compiles, checks; this call's answer
            keep = keeps_graph(static, rng_used=rng is None or rng_offset(device) != rng)
            # kept graphs: wrapped for the raw replays (.graphed_raw); torch instantiates its own on first replay
            graph = torch.cuda.CUDAGraph(keep_graph=True) if keep else torch.cuda.CUDAGraph()
            # bucket graphs copy their output into the output buffer (shared by a pool's layers); exact
            # ones keep their own (no copy kernel at decode)
            static_out = None if rows is None or rows <= EXACT_GRAPH_TOKENS else self._buffer("out", out)[:rows]
            # torch.cuda.graph (not bare capture_begin/end): it registers the RNG generators with the
            # capture; bare calls left the default generator's offset tracking broken for later
            # torch.rand calls ("Offset increment outside graph capture", seen on H200); on the device's own capture
            # stream (round 69: torch's default one is made on the device current at the process's first capture)
            with torch.cuda.graph(graph, pool=self._pool(), stream=capture_stream(device.index),
                                  capture_error_mode="thread_local"):
                result = fn(*static)
                if static_out is None:
                    static_out = result
                else:
                    static_out.copy_(result)
            raw = RawReplay.build(graph, static, static_out) if keep else None
        self._entries[key] = _Entry(graph, static, static_out, raw)
        if isinstance(self.pool, GraphPool):
            self.pool.acquire()
        return out if rows is None else out[: inputs[0].shape[0]]

    def _buffer(self, role: str, like: torch.Tensor) -> torch.Tensor:
        """A zeroed ``[limit, width]`` buffer in ``like``'s dtype and device for ``role`` (an input
        position or the output): the shared pool's (one per model) or this cache's own."""
        rows = self.limit
        key = (role, rows, like.shape[1], like.dtype, like.device)
        owner = self.pool._buffers if isinstance(self.pool, GraphPool) else self._buffers
        buf = owner.get(key)
        if buf is None:
            buf = owner[key] = torch.zeros((rows, like.shape[1]), dtype=like.dtype, device=like.device)
        return buf

    def _pool(self):
        if isinstance(self.pool, GraphPool):
            return self.pool.handle()
        if self.pool is not None:
            return self.pool
        if self._own_pool is None:
            self._own_pool = torch.cuda.graph_pool_handle()
        return self._own_pool

    def clear(self) -> None:
        """Drop every graph and static buffer (their memory returns to the caching allocator). The next
        capture takes a fresh pool handle: PyTorch refuses to capture into a pool all of whose graphs are
        gone while a block of it is still held (an internal assert, seen on H200 after recapturing a graph
        with cuBLAS calls: the capture stream's cuBLAS workspace is allocated in the first such capture)."""
        if isinstance(self.pool, GraphPool):
            self.pool.release(len(self._entries))
        self._own_pool = None
        self._entries.clear()
        self._direct.clear()
        self._buffers.clear()
        self._state = None

    def __del__(self) -> None:  # a cache dropped uncleared (its layer deleted) gives its graphs back to the pool
        if isinstance(getattr(self, "pool", None), GraphPool) and self._entries:
            self.pool.release(len(self._entries))

    # copies and pickles carry the settings and the pool's sharing, never graphs (a pool copies as a fresh empty one,
    # once per copy: the layers of a copied model share one, as the originals did; round 65: each got its own,
    # keeping a shared pool's token count)
    def __getstate__(self) -> dict:
        pool = self.pool if isinstance(self.pool, GraphPool) else None  # (a raw graph_pool_handle: never shared)
        return {"max_tokens": self.max_tokens, "pool": pool, "buckets": self.buckets, "off": self.off}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_tokens"], state["pool"], state.get("buckets", True))
        self.off = state.get("off", False)

    def __repr__(self) -> str:
        return f"GraphCache(max_tokens={self.max_tokens}, buckets={self.buckets}, graphs={len(self._entries)})"


def pack_scores(routed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[T, W]`` routed output and ``[T, K]`` float32 weights -> ``[T, C + W]`` of the routed dtype, the weights'
    bits first (``C`` = 2K columns of a 16-bit dtype, K of float32; a float64 output takes them as values)."""
    if routed.element_size() == 2:  # (float() first: a routing function's weights in another dtype)
        w = weights.float().contiguous().view(routed.dtype)
    else:
        w = weights.to(routed.dtype)
    return torch.cat([w, routed], dim=1)


def unpack_scores(packed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_scores` undone: ``(routed [T, W], weights [T, K] float32)``, each a fresh contiguous tensor
    (``packed`` may be a graph's static output, which the next replay overwrites)."""
    c = 2 * k if packed.element_size() == 2 else k
    head = packed[:, :c].contiguous()
    weights = head.view(torch.float32) if packed.element_size() == 2 else head.float()
    return packed[:, c:].contiguous(), weights
