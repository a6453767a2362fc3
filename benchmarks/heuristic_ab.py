"""The untuned 4-bit configs side by side: the experts step under the heuristic before round 36 (the Triton tiles every
GPU got: swapped decode tiles up to 16 rows per expert, then the unquantised tiles), the sm_90 heuristic of round 36
(``triton_configs.w4_sm90_tiles``: the register-operand Gluon GEMMs), and the device table's tuned config where it has
the shape. Each point's variants are timed in a CUDA graph (median µs), alternated ``--rounds`` times, and their
outputs compared bit for bit against the first variant's.

    PYTHONPATH=src python benchmarks/heuristic_ab.py --shapes mixtral-8x7b,longcat-flash,kimi-k2 \
        --formats mxfp4,int4 --out ab.json

``kimi-k2``: DeepSeek-V3's layer with 384 experts (Kimi-K2's shape, which ships int4 group-32 experts).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernel_profile import experts_step  # benchmarks/: the script's own folder
from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_configs as tc
from moekit.ops import triton_experts_quant as tq
from quant_probe import routing_sets, save_rows, shape_weights
from swap_probe import FORMATS, quantise

#: shapes beyond the benchmark models
EXTRA = {"kimi-k2": MODELS["deepseek-v3"].replace(name="kimi-k2", E=384)}


def configs(dev, m, t: int, spec) -> dict[str, dict]:
    """{variant: config} at ``t`` tokens: ``old`` / ``sm90`` heuristics, ``table`` where the device table has
    the shape."""
    name, sms = torch.cuda.get_device_name(dev), torch.cuda.get_device_properties(dev).multi_processor_count
    cap = torch.cuda.get_device_capability(dev)
    args = (t, m.E, m.H, m.I, m.K, torch.bfloat16, sms, spec.key)
    out = {"old": tc.heuristic_config(*args), "sm90": tc.heuristic_config(*args, cap)}
    table = tc.lookup_config(name, tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, spec.key), t)
    if table is not None:
        out["table"] = table
    return {k: spec.fix_config(c, torch.bfloat16) for k, c in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral-8x7b,longcat-flash,kimi-k2")
    ap.add_argument("--formats", default="mxfp4,int4")
    ap.add_argument("--tokens", default="1,8,64,256,1024,4096,16384")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for sname in a.shapes.split(","):
        m = EXTRA.get(sname) or MODELS[sname]
        torch.cuda.empty_cache()
        weights = shape_weights(m, dev)
        for fname in a.formats.split(","):
            fmt = FORMATS[fname]
            spec = tq.QuantSpec.of(fmt)
            q = quantise(weights[0], weights[1], fmt)
            for t in map(int, a.tokens.split(",")):
                sets = routing_sets(m, t, 4, dev)
                cfgs = configs(dev, m, t, spec)
                fns = {k: experts_step(m, weights, q, spec, c) for k, c in cfgs.items()}
                ref = None
                same = {}
                for k, fn in fns.items():
                    out = fn(*sets[0])
                    ref = out if ref is None else ref
                    same[k] = bool(torch.equal(out, ref))
                times = {k: [] for k in fns}
                for _ in range(a.rounds):
                    for k, fn in fns.items():
                        times[k].append(time_graph(fn, sets, target_ms=8.0, replays=5))
                line = "  ".join(f"{k} {'/'.join(f'{u:.1f}' for u in v)}" for k, v in times.items())
                gain = min(times["old"]) / min(times["sm90"])
                print(f"{sname:14s} {fname:5s} T={t:6d} | {line} | old/sm90 {gain:.2f}x"
                      + ("" if all(same.values()) else f" | BITS DIFFER {same}"), flush=True)
                rows.append(dict(model=sname, fmt=fname, tokens=t, us=times, same_bits=same, configs=cfgs))
            del q
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
