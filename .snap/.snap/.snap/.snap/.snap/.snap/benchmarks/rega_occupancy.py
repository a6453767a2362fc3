"""Programs per SM of the register-operand 4-bit GEMMs as the H200 table ships them, compiled for sm_90 on the CPU.

For every mxfp4 / int4 entry of ``src/moekit/configs/NVIDIA_H200.json``, one call of the launcher per token bucket
(``compile_sm90.launches``: the kernels and arguments a layer's call launches, Gluon included); each register-operand
kernel among them (``"gluon_rega"``) is compiled as layers store their words (re-laid; rows ending in a half chunk,
gpt-oss's, also SPEC-packed), and its registers per thread (``ptxas -v``), spills, loop length and shared memory
printed with the programs per SM that registers and shared memory each allow. ``--maxnreg N`` compiles with Triton's
``maxnreg`` (the config key ``"gluon_maxnreg"``) to see whether a cap spills. Round 47 (docs/kernels.md).

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
from moekit.ops.formats import Int4GroupFormat, Mxfp4Format  # noqa: E402

_REGS, _SMEM, _WARPS = 65536, 233472, 64  # per SM on sm_90 (shared memory: 228 KB, 1 KB reserved per program)


def rega_launches(table: dict, match: str):
    """(label, kernel, args, kwargs) of each register-operand launch of the 4-bit entries of ``table`` (keys
    containing ``match``), per layout a layer may store (``RELAID`` set in kwargs)."""
    for key, entry in table.items():
        if ("mxfp4" not in key and "int4" not in key) or match not in key:
            continue
        kv = dict(x.split("=") for x in key.split(","))
        e, k, h, i = (int(kv[n]) for n in "EKHI")
        half = h % 128 != 0 or i % 128 != 0  # rows ending in a half chunk (gpt-oss): both layouts
        fmt = Mxfp4Format() if "mxfp4" in key else Int4GroupFormat(int(key.rsplit("_g", 1)[1]))
        shape = (min(e, 64), k, h, i, "swigluoai" if half else "silu", half)
        for t, cfg in entry.items():
            for kf, args, kw in c.launches(fmt, int(t), shape, config=cfg, gluon=True):
                if kf.fn.__name__.startswith("w4ra_"):
                    for relaid in ((False, True) if half else (True,)):
                        label = f"{key.split(',dtype')[0]} {fmt.name} T={t} {kf.fn.__name__} relaid{int(relaid)}"
                        yield label, kf, args, dict(kw, RELAID=relaid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--match", default="", help="only shape keys containing this")
    ap.add_argument("--maxnreg", type=int, default=0, help="compile with this register cap (0: none)")
    a = ap.parse_args(argv)
    table = json.load(open(ROOT / "src/moekit/configs/NVIDIA_H200.json"))["entries"]
    done: dict = {}  # one compile per distinct form
    for label, kf, args, kw in rega_launches(table, a.match):
        if a.maxnreg:
            kw["maxnreg"] = a.maxnreg
        sig = (kf.fn.__name__, tuple(sorted((n, v) for n, v in kw.items() if isinstance(v, (int, float, bool, str)))))
        if sig not in done:
            try:
                k = c.compile_launch(kf, args, kw)
            except Exception as exc:  # e.g. ptxas: the cap is below what an instruction needs
                done[sig] = f"does not compile: {str(exc).strip().splitlines()[-1][:160]}"
            else:
                d = Path(tempfile.mkdtemp())
                (d / "k.ptx").write_text(k.asm["ptx"])
                done[sig] = (ir_stats.sass_stats(d / "k.ptx"), k.metadata.shared)
        if isinstance(done[sig], str):
            print(f"{label:70s} {done[sig]}", flush=True)
            continue
        s, smem = done[sig]
        warps = kw["num_warps"]
        by_regs = _REGS // (warps * 32 * (-(-s["regs"] // 8) * 8))
        by_smem = min(_SMEM // (smem + 1024), _WARPS // warps)
        print(f"{label:70s} regs {s['regs']:3d} spill {s['spill']:4d} loop {s['sass_loop']:4d} smem {smem:6d} "
              f"programs/SM: registers {by_regs}, shared memory {by_smem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
