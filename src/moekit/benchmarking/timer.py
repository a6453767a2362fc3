"""The one timer of moekit's benchmarks: a median over repeated calls, in microseconds or milliseconds.

Two ways to time a call on a CUDA device, both reporting a median (robust to a stray slow replay):

- :func:`time_graph`: ``n`` calls over ``R`` rotating input sets captured in ONE CUDA graph, replayed
  ``replays`` times; ``us = median(replay time) / n``. Launch overhead is gone and rotating inputs
  keep the weights of one call from being served out of L2 by the previous one (no L2 flush between calls or
  replays: the sets' weights must outgrow L2; the bench's smallest cycle, Qwen3-30B-A3B 4-bit at T = 1, touches
  ~20 MB per call, ~80 MB over its 4 sets, against the H100 / H200's 50 MB L2). This is what
  ``moekit bench`` and ``moekit tune`` report. (``triton.testing.do_bench_cudagraph`` times one
  closure without rotating inputs, so it is not used.)
- :func:`time_events`: CUDA events around each eager call (host syncs and collectives included),
  ``ms = median over iters``; on a CPU device the same with ``time.perf_counter``. For scripts that
  must time what a caller sees: ``benchmarks/bench_parallel.py``, ``benchmarks/bench_transformers.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import statistics
import time
from typing import Callable, Sequence

import torch


#: a call at least this long (µs, the eager estimate) is compute-heavy: :func:`time_graph` warms it for ``settle_ms``
SETTLE_ABOVE_US = 1000.0


def time_graph(fn: Callable, inputs: Sequence[tuple], target_ms: float = 25.0, replays: int = 7,
               max_calls: int = 200, abort_above_us: float | None = None, warm_ms: float = 0.0,
               settle_ms: float = 0.0, clocks: list | None = None, device=None) -> float:
    """Median µs per call of ``fn(*inputs[i % R])``, ``n`` calls captured in one CUDA graph.

    ``n`` is chosen so that one replay lasts about ``target_ms`` (at least ``R``, at most ``max_calls``).
    inputs: R tuples of arguments (``[()]`` for a closure). Needs a CUDA device.
    ``abort_above_us``: when the eager estimate (µs per call, host time included) already exceeds it,
    return that estimate without capturing a graph (the tuner's early stop for clear losers).
    ``warm_ms``: replay the graph for about this long before the timed replays, so that every timed call runs at
    the clocks a busy GPU holds (after the capture's idle gap an H200 first runs a compute-bound step up to ~7 %
    faster: round 16's probe, ``benchmarks/experts_row_probe.py``, and round 17's alternated profiles).
    ``settle_ms``: the warm-up of a compute-heavy call (eager estimate >= :data:`SETTLE_ABOVE_US`), when longer than
    ``warm_ms``. Such calls hold an H200 at its 700 W power cap, whose SM clock settles after about a second of load
    (median ~1.4 GHz, dipping to ~1 GHz; the first 0.2 s after an idle gap ran 2-4 % faster: round 29,
    ``benchmarks/power_probe.py``), so a row timed sooner depends on what ran before it.
    ``clocks``: if given, the SM clock (MHz, :func:`sm_clock_mhz`) read after each timed replay is appended to it.
    ``device``: the CUDA device the calls, the graph and the events are on, made current around it all (None: the
    device of the first CUDA tensor in ``inputs[0]``, else the current one; round 69: a cuda:1 call timed with
    cuda:0 current captured and timed on cuda:0).
    """
    with on_device(device, inputs):
        est = eager_estimate_ms(fn, inputs)
        if abort_above_us is not None and est * 1000.0 > abort_above_us:
            return est * 1000.0
        n = int(min(max_calls, max(len(inputs), round(target_ms / est))))
        graph = capture_graph(fn, inputs, n)
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        graph.replay()
        t1.record()
        torch.cuda.synchronize()
        warm = max(warm_ms, settle_ms) if est * 1000.0 >= SETTLE_ABOVE_US else warm_ms
        for _ in range(int(warm // max(t0.elapsed_time(t1), 1e-3))):
            graph.replay()
        times = []
        for _ in range(replays):
            t0.record()
            graph.replay()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1) * 1000.0 / n)
            if clocks is not None:
                clocks.append(sm_clock_mhz())
        del graph
    return statistics.median(times)


def eager_estimate_ms(fn: Callable, inputs: Sequence[tuple], device=None) -> float:
    """Milliseconds per eager call of ``fn`` over the input sets (host time included), after one warm-up call per
    set (compile, allocate); at least 1 µs. ``device``: as :func:`time_graph`'s."""
    with on_device(device, inputs):
        torch.cuda.synchronize()
        for inp in inputs:
            fn(*inp)
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for inp in inputs:
            fn(*inp)
        t1.record()
        torch.cuda.synchronize()
    return max(t0.elapsed_time(t1) / len(inputs), 1e-3)


def capture_graph(fn: Callable, inputs: Sequence[tuple], n: int, device=None) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``n`` calls ``fn(*inputs[i % R])`` (captured on a side stream after a call there).
    ``device``: as :func:`time_graph`'s."""
    with on_device(device, inputs):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            fn(*inputs[0])
            with torch.cuda.graph(graph, stream=stream):
                for i in range(n):
                    fn(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
    return graph


def on_device(device, inputs: Sequence[tuple] = ()) -> contextlib.AbstractContextManager:
    """``torch.cuda.device`` of ``device`` (None: of the first CUDA tensor in ``inputs[0]``, tuples and lists in it
    looked into) where that is a CUDA device with an index (``"cuda:1"``); else a context that does nothing
    (``"cuda"``, ``"cpu"``, no CUDA tensor: the current device stays). Never touches ``torch.cuda`` otherwise."""
    if device is None:
        device = _first_cuda_device(inputs[0] if inputs else ())
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is not None:
            return torch.cuda.device(device)
    return contextlib.nullcontext()


def _first_cuda_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return torch.device("cuda", a.get_device())
        if isinstance(a, (tuple, list)) and (found := _first_cuda_device(a)) is not None:
            return found
    return None


def runs_on_device(fn: Callable) -> Callable:
    """Decorator of a benchmark helper taking a ``device`` argument: the helper runs with that device current
    (:func:`on_device`; round 69: ``run_bench(device="cuda:1")`` made its tensors there, and its streams, events,
    graphs and Triton launches on the current device)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with on_device(bound.arguments.get("device")):
            return fn(*args, **kwargs)

    return run


def sm_clock_mhz(device=None) -> int | None:
    """The GPU's current SM clock in MHz (NVML through ``torch.cuda.clock_rate``), None where NVML is missing."""
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # noqa: BLE001 - no pynvml / no NVML: the row just goes without it
        return None


def time_events(fn: Callable[[], object], iters: int, warmup: int = 2, device=None,
                before: Callable[[], object] | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` eager calls after ``warmup`` calls.

    CUDA events on a CUDA ``device`` (the default when CUDA is available), ``time.perf_counter``
    otherwise. ``before`` runs once after the warm-up, e.g. ``torch.distributed.barrier`` so that all
    ranks start together.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda and torch.device(device or "cuda").index is not None:  # events and syncs on that device (cuda:1), not
        # on whichever one is current
        with torch.cuda.device(torch.device(device)):
            return time_events(fn, iters, warmup, "cuda", before)  # (the current one now)
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    if before is not None:
        before()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
