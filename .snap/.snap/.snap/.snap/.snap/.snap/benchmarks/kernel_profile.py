"""Where an experts step spends its GPU time: µs per call of each kernel, per shape, token count, format
and config variant (one GPU; torch.profiler over ``--calls`` eager calls after a warm-up).

    PYTHONPATH=src python benchmarks/kernel_profile.py --points qwen3-30b-a3b:1024,mixtral-8x7b:256 \
        --formats bf16 --variants base,bm128

Variants (each applied to the lookup's config): ``base`` (as shipped), ``bm128`` (BLOCK_M 128, w13 BN 128 /
w2 BN 256, 8 warps, 4 / 3 stages, TMA: the tile vLLM ships for Qwen3 at M >= 1024, in moekit's w13 BN
that counts gate and up columns once), ``bm64w8`` (BLOCK_M 64 with 8-warp BN 128 tiles), or
``json:<config>``, ``lo`` / ``hi`` (the shipped table's config at the nearest bucket below / above T, for the
gaps between buckets; a trailing digit repeats it: ``lo2``), or a name from ``--patches`` (that patch merged into
the lookup's config); suffixes set one
switch on those tiles: ``+sum`` / ``-sum`` ``"sum_pass"`` true / false (the top-k sum after w2 in its own pass,
or in w2's tail), ``+pdl``. ``--small-slots N`` moves the align's single-launch bound (0: always count +
scatter), ``--inline-slots N`` the bound of the layout derived in the GEMMs (no align kernel). Per point it prints
the total (the profiler's, plus a CUDA-graph median of the same call for comparison) and each kernel's share. JSON
rows go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts_quant as tq
from moekit.ops.triton_configs import get_config, merge_config
from moekit.ops.triton_experts import fused_experts_impl
from quant_probe import routing_sets, save_rows, shape_weights  # benchmarks/: the script's own folder
from swap_probe import FORMATS, quantise


#: variant suffixes: the top-k sum in its own pass (or the fused one), PDL launches
SUFFIXES = (("+sum", "sum_pass", True), ("-sum", "sum_pass", False), ("+pdl", "pdl", True))


#: named patches from ``--patches`` (module docstring)
PATCHES: dict[str, dict] = {}


def neighbours(dev, m, t: int, spec) -> dict[str, dict]:
    """{"lo": config, "hi": config}: the device table's configs at the nearest buckets below / above ``t`` (either
    missing where the table has none there)."""
    from moekit.ops import triton_configs as tc

    key = tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, spec.key if spec is not None else None)
    _, raw = tc.shape_table(torch.cuda.get_device_name(dev), key)
    table = {int(b): c for b, c in raw.items()}
    below, above = [b for b in table if b < t], [b for b in table if b > t]
    out = {}
    if below:
        out["lo"] = table[max(below)]
    if above:
        out["hi"] = table[min(above)]
    return out


def neighbour_name(name: str) -> str | None:
    """"lo" / "hi" for a neighbour variant (``lo``, ``hi2``, ...), else None."""
    side = name.rstrip("0123456789")
    return side if side in ("lo", "hi") else None


def variant(cfg: dict, name: str, near: dict | None = None) -> dict:
    """The config ``name`` (module docstring) derived from the lookup's ``cfg``; ``near``: :func:`neighbours`."""
    if near is not None and neighbour_name(name):
        return near[neighbour_name(name)]
    if name in PATCHES:
        return merge_config(cfg, PATCHES[name])
    for suffix, key, value in SUFFIXES:  # the same tiles with one switch set
        if name.endswith(suffix):
            return dict(variant(cfg, name[: -len(suffix)]), **{key: value})
    if name == "base":
        return cfg
    if name.startswith("json:"):
        return json.loads(name[5:])
    tiles = {"bm128": (128, (128, 8, 4), (256, 8, 3), True), "bm64w8": (64, (128, 8, 4), (128, 8, 4), True)}
    bm, (bn13, w13w, st13), (bn2, w2w, st2), tma = tiles[name]
    strip = lambda c: {k: v for k, v in c.items() if k != "SWAP"}  # noqa: E731
    return dict(cfg, BLOCK_M=bm, tma=tma, w13=dict(strip(cfg["w13"]), BN=bn13, num_warps=w13w, num_stages=st13),
                w2=dict(strip(cfg["w2"]), BN=bn2, num_warps=w2w, num_stages=st2))


def each_point(points: str, make):
    """``(name, t, model, made)`` per ``MODEL:T`` of ``points`` (comma-separated), ``made = make(model)`` built once per
    model in a row (the previous model's dropped and the CUDA cache emptied first: one model's weights at a time)."""
    held: dict = {}
    for point in points.split(","):
        name, t = point.split(":")
        m = MODELS[name]
        if name not in held:
            held.clear()
            torch.cuda.empty_cache()
            held[name] = make(m)
        yield name, int(t), m, held[name]


def experts_step(m, weights, q, spec, cfg: dict):
    """``(x, w, ids) -> out``: shape ``m``'s experts step on :func:`quant_probe.shape_weights`' ``weights`` under
    ``cfg``; ``q`` (:func:`swap_probe.quantise`'s tensors) and ``spec`` for a quantised format, None for bf16."""
    w13, w2, b1, b2, limit = weights

    def fn(x, w, ids):
        if q is None:
            return fused_experts_impl(x, w13, w2, w, ids, m.act, False, b1, b2, None, limit, config=cfg)
        return tq.fused_experts_quant_impl(x, q[0], q[1], w, ids, spec, q[2], q[3], None, None, m.act, False, b1, b2,
                                           None, limit, config=cfg)
    return fn


def kernel_times(fn, sets, calls: int) -> dict[str, float]:
    """{kernel name: µs per call} over ``calls`` calls of ``fn`` (profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
    acc: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            acc[ev.name[:60]] += ev.device_time / calls
    return dict(acc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="MODEL:T[,MODEL:T...]")
    ap.add_argument("--formats", default="bf16")
    ap.add_argument("--variants", default="base", help="comma-separated (a json: variant must come last)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--small-slots", type=int, default=None,
                    help="override triton_experts.SMALL_SLOTS (the single-launch align's bound) for this run")
    ap.add_argument("--inline-slots", type=int, default=None,
                    help="override triton_experts.INLINE_SLOTS (the bound under which the GEMMs derive the layout "
                         "from the ids, with no align kernel) for this run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--patches", default=None,
                    help='JSON {name: patch}: variant "name" is the lookup\'s config with the patch merged in, '
                         'e.g. {"w2s6": {"w2": {"num_stages": 6}}}')
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    from moekit.ops import triton_experts

    for bound, value in (("SMALL_SLOTS", a.small_slots), ("INLINE_SLOTS", a.inline_slots)):
        if value is not None:  # this run's slot bounds (module constants the launcher reads at each call)
            setattr(triton_experts, bound, value)
    if a.patches:
        PATCHES.update(json.loads(a.patches))
    rows = []
    vnames = a.variants.split(",") if not a.variants.startswith("json:") else [a.variants]
    for name, t, m, weights in each_point(a.points, lambda m: shape_weights(m, dev)):
        w13, w2 = weights[:2]
        sets = routing_sets(m, t, 4, dev)
        for fname in a.formats.split(","):
            fmt = FORMATS[fname]
            spec = tq.QuantSpec.of(fmt) if fmt is not None else None
            q = quantise(w13, w2, fmt) if fmt is not None else None
            cfg0 = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated,
                              quant=spec.key if spec is not None else None)
            near = neighbours(dev, m, t, spec)
            for vname in vnames:
                if neighbour_name(vname) and neighbour_name(vname) not in near:
                    print(f"{name} T={t} {fname} {vname}: no shipped bucket on that side of T", flush=True)
                    continue
                cfg = variant(cfg0, vname, near)
                if spec is not None:
                    cfg = spec.fix_config(cfg, torch.bfloat16)
                fn = experts_step(m, weights, q, spec, cfg)
                try:
                    per = kernel_times(fn, sets, a.calls)
                    us = time_graph(fn, sets, target_ms=8.0, replays=5)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"{name} T={t} {fname} {vname}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                total = sum(per.values())
                parts = "  ".join(f"{k.split('(')[0]} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
                print(f"{name:14s} T={t:6d} {fname:5s} {vname:7s} graph {us:9.1f} us  prof {total:9.1f} us | {parts}",
                      flush=True)
                print(f"    config {json.dumps(cfg, sort_keys=True)}", flush=True)
                rows.append(dict(model=name, tokens=t, fmt=fname, variant=vname, us=round(us, 2), kernels=per,
                                 config=cfg))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
