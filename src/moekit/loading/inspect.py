"""``moekit inspect <dir>``: a table of the MoE blocks of a checkpoint (config.json only, no weights read).

Consecutive blocks with the same shape and routing are grouped into one row. Sizes are at bf16
(2 bytes per element): one routed expert (w13 + w2, biases included), and the expert weights one token
touches (K routed experts + shared experts + router).
"""

from __future__ import annotations

import argparse
import os
import sys

from .architectures import plan_layers
from .loader import read_config
from .plan import LayerPlan


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ranges(idx: list[int]) -> str:
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _signature(p: LayerPlan):
    return (
        p.num_experts, p.num_zero_experts, p.shared_intermediate_size, p.top_k, p.routing, p.hidden_size,
        p.intermediate_size, p.activation, p.has_bias, p.name.rsplit(".", 1)[-1],
    )  # fmt: skip


def rows(config: dict) -> tuple[str, list[dict]]:
    """(architecture name, one dict per group of identical consecutive MoE blocks)."""
    spec, plans = plan_layers(config)
    groups: list[list[LayerPlan]] = []
    for p in plans:
        if groups and _signature(groups[-1][-1]) == _signature(p) and groups[-1][-1].layer_idx + 1 == p.layer_idx:
            groups[-1].append(p)
        else:
            groups.append([p])
    out = []
    for g in groups:
        p = g[0]
        shared = f"1 x {p.shared_intermediate_size}" if p.shared_intermediate_size else "-"
        if p.shared_expert_gate:
            shared += " (gated)"
        out.append(
            {
                "layers": _ranges([q.layer_idx for q in g]),
                "module": p.name.rsplit(".", 1)[-1],
                "experts": f"{p.num_experts}" + (f" + {p.num_zero_experts} zero" if p.num_zero_experts else ""),
                "shared": shared,
                "top_k": str(p.top_k),
                "routing": p.routing,
                "H": str(p.hidden_size),
                "I": str(p.intermediate_size),
                "act": p.activation + (f" (limit {p.swiglu_limit:g})" if p.swiglu_limit else ""),
                "bytes/expert": _fmt_bytes(p.expert_bytes(2)),
                "bytes/token": _fmt_bytes(p.active_bytes_per_token(2)),
                "_count": len(g),
                "_plan": p,
            }
        )
    return spec.name, out


def render(arch: str, table: list[dict], config: dict) -> str:
    cols = ["layers", "module", "experts", "shared", "top_k", "routing", "H", "I", "act", "bytes/expert", "bytes/token"]
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols} if table else {c: len(c) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(r[c].ljust(widths[c]) for c in cols) for r in table]
    n_moe = sum(r["_count"] for r in table)
    total = sum(r["_count"] * r["_plan"].num_experts * r["_plan"].expert_bytes(2) for r in table)
    per_token = sum(r["_count"] * r["_plan"].active_bytes_per_token(2) for r in table)
    head = (
        f"{arch} (model_type={config.get('model_type')!r}): {n_moe} MoE blocks of "
        f"{next((config[k] for k in ('num_hidden_layers', 'num_layers', 'n_layers') if k in config), '?')} layers"
    )
    foot = f"routed expert weights: {_fmt_bytes(total)} at bf16; expert weights read per token: {_fmt_bytes(per_token)}"
    return "\n".join([head, *lines, foot])


def inspect_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moekit inspect", description="Show the MoE blocks of a HF checkpoint directory.")
    ap.add_argument("path", help="checkpoint directory (with config.json)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.path):
        print(f"moekit inspect: {args.path!r} is not a directory", file=sys.stderr)
        return 2
    try:
        config = read_config(args.path)
        arch, table = rows(config)
    except (NotImplementedError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"moekit inspect: {err}", file=sys.stderr)
        return 1
    print(render(arch, table, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(inspect_main())
