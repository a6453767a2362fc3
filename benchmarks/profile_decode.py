"""Per-kernel device time of ``fused_experts_impl`` (torch profiler, eager launches, rotating routings)
for a few configs of one (shape, T) point: which GEMM misses the stream rate.

    python benchmarks/profile_decode.py          # Qwen3-30B-A3B experts at T=1
"""

from __future__ import annotations

import json
import sys

import torch

from moekit.ops.triton_configs import lookup_config, shape_key
from moekit.ops.triton_experts import fused_experts_impl
from moekit.tuning import make_problem


def main(argv=None):
    e, h, i, k, t = 128, 2048, 768, 8, int((argv or sys.argv[1:] or ["1"])[0])
    dev = torch.device("cuda")
    key = shape_key(e, h, i, k, torch.bfloat16, True)
    shipped = lookup_config(torch.cuda.get_device_name(dev), key, t)
    variants = {"shipped": shipped, "nopdl": {kk: v for kk, v in shipped.items() if kk != "pdl"}}
    variants["tma"] = dict(variants["nopdl"], tma=True)
    probs, w = [], None
    for r in range(4):
        p = make_problem(t, e, h, i, k, torch.bfloat16, "silu", False, dev, seed=r, weights=w)
        w = (p[1], p[2], p[5], p[6])
        probs.append(p)
    per_expert = 3 * h * i * 2
    uniq = sum(int(torch.unique(p[4]).numel()) for p in probs) / len(probs)
    print(f"T={t}: unique experts {uniq}, w13 bytes {uniq * 2 * h * i * 2 / 1e6:.1f} MB, "
          f"w2 bytes {uniq * h * i * 2 / 1e6:.1f} MB, floor at 3.07 TB/s {uniq * per_expert / 3.07e6:.1f} us")
    for name, cfg in variants.items():
        def run():
            for p in probs:
                x, w1, w2, tw, ids, b1, b2 = p
                fused_experts_impl(x, w1, w2, tw, ids, "silu", False, b1, b2, None, None, config=cfg)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(25):
                run()
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            dt = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
            if ev.count and dt:
                rows.append((ev.key[:40], ev.count, dt))
        print(f"{name}: {json.dumps(cfg, sort_keys=True)}")
        for kname, n, dt in sorted(rows, key=lambda r: -r[2]):
            print(f"   {kname:40s} x{n:4d}  {dt:8.2f} us avg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
