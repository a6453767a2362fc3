"""The routing kernel alone at decode: µs per call in a CUDA graph (launch included) of ``route_impl`` per routing shape
and warp count, the warp counts alternated (one GPU).

    PYTHONPATH=src:benchmarks python benchmarks/route_probe.py --tokens 1,8 --warps 1,2,4 [--rounds 2] [--out FILE.json]

Shapes: the benchmark models' routings (DeepSeek-V3: sigmoid, a selection bias, 8 groups keep 4, K = 8, scale 2.5;
Qwen3-30B-A3B: softmax over 128, K = 8; gpt-oss-120b: softmax over 128, K = 4; Mixtral: softmax over 8, K = 2;
Kimi-K2-like: DeepSeek-V3's over 384 experts in one group; LongCat-Flash: softmax over 768 columns, K = 12). The
shipped warp count is :func:`moekit.ops.triton_routing._route_constexprs`'s; another is that dict with
``num_warps`` replaced.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_routing as tr
from quant_probe import save_rows

#: (name, E, groups, topk_group, K, scoring, bias, renormalize, scale)
SHAPES = (
    ("deepseek-v3", 256, 8, 4, 8, "sigmoid", True, True, 2.5),
    ("qwen3-30b-a3b", 128, 1, 1, 8, "softmax", False, True, 1.0),
    ("gpt-oss-120b", 128, 1, 1, 4, "softmax", False, True, 1.0),
    ("mixtral-8x7b", 8, 1, 1, 2, "softmax", False, True, 1.0),
    ("kimi-k2-like", 384, 1, 1, 8, "sigmoid", True, True, 2.827),
    ("longcat-flash", 768, 1, 1, 12, "softmax", True, False, 6.0),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--warps", default="1,2,4", help="warp counts to time beside the shipped one (0)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    shipped = tr._route_constexprs
    rows = []
    for name, e, g, tg, k, scoring, has_bias, renorm, scale in SHAPES:
        bias = torch.rand(e, device=dev) * 0.1 if has_bias else None
        for t in (int(x) for x in a.tokens.split(",")):
            sets = [(torch.randn(t, e, device=dev),) for _ in range(4)]
            ref = shipped(e, g, k, scoring, has_bias, renorm)
            for r in range(a.rounds):
                for w in [0] + [int(x) for x in a.warps.split(",")]:
                    consts = dict(ref, num_warps=w or ref["num_warps"])
                    tr._route_constexprs = lambda *args, c=consts: c  # noqa: E731 - this probe's override only
                    try:
                        fn = lambda lg: tr.route_impl(lg, bias, k, scoring, renorm, scale, g, tg, torch.int32)  # noqa
                        ids0 = fn(sets[0][0])[1]
                        us = time_graph(fn, sets, target_ms=5.0, replays=5)
                    finally:
                        tr._route_constexprs = shipped
                    same = bool(torch.equal(ids0, tr.route_impl(sets[0][0], bias, k, scoring, renorm, scale, g, tg,
                                                                 torch.int32)[1]))
                    label = f"{consts['num_warps']}w" + (" (shipped)" if w == 0 else "")
                    print(f"{name:14s} T={t:5d} {label:12s} {us:7.2f} us  ids as shipped: {same}", flush=True)
                    rows.append(dict(shape=name, tokens=t, warps=consts["num_warps"], shipped=w == 0,
                                     us=round(us, 3), same_ids=same))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
