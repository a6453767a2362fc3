"""Rows of a ``moekit bench`` log as the bench's JSON, for runs cut short before they wrote it.

A bench run writes its JSON after every shape since round 5; logs of older runs cut by a device call's
time limit (``benchmarks/results/*-r5-bench-*-partial.log``) hold every finished row as text:

    deepseek-v3   T=    64 moekit-experts fp8   2139.1 us   96.6% roofline    21.1 TFLOP/s
    deepseek-v3   T=     1 eager-layer          host     67.2 us   gpu    183.2 us

This reads those lines (and the ``device ...`` line's ceilings into ``meta``, with ``partial``) so that
``benchmarks/compare.py`` can report on them:

    python benchmarks/log_to_json.py RUN.log OUT.json && python benchmarks/compare.py OUT.json --md OUT.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROW = re.compile(r"^(?P<model>\S+)\s+T=\s*(?P<t>\d+) (?P<impl>moekit(?:-experts)?|baseline)\s+(?P<quant>\w+)\s+"
                 r"(?P<us>[\d.]+) us\s+(?P<pct>[\d.]+)% roofline\s+(?P<tflops>[\d.]+) TFLOP/s"
                 r"(?:\s+(?P<mhz>[\d.]+) MHz)?\s*$")  # the SM clock a row logs since round 17 (``sm_mhz``)
EAGER = re.compile(r"^(?P<model>\S+)\s+T=\s*(?P<t>\d+) (?P<impl>eager-\S+)\s+host\s+(?P<host>[\d.]+) us\s+"
                   r"gpu\s+(?P<us>[\d.]+) us")
DEVICE = re.compile(r"^device (?P<name>.+?): copy (?P<copy>[\d.]+) TB/s, read (?P<read>[\d.]+) TB/s, bf16 matmul "
                    r"(?P<bf16>\d+) TFLOP/s(?:, fp8 matmul (?P<fp8>\d+) TFLOP/s)?; formats (?P<quants>\S+)")


def parse(text: str) -> list[dict]:
    """The rows of a bench log (each with the run's ``meta``; ``partial`` unless the log says it wrote)."""
    meta, rows = {}, []
    for line in text.splitlines():
        if m := DEVICE.match(line):
            meta = dict(copy_bw_TBps=float(m["copy"]), read_bw_TBps=float(m["read"]),
                        bf16_peak_TFLOPs=float(m["bf16"]), fp8_peak_TFLOPs=float(m["fp8"]) if m["fp8"] else None,
                        quants=m["quants"].split(","), device=m["name"])
        elif m := ROW.match(line):
            peak = meta.get("fp8_peak_TFLOPs" if m["quant"] == "fp8" else "bf16_peak_TFLOPs")
            rows.append(dict(model=m["model"], tokens=int(m["t"]), impl=m["impl"], quant=m["quant"],
                             us=float(m["us"]), pct_roofline=float(m["pct"]), tflops=float(m["tflops"]),
                             peak_tflops=peak, device=meta.get("device"),
                             sm_mhz=float(m["mhz"]) if m["mhz"] else None))
        elif m := EAGER.match(line):
            rows.append(dict(model=m["model"], tokens=int(m["t"]), impl=m["impl"], us=float(m["us"]),
                             host_us=float(m["host"]), device=meta.get("device")))
    meta["partial"] = not re.search(r"^wrote .*\.json in ", text, re.M)
    meta["source"] = "benchmarks/log_to_json.py (rows read back from the bench log)"
    return [dict(r, meta=meta) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    rows = parse(Path(a.log).read_text())
    if not rows:
        print(f"no bench rows in {a.log}", file=sys.stderr)
        return 1
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} rows -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
