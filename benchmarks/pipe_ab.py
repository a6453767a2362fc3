"""The pipelined register-operand 4-bit GEMMs (``"gluon_rega": 3``, :mod:`moekit.ops._gluon.w4_pipe`) beside the
shipped table: the experts step per point, each variant in a CUDA graph (median µs), alternated ``--rounds`` times
in a rotating order, its output compared bit for bit with the table's.

Variants, each derived from the table's config at the point (``table``): ``pipe13`` its w13 pipelined where it runs
the register-operand kernels; ``pipe2`` its w2 likewise, and where that runs Triton's unswapped tiles (the T >= 4096
mixes) on swapped pipelined tiles instead (BN 128, 8 warps); ``pipe`` both. ``bf16`` times the unquantised step under its own table
(another weight set: no bit check).

    PYTHONPATH=src python benchmarks/pipe_ab.py --points mixtral-8x7b:1024,deepseek-v3:16384 --formats mxfp4,int4
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernel_profile import each_point, experts_step  # benchmarks/: the script's own folder
from moekit.ops import triton_configs as tc
from moekit.ops import triton_experts_quant as tq
from moekit.ops.config_keys import gluon_rega_value
from quant_probe import routing_sets, save_rows, shape_weights, time_alternated
from swap_probe import FORMATS, quantise

#: w2 on swapped pipelined tiles where the table runs Triton's unswapped w2 (``pipe2``)
W2_SWAPPED = {"BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3, "SWAP": 1, "gluon": 1,
              "gluon_rega": 3}


def piped(part: dict, name: str) -> dict:
    """GEMM config ``part`` (of ``name``: "w13" / "w2") on the pipelined kernels where it runs the register-operand
    ones (no ``"gluon_early"``; ring slots by shared memory), else unchanged."""
    if not gluon_rega_value(name, part):
        return part
    return {**{k: v for k, v in part.items() if k not in ("gluon_early", "gluon_stages")}, "gluon_rega": 3}


def variants(table: dict, which: str) -> dict[str, dict]:
    """{name: config} for ``which`` (comma-separated names, module docstring) from the table's config."""
    out = {"table": table}
    for name in which.split(","):
        w2 = table["w2"] if table["w2"].get("SWAP") else W2_SWAPPED
        if name == "pipe":
            out[name] = {**table, "w13": piped(table["w13"], "w13"), "w2": piped(w2, "w2"), "sum_pass": True}
        elif name == "pipe13":
            out[name] = {**table, "w13": piped(table["w13"], "w13")}
        elif name == "pipe2":
            out[name] = {**table, "w2": piped(w2, "w2"), "sum_pass": True}
        elif name not in ("table", "bf16"):
            raise ValueError(f"unknown variant {name!r}")
    return {k: v for k, v in out.items() if k == "table" or v != table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="MODEL:T[,MODEL:T...]")
    ap.add_argument("--formats", default="mxfp4,int4")
    ap.add_argument("--variants", default="pipe,pipe13,pipe2,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    name_dev = torch.cuda.get_device_name(dev)
    rows = []
    for mname, t, m, weights in each_point(a.points, lambda m: shape_weights(m, dev)):
        sets = routing_sets(m, t, 4, dev)
        bf16 = None
        if "bf16" in a.variants.split(","):
            cfg = tc.get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated)
            bf16 = experts_step(m, weights, None, None, cfg)
        for fname in a.formats.split(","):
            fmt = FORMATS[fname]
            spec = tq.QuantSpec.of(fmt)
            q = quantise(weights[0], weights[1], fmt)
            table = tc.lookup_config(name_dev, tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, spec.key), t)
            if table is None:
                table = tc.get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key)
            cfgs = {k: spec.fix_config(c, torch.bfloat16) for k, c in variants(table, a.variants).items()}
            fns = {k: experts_step(m, weights, q, spec, c) for k, c in cfgs.items()}
            ref = fns["table"](*sets[0])
            same = {k: bool(torch.equal(fn(*sets[0]), ref)) for k, fn in fns.items()}
            if bf16 is not None:
                fns["bf16"] = bf16
            times = time_alternated(fns, sets, a.rounds)
            line = "  ".join(f"{k} {'/'.join(f'{u:.1f}' for u in v)}" for k, v in times.items())
            best = min((k for k in times if k not in ("table", "bf16")), key=lambda k: min(times[k]), default=None)
            gain = f" | best {best} {min(times['table']) / min(times[best]):.3f}x" if best else ""
            print(f"{mname:14s} {fname:5s} T={t:6d} | {line}{gain}"
                  + ("" if all(same.values()) else f" | BITS DIFFER {same}"), flush=True)
            rows.append(dict(model=mname, fmt=fname, tokens=t, us=times, same_bits=same, configs=cfgs))
            del q, fns
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
