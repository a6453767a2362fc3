"""Programs per SM of the register-operand 4-bit GEMMs as the H200 table ships them, compiled for sm_90 on the CPU.

For every mxfp4 / int4 entry of ``src/moekit/configs/NVIDIA_H200.json`` whose w13 or w2 runs the register-operand
kernels (``"gluon_rega"``), compile that form (``compile_sm90.gluon_w4``; words re-laid as layers store them, gpt-oss's
rows also SPEC-packed) and print its registers per thread (``ptxas -v``), spills, loop length, shared memory, and the
programs per SM that registers and shared memory each allow. ``--maxnreg N`` compiles with Triton's ``maxnreg`` (the
config key ``"gluon_maxnreg"``) to see whether a cap spills. Round 47 (docs/kernels.md).

    python benchmarks/rega_occupancy.py                  # every shipped form
    python benchmarks/rega_occupancy.py --match E=256 --maxnreg 80
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import compile_sm90 as c  # noqa: E402
import ir_stats  # noqa: E402
from moekit.ops.gluon_w4 import _w4_smem, _w4_stages  # noqa: E402

_REGS, _SMEM, _WARPS = 65536, 233472, 64  # per SM on sm_90 (shared memory: 228 KB, 1 KB reserved per program)


def forms(table: dict, match: str):
    """(label, gluon_w4 keyword arguments, warps) of each register-operand form of ``table``, once each."""
    seen = set()
    for key, entry in table.items():
        if ("mxfp4" not in key and "int4" not in key) or match not in key:
            continue
        kv = dict(x.split("=") for x in key.split(","))
        h, i, e = int(kv["H"]), int(kv["I"]), int(kv["E"])
        quant = "mxfp4" if "mxfp4" in key else "int4"
        oss = h % 128 != 0  # rows ending in a half chunk (gpt-oss)
        for t, cfg in entry.items():
            for which in ("w13", "w2"):
                kw = cfg[which]
                if not kw.get("gluon_rega"):
                    continue
                bm, bn = cfg["BLOCK_M"], kw["BN"]
                stages = kw.get("gluon_stages") or _w4_stages(*_w4_smem(which, bm, bn, 128, 0), two=False)
                k_dim = h if which == "w13" else i
                for relaid in ((False, True) if oss else (True,)):
                    args = dict(which=which, quant=quant, bm=bm, bn=bn, h=h, i=i, e=min(e, 64), stages=stages,
                                bias=oss, act="swigluoai" if oss else "silu", rega=True,
                                early=bool(kw.get("gluon_early")), relaid=relaid,
                                sword=quant == "mxfp4" and k_dim % 128 == 0, serial=kw.get("gluon_rega") == 2)
                    sig = tuple(sorted(args.items()))
                    label = f"{key.split(',dtype')[0]} {quant} T={t} {which} bm{bm} bn{bn} relaid{int(relaid)}"
                    yield label, args, bn // 16, sig in seen
                    seen.add(sig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--match", default="", help="only shape keys containing this")
    ap.add_argument("--maxnreg", type=int, default=0, help="compile with this register cap (0: none)")
    a = ap.parse_args(argv)
    orig = c.compile_launch
    if a.maxnreg:
        c.compile_launch = lambda fn, args, kw: orig(fn, args, dict(kw, maxnreg=a.maxnreg))
    table = json.load(open(ROOT / "src/moekit/configs/NVIDIA_H200.json"))["entries"]
    done: dict = {}
    for label, args, warps, again in forms(table, a.match):
        sig = tuple(sorted(args.items()))
        if not again:
            try:
                k = c.gluon_w4(**args)
            except Exception as exc:  # e.g. ptxas: the cap is below what an instruction needs
                done[sig] = f"does not compile: {str(exc).strip().splitlines()[-1][:160]}"
            else:
                d = Path(tempfile.mkdtemp())
                (d / "k.ptx").write_text(k.asm["ptx"])
                done[sig] = (ir_stats.sass_stats(d / "k.ptx"), k.metadata.shared)
        if isinstance(done[sig], str):
            print(f"{label:60s} {done[sig]}", flush=True)
            continue
        s, smem = done[sig]
        r8 = -(-s["regs"] // 8) * 8
        by_regs = _REGS // (warps * 32 * r8)
        by_smem = min(_SMEM // (smem + 1024), _WARPS // warps)
        print(f"{label:60s} regs {s['regs']:3d} spill {s['spill']:4d} loop {s['sass_loop']:4d} smem {smem:6d} "
              f"programs/SM: registers {by_regs}, shared memory {by_smem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
