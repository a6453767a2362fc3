"""Every bucket of the tables ``moekit tune`` wrote, run as a user's layer would run it: each shape key of
``DIR/<this GPU>.json``, each bucket's config on a problem of that many tokens (at most ``--max-tokens``) against the
torch twin (SPEC §4 / §8 bounds: relative RMS of the whole output <= 1e-2, 1e-4 in fp32 unquantised), and the
first rows of every bucket against the same rows alone under the T = 1 bucket's config, bit for bit (SPEC §9).
Activation: silu (gated keys) or relu2; no biases (a table is keyed by shape and format only).

    PYTHONPATH=src:benchmarks python benchmarks/tuned_check.py OUT/tuned [--max-tokens 4096]
    TRITON_INTERPRET=1 PYTHONPATH=src:benchmarks python benchmarks/tuned_check.py table.json --device cpu

Prints a line per bucket and ``checked N buckets, F failed``; exits 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from moekit.benchmarking.bench_quant import QUANT_FORMATS
from moekit.benchmarking.shapes import ModelShape
from moekit.benchmarking.tune import make_call, make_problem
from moekit.benchmarking.tune_checks import rel_rms
from moekit.ops.experts import fused_experts_torch
from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.quantize import quantize_experts
from moekit.ops.quant_spec import QuantSpec
from moekit.ops.triton_configs import device_key
from moekit._checks import DTYPE_SHORT

DTYPES = {short: dtype for dtype, short in DTYPE_SHORT.items()}  # a key's dtype= value -> torch dtype


def parse_key(key: str) -> dict:
    """``E=..,H=..,I=..,K=..,dtype=..,gated=..[,quant=..]`` as a dict (ints where numeric)."""
    out = dict(part.split("=", 1) for part in key.split(","))
    return {k: int(v) if re.fullmatch(r"\d+", v) else v for k, v in out.items()}


def bench_format(quant: str | None):
    """(the benchmark format name, the format) of a key's ``quant=`` value (None: unquantised)."""
    if quant is None:
        return None, None
    for name, fmt in QUANT_FORMATS.items():
        if QuantSpec.of(fmt).key == quant:
            return name, fmt
    raise SystemExit(f"tuned_check: no benchmark format has key {quant!r} ({', '.join(QUANT_FORMATS)})")


def check_shape(key: str, table: dict, max_tokens: int, dev) -> list[tuple[int, bool, str]]:
    k = parse_key(key)
    dtype, act = DTYPES[k["dtype"]], "silu" if k["gated"] else "relu2"
    name, fmt = bench_format(k.get("quant"))
    e, h, inter, top = k["E"], k["H"], k["I"], k["K"]
    w = make_problem(1, e, h, inter, top, dtype, act, False, dev)
    w1, w2 = w[1], w[2]
    m = ModelShape("tuned", E=e, K=top, H=h, I=inter, act=act)
    call, _ = make_call(m, dtype, fmt, None if fmt is None else QuantSpec.of(fmt), (w1, w2, None, None))
    if fmt is None:  # (make_call: the words re-laid where a Triton-backend layer stores them so)
        twin = lambda pr: fused_experts_torch(pr[0], w1, w2, pr[3], pr[4], activation=act)  # noqa: E731
        bound = 1e-4 if dtype == torch.float32 else 1e-2
    else:
        qw = quantize_experts(w1, w2, fmt)  # the twin's SPEC-packed words

        def twin(pr):
            return fused_experts_quant_torch(pr[0], qw[0], qw[1], pr[3], pr[4], fmt=fmt, w13_scale=qw[2],
                                             w2_scale=qw[3], activation=act)
        bound = 1e-2
    buckets = sorted(table, key=int)
    rows = []
    for b in buckets:
        t = min(int(b), max_tokens)
        pr = make_problem(t, e, h, inter, top, dtype, act, False, dev, seed=7, weights=(w1, w2, None, None))
        got = call(pr, table[b])
        ref = twin(pr)
        err = rel_rms(got, ref)  # (inf where got is not finite)
        x, _, _, tw, ids, _, _ = pr  # the first row alone, under the smallest bucket's config
        alone = call((x[:1], w1, w2, tw[:1], ids[:1], None, None), table[buckets[0]])
        same = torch.equal(got[:1], alone)
        ok = err <= bound and same
        rows.append((int(b), ok, f"T={t:6d} rel_rms {err:.2e} (<= {bound:g}) row alone {'=' if same else '!='} "
                                 f"in batch  {json.dumps(table[b], sort_keys=True)}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="a folder of <gpu>.json (this GPU's is read) or one such file")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: the Triton interpreter (TRITON_INTERPRET=1), tiny shapes")
    args = ap.parse_args(argv)
    # (round 62: no GPU, --device cpu with a folder, a missing or malformed file each gave a traceback)
    try:
        dev = torch.device(args.device)
    except RuntimeError as err:
        ap.error(f"argument --device: {err}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("tuned_check.py: error: no CUDA GPU here (--device cpu checks one file with the interpreter)",
              file=sys.stderr)
        return 1
    if not args.dir.is_file() and dev.type != "cuda":
        ap.error(f"{str(args.dir)!r}: with --device {args.device} give the config file itself (a folder's file is "
                 "the GPU's)")
    path = args.dir if args.dir.is_file() else args.dir / f"{device_key(torch.cuda.get_device_name(dev))}.json"
    try:
        entries = json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"tuned_check.py: error: {path}: not a readable config file ({type(err).__name__}: {err})",
              file=sys.stderr)
        return 1
    n = bad = 0
    for key, table in entries.items():
        print(key)
        for b, ok, line in check_shape(key, table, args.max_tokens, dev):
            n, bad = n + 1, bad + (not ok)
            print(f"  {'ok  ' if ok else 'FAIL'} {line}")
    print(f"checked {n} buckets, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
