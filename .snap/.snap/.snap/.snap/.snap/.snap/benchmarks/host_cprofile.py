"""Where the host time of an eager ``FusedMoE`` call goes past the internal graph (T > its token bound), by cProfile.

Issue #11: a transformers Qwen3 block patched with moekit was host-bound at T >= 64 on the H200 (round 9,
``bench_transformers.py``: 0.56-0.94 ms of host enqueue per call against 0.30-0.52 ms of GPU time). This runs
``calls`` eager layer calls back to back at each ``--tokens`` under cProfile (no synchronisation inside; one
warm-up call first, so compiles and config lookups are out) and prints the top functions by own time and by
cumulative time, and the host µs per call without the profiler (median of 5 runs).

    PYTHONPATH=src python benchmarks/host_cprofile.py --models qwen3-30b-a3b --tokens 64,1024
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from moekit.benchmarking import MODELS
from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.eager import time_host


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="64,1024")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    for name in a.models.split(","):
        m = MODELS[name]
        layer = build_layer(m, torch.bfloat16, "cuda")
        for t in (int(v) for v in a.tokens.split(",")):
            x = torch.randn(t, m.H, device="cuda", dtype=torch.bfloat16)
            lg = torch.randn(t, m.E + m.Z, device="cuda", dtype=torch.float32)
            with torch.no_grad():
                layer(x, lg)
                torch.cuda.synchronize()
                host = time_host(lambda xx, ll: layer(xx, ll), [(x, lg)], calls=a.calls)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(a.calls):
                    layer(x, lg)
                prof.disable()
                torch.cuda.synchronize()
            print(f"== {name} T={t}: host {host:.1f} µs per call (no profiler), {a.calls} calls profiled")
            for key in ("tottime", "cumulative"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(key).print_stats(a.top)
                print("\n".join(ln for ln in s.getvalue().splitlines() if ln.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
