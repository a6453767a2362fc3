"""``moekit bench --eager``: what an eager call costs the host, against the GPU time of the same call.

Per model shape and token count ``T`` (default 1, 8, 64), for each call below::

    host_us = median over 5 blocks of (perf_counter after 100 calls back to back - before) / 100
              (no sync inside a block; one sync after each)
    us      = time_graph(call)      the same call replayed in a CUDA graph: its GPU time

- ``eager-linear``: one ``F.linear`` [T, H] x [H, H] (the floor of one op)
- ``eager-select_experts``: ``layer.router.select_experts(x, logits)``
- ``eager-fused_experts``: ``moekit.fused_experts(x, w13, w2, w, ids, ...)`` (the public front)
- ``eager-layer``: the ``FusedMoE`` forward as users call it (internal CUDA graph for
  ``T <= eager_graph_tokens``)
- ``eager-layer-nograph``: the same layer with ``eager_graph_tokens=0`` (plain kernels)

An eager call is host-bound when ``host_us > us``: the GPU then idles between calls. Targets
(issue #11): ``eager-layer`` host_us <= 40 for every shape at T <= 8, and <= its ``us`` for Qwen3-30B-A3B.
Rows join ``moekit bench``'s JSON (``impl`` above, ``host_us`` added).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from .._checks import DTYPE_SHORT
from .shapes import ModelShape
from .timer import runs_on_device, time_graph

EAGER_TOKENS = (1, 8, 64)


def back_to_back(fn, inputs, calls: int, cuda: bool = True) -> tuple[float, float]:
    """(host µs, wall µs) per call of ``calls`` calls of ``fn(*inputs[i % R])`` enqueued back to back: the
    host's enqueue time (``perf_counter``, no synchronisation inside), and the time until the last call has
    finished (one synchronisation at the end when ``cuda``: about max(host, GPU) per call, what a model loop
    sees). The caller synchronises before. Python's garbage collector runs once before and is paused during
    the calls, as ``timeit`` does by default: a collection landing in the timed calls measures the process's
    heap, not the call."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
    finally:
        if was_enabled:
            gc.enable()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def time_host(fn, inputs, calls: int = 100, warmup: int = 5, repeats: int = 5) -> float:
    """Host µs per call: the median over ``repeats`` blocks of :func:`back_to_back` (``calls`` calls of
    ``fn(*inputs[i % R])`` enqueued back to back, one synchronisation after each block). (One block varied by
    ±20 µs per call between runs on the H200 host; the median of blocks is what the targets are read against.)"""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    return statistics.median(back_to_back(fn, inputs, calls)[0] for _ in range(repeats))


def eager_calls(m: ModelShape, layer, plain, t: int, dtype, device, rotations: int = 4):
    """[(impl, fn, inputs)] of the calls above for ``t`` tokens (``plain``: the layer without graphs)."""
    import moekit

    sets = [(torch.randn(t, m.H, device=device, dtype=dtype), torch.randn(t, m.E + m.Z, device=device))
            for _ in range(rotations)]
    re = layer.routed_experts
    with torch.no_grad():
        routed = [layer.router.select_experts(x, lg) for x, lg in sets]
    lin = torch.randn(m.H, m.H, device=device, dtype=dtype) * m.H**-0.5
    b1, b2 = re.w13_bias, re.w2_bias

    def experts(x, w, ids):
        return moekit.fused_experts(x, re.w13_weight, re.w2_weight, w, ids, activation=m.act, w1_bias=b1,
                                    w2_bias=b2, swiglu_limit=layer.moe_config.swiglu_limit, backend="triton")

    return [
        ("eager-linear", lambda x, lg: torch.nn.functional.linear(x, lin), sets),
        ("eager-select_experts", lambda x, lg: layer.router.select_experts(x, lg), sets),
        ("eager-fused_experts", experts, [(x, w, ids) for (x, _), (w, ids) in zip(sets, routed)]),
        ("eager-layer", lambda x, lg: layer(x, lg), sets),
        ("eager-layer-nograph", lambda x, lg: plain(x, lg), sets),
    ]


@runs_on_device
def bench_eager(m: ModelShape, layer, tokens, dtype, device, log) -> list[dict]:
    """Rows ``{model, tokens, impl, us, host_us, ...}`` for shape ``m`` (``layer``: its FusedMoE)."""
    import moekit

    bias = getattr(layer.router, "e_score_correction_bias", None)
    plain = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=dtype, e_score_correction_bias=bias, device=device,
                            backend="triton", eager_graph_tokens=0, **m.layer_kwargs())
    re = layer.routed_experts
    plain.routed_experts.adopt_weights(re.w13_weight, re.w2_weight, re.w13_bias, re.w2_bias)
    rows, name = [], torch.cuda.get_device_name(device)
    for t in tokens:
        with torch.no_grad():
            for impl, fn, inputs in eager_calls(m, layer, plain, t, dtype, device):
                host = time_host(fn, inputs)
                gpu = time_graph(fn, inputs, target_ms=10.0)
                rows.append(dict(model=m.name, tokens=t, impl=impl, us=round(gpu, 2), host_us=round(host, 2),
                                 pct_roofline=None, device=name, dtype=str(dtype).replace("torch.", ""),
                                 quant=DTYPE_SHORT.get(dtype), eager_graph_tokens=layer.eager_graph_tokens))
                log(f"{m.name:15s} T={t:5d} {impl:22s} host {host:8.1f} us   gpu {gpu:8.1f} us"
                    f"{'   HOST-BOUND' if host > gpu else ''}")
    del plain
    return rows


def summarize_eager(rows) -> list[str]:
    """The issue #11 targets per shape: ``eager-layer`` host µs at T <= 8 (<= 40; Qwen3: <= GPU µs)."""
    lines = []
    for r in rows:
        if r["impl"] != "eager-layer" or r["tokens"] > 8:
            continue
        ok = r["host_us"] <= 40 and (r["model"] != "qwen3-30b-a3b" or r["host_us"] <= r["us"])
        lines.append(f"eager target {r['model']:15s} T={r['tokens']:3d}: host {r['host_us']:7.1f} us, "
                     f"gpu {r['us']:8.1f} us -> {'met' if ok else 'MISSED'}")
    return lines
