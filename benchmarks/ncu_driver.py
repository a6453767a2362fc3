"""One shape's experts step, called a few times, for an outside profiler (Nsight Compute):

    ncu --clock-control none -k regex:"fp8_w13|fp8_w2" --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        python benchmarks/ncu_driver.py deepseek-v3:16384 --format fp8 --calls 2

Runs the shipped config (or ``--patch`` JSON merged into it) ``--calls`` times on one seeded routing, so
``--launch-skip`` = (kernels per call) skips the first (compiling) call.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.ops import triton_experts_quant as tq
from moekit.ops.triton_configs import get_config, merge_config
from moekit.ops.triton_experts import fused_experts_impl
from quant_probe import routing_sets, shape_weights  # benchmarks/: the script's own folder
from swap_probe import FORMATS, quantise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("point", help="MODEL:T")
    ap.add_argument("--format", default="bf16", choices=sorted(FORMATS))
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--patch", default=None, help="JSON merged into the looked-up config")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    name, t = a.point.split(":")
    t, m = int(t), MODELS[name]
    w13, w2, b1, b2, limit = shape_weights(m, dev)
    x, w, ids = routing_sets(m, t, 1, dev)[0]
    fmt = FORMATS[a.format]
    spec = tq.QuantSpec.of(fmt) if fmt is not None else None
    q = quantise(w13, w2, fmt) if fmt is not None else None
    cfg = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key if spec else None)
    if a.patch:
        cfg = merge_config(cfg, json.loads(a.patch))
    if spec is not None:
        cfg = spec.fix_config(cfg, torch.bfloat16)
    print(f"{name} T={t} {a.format} config {json.dumps(cfg, sort_keys=True)}", flush=True)
    for _ in range(a.calls):
        if q is None:
            fused_experts_impl(x, w13, w2, w, ids, m.act, False, b1, b2, None, limit, config=cfg)
        else:
            tq.fused_experts_quant_impl(x, q[0], q[1], w, ids, spec, q[2], q[3], None, None, m.act, False, b1, b2,
                                        None, limit, config=cfg)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
