"""Two `moekit bench` JSONs of the same points side by side (e.g. one run under each Triton release, same machine):
µs of each moekit row (whole layer, experts step, and the ``--eager`` rows) per model, format and token count, and
the ratio NEW / OLD.

    python benchmarks/triton_ab.py OLD.json NEW.json [--labels 3.6,3.9] [--metric us|host_us] [--md OUT.md]

``--metric host_us``: the eager rows' host enqueue time instead of their GPU time (rows without it are left out).

A point present in one file only is listed with a dash; the geometric mean covers the points both have.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

IMPLS = ("moekit", "moekit-experts")


def load(path: str, metric: str = "us") -> dict[tuple, float]:
    """{(impl, model, quant, tokens): value of ``metric``} for the moekit and eager rows of one bench JSON (a list
    of row dicts)."""
    rows = json.loads(Path(path).read_text())
    return {(r["impl"], r["model"], r.get("quant", "bf16"), int(r["tokens"])): float(r[metric])
            for r in rows if (r.get("impl") in IMPLS or str(r.get("impl")).startswith("eager-"))
            and r.get(metric) is not None}


def table(old: dict, new: dict, labels: tuple[str, str], metric: str = "us") -> str:
    keys = sorted(set(old) | set(new), key=lambda k: (k[0], k[1], k[2], k[3]))
    unit = "host µs" if metric == "host_us" else "µs"
    lines = [f"| impl | model | quant | T | {labels[0]} {unit} | {labels[1]} {unit} | {labels[1]} / {labels[0]} |",
             "|---|---|---|---|---|---|---|"]
    logs: dict[str, list[float]] = {}
    for k in keys:
        a, b = old.get(k), new.get(k)
        ratio = "-" if a is None or b is None else f"{b / a:.3f}"
        if a is not None and b is not None:
            logs.setdefault(k[0], []).append(math.log(b / a))
        fa = "-" if a is None else f"{a:.1f}"
        fb = "-" if b is None else f"{b:.1f}"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {fa} | {fb} | {ratio} |")
    lines.append("")
    for impl, v in logs.items():
        lines.append(f"- {impl}: geometric mean {labels[1]} / {labels[0]} = {math.exp(sum(v) / len(v)):.3f} over "
                     f"{len(v)} points (min {math.exp(min(v)):.3f}, max {math.exp(max(v)):.3f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--labels", default="old,new", help="two comma-separated column names")
    p.add_argument("--metric", default="us", choices=("us", "host_us"), help="the row field compared")
    p.add_argument("--md", help="also write the table to this file")
    a = p.parse_args(argv)
    labels = tuple(a.labels.split(","))
    if len(labels) != 2:
        p.error(f"--labels: expected two comma-separated names, got {a.labels!r}")
    out = table(load(a.old, a.metric), load(a.new, a.metric), labels, a.metric)
    print(out, end="")
    if a.md:
        Path(a.md).write_text(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
