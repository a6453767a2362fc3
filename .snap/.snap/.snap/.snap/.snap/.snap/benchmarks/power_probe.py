"""Sustained load: µs per call, SM clock, power, energy per call and the clock-event reasons of a bench row.

Why: ``moekit bench``'s DeepSeek-V3 bf16 T = 4096 experts-step row measured 8.7-10.2 ms in rounds 17-28 while the
whole-layer row that contains the same experts call measured 7.9-8.3 ms, with the row's one SM-clock reading at
870-1080 MHz against the layer's 1410-1470 (docs/kernels.md, rounds 17 and 28). One NVML reading per row cannot say
whether the power cap, a thermal slowdown or the order of the rows sets that clock. Here every function is replayed
in a CUDA graph for ``--seconds`` while a thread reads NVML every ``--every`` ms, with idle gaps between phases, in
the order given (repeat it reversed to see an order effect):

- ``layer``: the bench's whole-layer function on (x, logits) (``bench_quant.layer_fn``);
- ``experts``: the bench's experts-step function on the layer router's precomputed routing (``experts_fn``);
- ``cfg:<variant>``: the experts step through ``fused_experts_impl`` under a config variant of
  ``kernel_profile.variant`` (``base``, ``lo``, ``hi``, ``bm128``, ``bm64w8``, ``json:...``);
- ``mm`` / ``mm8``: the bench's peak matmuls (bf16 8192³, ``measure_ceilings``; e4m3 8192³, ``measure_fp8_peak``) for
  the same readings at a known load.

Per phase: median µs per call over the first 0.2 s and over the last half, the SM clock (median, min), power (W),
energy per call (mJ, from the energy counter), temperature, and the share of samples with each clock-event reason.

    PYTHONPATH=src:benchmarks python benchmarks/power_probe.py --model deepseek-v3 --tokens 4096 \
        --phases layer,experts,experts,layer,cfg:base,cfg:lo --seconds 2 --idle 1.5 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import torch

#: NVML clock-event reason bits (nvmlClocksEventReason*; the older "throttle reasons" use the same bits)
REASONS = {
    0x1: "idle", 0x2: "app-clocks", 0x4: "sw-power-cap", 0x8: "hw-slowdown", 0x10: "sync-boost",
    0x20: "sw-thermal", 0x40: "hw-thermal", 0x80: "hw-power-brake", 0x100: "display-clocks",
}


def decode_reasons(mask: int) -> list[str]:
    """The names of the set bits of an NVML clock-event reason mask (unknown bits as hex)."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    rest = mask & ~sum(REASONS)
    return names + ([hex(rest)] if rest else [])


def summarise(samples: list[dict], t0: float, t1: float) -> dict:
    """Medians of the NVML ``samples`` (dicts with ``t``, ``sm``, ``w``, ``c``, ``reasons``) taken in [t0, t1], and
    the share of them with each reason set (percent)."""
    win = [s for s in samples if t0 <= s["t"] <= t1]
    if not win:
        return dict(samples=0)
    share: dict[str, float] = {}
    for s in win:
        for name in decode_reasons(s["reasons"]):
            share[name] = share.get(name, 0.0) + 100.0 / len(win)
    return dict(samples=len(win), sm_mhz=statistics.median(s["sm"] for s in win), sm_min=min(s["sm"] for s in win),
                watts=round(statistics.median(s["w"] for s in win), 1), temp_c=statistics.median(s["c"] for s in win),
                reasons={k: round(v, 1) for k, v in sorted(share.items())})


class Sampler(threading.Thread):
    """Reads NVML (SM clock, power, temperature, clock-event reasons) every ``every`` seconds until stopped."""

    def __init__(self, index: int, every: float):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nv, self.h, self.every = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index), every
        self.reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        self.samples: list[dict] = []
        self.halt = threading.Event()

    def energy_mj(self) -> float:
        return float(self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h))

    def power_limit_w(self) -> float:
        return self.nv.nvmlDeviceGetEnforcedPowerLimit(self.h) / 1000.0

    def run(self) -> None:
        nv, h = self.nv, self.h
        while not self.halt.is_set():
            self.samples.append(dict(t=time.perf_counter(), sm=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                                     w=nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                                     c=nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                                     reasons=self.reasons(h)))
            time.sleep(self.every)


def sustained(fn, sets, seconds: float, sampler: Sampler, target_ms: float = 20.0) -> dict:
    """Replay ``fn`` over ``sets`` (one CUDA graph of n calls, ~``target_ms`` per replay) for ``seconds``, each
    replay synchronised (so host time is GPU time): per-replay µs per call, NVML readings over the same window."""
    from moekit.benchmarking.timer import capture_graph, eager_estimate_ms

    n = int(min(200, max(len(sets), round(target_ms / eager_estimate_ms(fn, sets)))))
    graph = capture_graph(fn, sets, n)
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per, stamps = [], []
    e0, start = sampler.energy_mj(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        ev0.record()
        graph.replay()
        ev1.record()
        ev1.synchronize()
        per.append(ev0.elapsed_time(ev1) * 1e3 / n)
        stamps.append(time.perf_counter())
    end, e1 = time.perf_counter(), sampler.energy_mj()
    del graph
    first = [u for u, s in zip(per, stamps) if s - start <= 0.2] or per[:1]
    half = start + (end - start) / 2
    last = [u for u, s in zip(per, stamps) if s >= half] or per[-1:]
    return dict(calls_per_replay=n, replays=len(per), us_first=round(statistics.median(first), 1),
                us_last=round(statistics.median(last), 1), mj_per_call=round((e1 - e0) / (len(per) * n), 2),
                first=summarise(sampler.samples, start, start + 0.2), last=summarise(sampler.samples, half, end))


def phase_fn(name: str, layer, m, quant, q, t, dev, sets, esets):
    """(fn, inputs) of a phase name (module docstring)."""
    from moekit.benchmarking.bench_quant import experts_fn, layer_fn

    if name == "layer":
        return layer_fn(layer, m, quant, q), sets
    if name == "experts":
        return experts_fn(layer, m, quant, q), esets
    if name == "mm":
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        return (lambda: a @ b), [()]
    if name == "mm8":  # the bench's fp8 peak (bench_quant.measure_fp8_peak): e4m3 8192³, bf16 out
        a8 = torch.randn(8192, 8192, device=dev).to(torch.float8_e4m3fn)
        b8 = torch.randn(8192, 8192, device=dev).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=dev, dtype=torch.float32)
        return (lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)), [()]
    if name.startswith("cfg:"):
        from kernel_profile import neighbours, variant  # benchmarks/: the script's own folder
        from moekit.ops import triton_experts_quant as tq
        from moekit.ops.triton_configs import get_config
        from moekit.ops.triton_experts import fused_experts_impl
        from swap_probe import FORMATS

        fmt = FORMATS[quant] if quant != "bf16" else None
        spec = tq.QuantSpec.of(fmt) if fmt is not None else None
        cfg = variant(get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated,
                                 quant=spec.key if spec is not None else None), name[4:], neighbours(dev, m, t, spec))
        if spec is not None:
            cfg = spec.fix_config(cfg, torch.bfloat16)
        re = layer.routed_experts
        limit = layer.moe_config.swiglu_limit
        b1, b2 = re.w13_bias, re.w2_bias

        def fn(x, w, ids):
            if q is None:
                return fused_experts_impl(x, re.w13_weight, re.w2_weight, w, ids, m.act, False, b1, b2, None, limit,
                                          config=cfg)
            return tq.fused_experts_quant_impl(x, q[0], q[1], w, ids, spec, q[2], q[3], None, None, m.act, False, b1,
                                               b2, None, limit, config=cfg)
        return fn, esets
    raise ValueError(f"phase {name!r}: expected layer, experts, mm, mm8 or cfg:<variant>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--phases", default="layer,experts,experts,layer")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--idle", type=float, default=1.5)
    ap.add_argument("--every", type=float, default=0.01)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from moekit.benchmarking.bench import build_layer
    from moekit.benchmarking.bench_quant import quantized_weights
    from moekit.benchmarking.shapes import MODELS

    m, t, dev = MODELS[a.model], a.tokens, torch.device("cuda")
    torch.manual_seed(0)  # the bench's layer and inputs
    layer = build_layer(m, torch.bfloat16, dev)
    q = None if a.quant == "bf16" else quantized_weights(layer, a.quant, {})
    sets = [(torch.randn(t, m.H, device=dev, dtype=torch.bfloat16), torch.randn(t, m.E + m.Z, device=dev))
            for _ in range(4)]
    sampler = Sampler(dev.index or 0, a.every)
    sampler.start()
    print(f"{a.model} T={t} {a.quant}: enforced power limit {sampler.power_limit_w():.0f} W", flush=True)
    rows = []
    with torch.no_grad():
        esets = [(x, *layer.router.select_experts(x, lg)) for x, lg in sets]
        for name in a.phases.split(","):
            time.sleep(a.idle)
            idle = summarise(sampler.samples, time.perf_counter() - 0.5, time.perf_counter())
            fn, inputs = phase_fn(name, layer, m, a.quant, q, t, dev, sets, esets)
            r = dict(phase=name, **sustained(fn, inputs, a.seconds, sampler), idle_before=idle)
            f, la = r["first"], r["last"]
            print(f"{name:14s} first {r['us_first']:9.1f} us @ {f.get('sm_mhz')} MHz {f.get('watts')} W | last "
                  f"{r['us_last']:9.1f} us @ {la.get('sm_mhz')} MHz (min {la.get('sm_min')}) {la.get('watts')} W "
                  f"{la.get('temp_c')} C, {r['mj_per_call']} mJ/call | {la.get('reasons')} | idle before "
                  f"{idle.get('temp_c')} C", flush=True)
            rows.append(r)
            torch.cuda.empty_cache()
    sampler.halt.set()
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(dev), model=a.model, tokens=t, quant=a.quant,
                           power_limit_w=sampler.power_limit_w(), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
