"""Two `moekit bench` JSONs of the same points side by side (e.g. one run under each Triton release, same machine):
µs of each moekit row (whole layer, experts step, and the ``--eager`` rows) per model, format and token count, and
the ratio NEW / OLD.

    python benchmarks/triton_ab.py OLD.json NEW.json [--labels 3.6,3.9] [--metric us|host_us] [--md OUT.md]

``--metric host_us``: the eager rows' host enqueue time instead of their GPU time (rows without it are left out).

A point present in one file only is listed with a dash; the geometric mean covers the points both have.
"""
from __future__ import annotations

from pathlib import Path

from compare import OneLineParser, geomean, load_rows

IMPLS = ("moekit", "moekit-experts")


def load(path: str, metric: str = "us") -> dict[tuple, float]:
    """{(impl, model, quant, tokens): value of ``metric``} for the moekit and eager rows of one bench JSON (read as
    ``compare.py`` reads it)."""
    return {(r["impl"], r["model"], r.get("quant", "bf16"), int(r["tokens"])): float(r[metric])
            for r in load_rows(path) if (r["impl"] in IMPLS or r["impl"].startswith("eager-"))
            and r.get(metric) is not None}


def table(old: dict, new: dict, labels: tuple[str, str], metric: str = "us") -> str:
    unit = "host µs" if metric == "host_us" else "µs"
    lines = [f"| impl | model | quant | T | {labels[0]} {unit} | {labels[1]} {unit} | {labels[1]} / {labels[0]} |",
             "|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {}
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        r = b / a if a is not None and b is not None else None
        if r is not None:
            ratios.setdefault(k[0], []).append(r)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {fmt(a, '.1f')} | {fmt(b, '.1f')} | {fmt(r, '.3f')} |")
    lines.append("")
    for impl, v in ratios.items():
        lines.append(f"- {impl}: geometric mean {labels[1]} / {labels[0]} = {geomean(v):.3f} over {len(v)} points "
                     f"(min {min(v):.3f}, max {max(v):.3f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="triton_ab.py", description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--labels", default="old,new", help="two comma-separated column names")
    p.add_argument("--metric", default="us", choices=("us", "host_us"), help="the row field compared")
    p.add_argument("--md", help="also write the table to this file")
    a = p.parse_args(argv)
    labels = tuple(v.strip() for v in a.labels.split(","))
    if len(labels) != 2 or not all(labels):
        p.error(f"--labels: expected two comma-separated names, got {a.labels!r}")
    if a.md and (Path(a.md).is_dir() or not Path(a.md).parent.is_dir()):
        p.error(f"argument --md: expected a file path in an existing folder, got {a.md!r}")
    try:
        old, new = load(a.old, a.metric), load(a.new, a.metric)
    except (OSError, ValueError) as err:
        p.error(str(err))
    if not old and not new:
        p.error(f"no rows with {a.metric!r} in {a.old} or {a.new}: nothing to compare")
    out = table(old, new, labels, a.metric)
    print(out, end="")
    if a.md:
        Path(a.md).write_text(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
