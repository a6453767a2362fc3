"""Would running the shared experts on a side stream, beside the routed experts, shorten an eager layer call?

A DeepSeek-V3-shaped moekit layer (routed experts only) and a DeepSeek-V3 shared MLP (one expert, I = 2048, bf16
``nn.Linear``\\ s), at T = 1024 / 2048 / 4096 (above the eager graphs' limit, where a transformers block runs them
eagerly). Per T, alternated twice, CUDA events:

- ``serial``: ``layer(x) + shared(x)`` on one stream (what the runner does today);
- ``overlap``: ``shared(x)`` on a side stream forked before ``layer(x)``, joined before the add.

Each variant is timed per call (events around one call, as ``bench_transformers.py``'s eager rows) and back to back
(N calls enqueued, wall per call). The outputs of the two must be bit-identical. Then a cProfile of 30 eager calls
at T = 2048: where the host time of a call goes.

    PYTHONPATH=src python benchmarks/shared_overlap_probe.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys

import torch

from moekit.benchmarking import MODELS
from moekit.benchmarking.bench import build_layer


class SharedMLP(torch.nn.Module):
    """silu(x W_g) * (x W_u) -> W_d, as DeepseekV3MLP."""

    def __init__(self, h: int, i: int, dev):
        super().__init__()
        mk = lambda a, b: torch.nn.Linear(a, b, bias=False, device=dev, dtype=torch.bfloat16)  # noqa: E731
        self.gate_proj, self.up_proj, self.down_proj = mk(h, i), mk(h, i), mk(i, h)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def main() -> int:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = MODELS["deepseek-v3"]
    layer = build_layer(m, torch.bfloat16, dev)
    layer.eager_graph_tokens = 0
    shared = SharedMLP(m.H, m.I, dev)
    gate = torch.nn.Linear(m.H, m.E, bias=False, device=dev, dtype=torch.bfloat16)  # the router's logits
    side = torch.cuda.Stream(dev)

    def routed(x):
        return layer(x, gate(x))

    def serial(x):
        return routed(x) + shared(x)

    def overlap(x):
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            s = shared(x)
        r = routed(x)
        main.wait_stream(side)
        x.record_stream(side)
        s.record_stream(main)
        return r + s

    def per_call(fn, x, n=20):
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn(x)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def back_to_back(fn, x, n=20):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn(x)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / n

    with torch.no_grad():
        for t in (1024, 2048, 4096):
            x = torch.randn(t, m.H, device=dev, dtype=torch.bfloat16)
            for fn in (serial, overlap):
                fn(x)
            same = torch.equal(serial(x), overlap(x))
            for rep in range(2):
                for name, fn in (("serial", serial), ("overlap", overlap)):
                    print(f"T={t:5d} {name:8s} rep {rep}: per call {per_call(fn, x):.3f} ms, back to back "
                          f"{back_to_back(fn, x):.3f} ms", flush=True)
            print(f"T={t:5d} outputs bit-identical: {same}", flush=True)
            print(f"T={t:5d} shared MLP alone: per call {per_call(shared, x):.3f} ms", flush=True)

        x = torch.randn(2048, m.H, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            routed(x)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            routed(x)
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print("cProfile, 30 eager layer calls at T = 2048 (routed experts only), by own time:")
        print(buf.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
