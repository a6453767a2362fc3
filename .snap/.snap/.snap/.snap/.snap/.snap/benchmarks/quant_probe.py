"""Experts step per weight format on one GPU: bf16 against fp8 (each ``fp8_acc`` mode), mxfp4 and int4.

A quick probe for choosing kernel defaults (not the committed sweep: that is ``moekit bench``). Per shape
and token count: uniform random routing (R rotated sets inside one CUDA graph), ``moekit.fused_experts``
on bf16 weights, then ``fused_experts_quant_impl`` on the same weights quantised, with the config lookup's
config (``fp8_acc`` overridden per mode). µs = median CUDA-graph replay / call. Prints one line per point
and writes JSON rows to ``--out``.

    PYTHONPATH=src python benchmarks/quant_probe.py --shapes deepseek-v3,qwen3-30b-a3b --tokens 1,64,16384
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import moekit
from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts_quant as tq
from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format
from moekit.ops.triton_configs import get_config, merge_config
from moekit.ops.triton_experts import fused_experts_impl

VARIANTS = {
    "fp8-acc0": (Fp8BlockFormat(128, 128), 0),
    "fp8-acc32": (Fp8BlockFormat(128, 128), 32),
    "fp8-acc128": (Fp8BlockFormat(128, 128), 128),
    "mxfp4": (Mxfp4Format(), None),
    "int4": (Int4GroupFormat(32), None),
}


def quantise(w13, w2, fmt, chunk=16):
    """quantize_experts over chunks of experts (bounded fp32 scratch on big shapes)."""
    parts = [moekit.quantize_experts(w13[i:i + chunk], w2[i:i + chunk], fmt) for i in range(0, w13.shape[0], chunk)]
    return [torch.cat([p[j] for p in parts]) for j in range(4)]


def shape_weights(m, dev):
    """bf16 weights of shape ``m`` (seeded): ``(w13, w2, b1, b2, swiglu_limit)``, biases None without them."""
    torch.manual_seed(0)
    w13 = torch.randn(m.E, (2 if m.gated else 1) * m.I, m.H, device=dev, dtype=torch.bfloat16) * m.H**-0.5
    w2 = torch.randn(m.E, m.H, m.I, device=dev, dtype=torch.bfloat16) * m.I**-0.5
    b1 = (torch.randn(m.E, w13.shape[1], device=dev) * 0.05).bfloat16() if m.has_bias else None
    b2 = (torch.randn(m.E, m.H, device=dev) * 0.05).bfloat16() if m.has_bias else None
    return w13, w2, b1, b2, (7.0 if m.act == "swigluoai" else None)


def experts_step(m, fmt, dev):
    """One shape's experts step on :func:`shape_weights` in weight format ``fmt`` (None: bf16):
    ``(call, spec)`` with ``call(x, topk_weights, topk_ids, cfg)`` the Triton launcher under config ``cfg``
    and ``spec`` the format's ``QuantSpec`` (None for bf16)."""
    w13, w2, b1, b2, limit = shape_weights(m, dev)
    if fmt is None:
        def call(x, w, ids, cfg):
            return fused_experts_impl(x, w13, w2, w, ids, m.act, False, b1, b2, None, limit, config=cfg)
        return call, None
    spec = tq.QuantSpec.of(fmt)
    q13, q2, s13, s2 = quantise(w13, w2, fmt)  # the bf16 weights are freed on return (no call keeps them)

    def call_q(x, w, ids, cfg):
        return tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, None, None, m.act, False, b1, b2, None,
                                           limit, config=cfg)
    return call_q, spec


def step_config(m, t: int, spec, dev, patch: dict | None = None) -> dict:
    """The config lookup's config of shape ``m`` at ``t`` tokens (``patch`` merged in), fixed by the format."""
    cfg = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key if spec else None)
    if patch:
        cfg = merge_config(cfg, patch)
    return spec.fix_config(cfg, torch.bfloat16) if spec is not None else cfg


def routing_sets(m, t: int, n: int, dev) -> list[tuple]:
    """``n`` rotating ``(x, topk_weights, topk_ids)`` sets of ``t`` tokens, distinct experts per token."""
    sets = []
    for _ in range(n):
        x = torch.randn(t, m.H, device=dev, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(m.E, device=dev)[:m.K] for _ in range(t)]).int() if t <= 4096 else \
            torch.randint(0, m.E, (t, m.K), device=dev, dtype=torch.int32)
        sets.append((x, torch.rand(t, m.K, device=dev) + 0.05, ids))
    return sets


def time_alternated(fns: dict, sets, rounds: int, before=None) -> dict[str, list[float]]:
    """``{name: [µs, one per round]}``: each of ``fns`` (``fn(*set)``) timed in a CUDA graph over ``sets`` (median,
    :func:`time_graph`) once per round, the order rotated each round so that none is always timed last (round 37:
    the variant timed last ran ~5 % slow at a 10 ms layer); ``before(name)``, if given, runs before each timing."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before is not None:
                before(name)
            times[name].append(time_graph(fns[name], sets, target_ms=8.0, replays=5))
    return times


def save_rows(path, dev, rows: list[dict]) -> None:
    """``{"device": ..., "rows": rows}`` as JSON at ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev), rows=rows), f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="deepseek-v3,qwen3-30b-a3b,mixtral-8x7b,gpt-oss-120b")
    ap.add_argument("--tokens", default="1,8,64,256,1024,4096,16384")
    ap.add_argument("--variants", default="bf16," + ",".join(VARIANTS))
    ap.add_argument("--rotations", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for name in a.shapes.split(","):
        m = MODELS[name]
        t0 = time.time()
        w13, w2, b1, b2, limit = shape_weights(m, dev)
        qs = {}
        for v in a.variants.split(","):
            if v != "bf16":
                fmt = VARIANTS[v][0]
                key = repr(fmt)
                if key not in qs:
                    qs[key] = quantise(w13, w2, fmt)
        for t in map(int, a.tokens.split(",")):
            sets = routing_sets(m, t, a.rotations, dev)
            base = None
            for v in a.variants.split(","):
                try:
                    if v == "bf16":
                        def fn(x, w, ids, w13=w13, w2=w2):
                            return moekit.fused_experts(x, w13, w2, w, ids, activation=m.act, w1_bias=b1, w2_bias=b2,
                                                        swiglu_limit=limit, backend="triton")
                    else:
                        fmt, acc = VARIANTS[v]
                        q13, q2, s13, s2 = qs[repr(fmt)]
                        spec = tq.QuantSpec.of(fmt)
                        cfg = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key)
                        if acc is not None:
                            cfg = dict(cfg, fp8_acc=acc)

                        def fn(x, w, ids, q13=q13, q2=q2, s13=s13, s2=s2, spec=spec, cfg=cfg):
                            return tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, None, None,
                                                               m.act, False, b1, b2, None, limit, config=cfg)
                    us = time_graph(fn, sets, target_ms=10.0, replays=5)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"{name} T={t} {v}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                base = us if v == "bf16" else base
                sp = f"  x{base / us:5.2f} vs bf16" if base and v != "bf16" else ""
                print(f"{name:15s} T={t:6d} {v:11s} {us:10.1f} us{sp}", flush=True)
                rows.append(dict(model=name, tokens=t, variant=v, us=round(us, 2)))
        print(f"-- {name}: {time.time() - t0:.0f} s", flush=True)
        del w13, w2, qs
        torch.cuda.empty_cache()
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
