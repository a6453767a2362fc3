"""Host µs per Triton launch of an eager ``FusedMoE`` call, by launch path (issue #11: eager past the graph).

The launches of one eager layer call (internal graph off) are recorded, then each is re-issued ``calls``
times back to back (host time before the one synchronisation, median of 5 blocks) on an empty grid
``(0, 1, 1)`` (Triton's launcher returns before ``cuLaunchKernelEx`` then: the Python and argument
packing cost without the driver call, and without re-running kernels whose state a repeat would
corrupt, such as the align's counters) by:

- ``jit``:       ``kernel[grid](*args, **kw)`` (Triton's ``JITFunction.run``: binder, cache key, launcher)
- ``binder``:    the binder alone (``device_caches[dev][4](*args, **kw)``: arguments bound and specialised)
- ``direct``:    the cached ``CompiledKernel``'s launcher with the bound values (``kernel.run(...)``)
- ``spec``:      a Python specialisation key over the bound values (dtype + 16-byte alignment of tensors,
                 value class of ints), what a direct path must check per launch to stay exact

    PYTHONPATH=src python benchmarks/launch_cost.py --models qwen3-30b-a3b --tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from moekit.benchmarking import MODELS
from moekit.benchmarking.bench import build_layer


def _spec(v):
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() & 15 == 0
    if type(v) is int:
        return v == 1, v & 15 == 0, -(2**31) <= v < 2**31
    return v


def _host(fn, calls: int) -> float:
    out = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="256")
    ap.add_argument("--calls", type=int, default=50)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    orig = JITFunction.run
    for name in a.models.split(","):
        m = MODELS[name]
        layer = build_layer(m, torch.bfloat16, "cuda")
        layer._graphs = None
        for t in (int(v) for v in a.tokens.split(",")):
            x = torch.randn(t, m.H, device="cuda", dtype=torch.bfloat16)
            lg = torch.randn(t, m.E + m.Z, device="cuda", dtype=torch.float32)
            rec = []

            def run(self, *args, grid, warmup, **kw):
                k = orig(self, *args, grid=grid, warmup=warmup, **kw)
                rec.append((self, args, kw, grid, k))
                return k

            with torch.no_grad():
                layer(x, lg)
                JITFunction.run = run
                try:
                    layer(x, lg)
                finally:
                    JITFunction.run = orig
                dev = torch.cuda.current_device()
                stream = driver.active.get_current_stream(dev)
                print(f"== {name} T={t}: {len(rec)} launches")
                for fn, args, kw, grid, k in rec:
                    binder = fn.device_caches[dev][4]
                    bound = list(binder(*args, **kw)[0].values())
                    g = (0, 1, 1)
                    res = {
                        "jit": _host(lambda: fn[g](*args, **kw), a.calls),
                        "binder": _host(lambda: binder(*args, **kw), a.calls),
                        "direct": _host(lambda: k.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, None,
                                                      None, None, *bound), a.calls),
                        "spec": _host(lambda: tuple(map(_spec, bound)), a.calls),
                    }
                    print(f"   {fn.__name__:28s} args {len(bound):3d}  " +
                          "  ".join(f"{key} {v:6.1f}" for key, v in res.items()) + "  µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
