"""Host (Python) cost of one eager Triton-path call, measured on a CPU: no GPU needed.

Where an eager ``FusedMoE`` forward spends host time besides the CUDA driver (issue #11 item 1), each
piece timed as the median of 7 runs of N calls, µs per call, on this machine's CPU:

1. ``torch.library`` custom-op dispatch of an op with ``moekit::fused_experts``'s 11-argument signature
   (trivial body) against a direct Python call of the same body, and ``direct_call_ok``'s own check;
2. the config lookup: the former uncached path (file lookup + heuristic) against the cached ``get_config``;
3. the experts launcher with its Triton launches stubbed out (argument building, scratch allocation,
   config, grids), the former code (``git show <rev>:src/moekit/ops/triton_experts.py``, op included)
   against the current one (direct call, cached launch plan, two scratch allocations);
4. Triton 3.6's own per-launch Python work for the w13 kernel's ~40 arguments: its generated binder
   (argument specialisation) and cache-key computation (the C launcher and the driver are not included).

Allocations here are CPU allocations (the CUDA caching allocator costs ~1-2 µs each, similar).

    PYTHONPATH=src python benchmarks/host_overhead_cpu.py [--rev HEAD] [--tokens 1,8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Optional

import torch

import moekit.ops.triton_experts as te
from moekit.ops import triton_configs as tc
from moekit.ops._eager import direct_call_ok

ROOT = Path(__file__).resolve().parents[1]
E, K, H, I = 128, 8, 2048, 768  # Qwen3-30B-A3B  # noqa: E741


def per_call_us(fn, n: int = 2000, reps: int = 7) -> float:
    for _ in range(min(200, n)):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


# -- 1. custom-op dispatch ------------------------------------------------------------------------------
@torch.library.custom_op("moekit_probe::experts", mutates_args=())
def _probe_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor, act: str,
              on_input: bool, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], emap: Optional[torch.Tensor],
              limit: Optional[float]) -> torch.Tensor:
    return torch.empty_like(x)


def _probe_direct(x, w1, w2, tw, ids, act, on_input, b1, b2, emap, limit):
    return torch.empty_like(x)


# -- 3. launchers with stubbed kernels --------------------------------------------------------------------
class _Stub:
    """Stands for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kw):
        return None

    def warmup(self, *args, **kw):
        return None


STUBS = types.SimpleNamespace(align_small_kernel=_Stub(), count_kernel=_Stub(), scatter_kernel=_Stub(),
                              w13_kernel=_Stub(), w2_kernel=_Stub())


def old_launcher(rev: str):
    """The launcher module at git ``rev`` (its custom op renamed so that both can be registered)."""
    src = subprocess.run(["git", "show", f"{rev}:src/moekit/ops/triton_experts.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace('"moekit::fused_experts"', '"moekit_old::fused_experts"')
    mod = types.ModuleType("moekit.ops._old_triton_experts")
    mod.__package__ = "moekit.ops"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:triton_experts.py", "exec"), mod.__dict__)
    return mod


def problem(t: int):
    x = torch.randn(t, H, dtype=torch.bfloat16)
    w1 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16)  # never touched: no pages committed
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16)
    w, ids = torch.rand(t, E).topk(K, dim=-1)
    return x, w1, w2, (w / w.sum(-1, keepdim=True)).contiguous(), ids.int().contiguous()


# -- 4. Triton's binder -----------------------------------------------------------------------------------
def triton_binder_us(t: int) -> tuple[float, float]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from moekit.ops._triton import grouped_gemm

    kernel = grouped_gemm.w13_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    x, w1, w2, w, ids = problem(t)
    inter, sem, counts = torch.empty(64, I, dtype=x.dtype), torch.empty(64, dtype=torch.int32), torch.empty(
        129, dtype=torch.int32)
    plan = te.launch_plan(t, H, I, 2 * I, E, E, K, x.dtype, 1, True, False, False, False, False, None, False,
                          te.SMALL_SLOTS, te.INLINE_SLOTS, te._freeze(tc.heuristic_config(t, E, H, I, K, x.dtype)))
    args = (x, w1, None, w1, inter, w, counts, sem, ids, sem, sem, x, H, I, 2 * I, E, K, 4, 0.0, t, E, 16,
            x.stride(0), w1.stride(0), w1.stride(1), 0, I, K, K, H)
    kw = dict(plan.w13_kw, USE_TMA=False, PDL=False)
    kw.pop("num_warps"), kw.pop("num_stages")
    opts = dict(num_warps=4, num_stages=4, debug=False, instrumentation_mode="")
    cache: dict = {}

    def bind():
        bound, spec, options = binder(*args, **kw, **opts)
        compute_cache_key(cache, spec, options)

    return per_call_us(lambda: binder(*args, **kw, **opts)), per_call_us(bind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD~1", help="git revision of the former launcher (default: HEAD~1)")
    ap.add_argument("--tokens", default="1,8")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per call (median of 7)")

    x, w1, w2, w, ids = problem(1)
    a = (x, w1, w2, w, ids, "silu", False, None, None, None, None)
    print(f"1. custom op {per_call_us(lambda: _probe_op(*a)):7.2f}   direct call "
          f"{per_call_us(lambda: _probe_direct(*a)):7.2f}   direct_call_ok() {per_call_us(lambda: direct_call_ok(x)):5.2f}")

    tc._device_props = lambda index: ("Fake GPU", 132)  # a CUDA device name without a GPU
    dev = torch.device("cuda", 0)
    uncached = lambda: tc.lookup_config("Fake GPU", tc.shape_key(E, H, I, K, x.dtype, True), 1) or (  # noqa: E731
        tc.heuristic_config(1, E, H, I, K, x.dtype, 132))
    print(f"2. config lookup: former (file lookup + heuristic) {per_call_us(uncached):7.2f}   cached get_config "
          f"{per_call_us(lambda: tc.get_config(dev, 1, E, H, I, K, x.dtype, True)):5.2f}")

    old = old_launcher(args.rev)
    for mod in (old, te):
        mod.align, mod.grouped_gemm = STUBS, STUBS
    for t in map(int, args.tokens.split(",")):
        x, w1, w2, w, ids = problem(t)
        for label, fn in (("former launcher (op + _run_chunk)", old.fused_experts_triton),
                          ("current launcher (direct + plan)", te.fused_experts_triton)):
            us = per_call_us(lambda: fn(x, w1, w2, w, ids, activation="silu"), n=500)
            print(f"3. T={t:3d} {label:36s} {us:7.2f}")
    for t in map(int, args.tokens.split(",")):
        binder, with_key = triton_binder_us(t)
        print(f"4. T={t:3d} Triton w13 launch, Python side: binder {binder:6.2f}, + cache key {with_key:6.2f} "
              "(x 2-3 launches per call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
