"""``moekit inspect <dir>``: a table of the MoE blocks of a checkpoint (config.json only, no weights read).

Consecutive blocks with the same shape and routing are grouped into one row. Sizes are at bf16
(2 bytes per element), or for quantised checkpoints (``quantization_config``) the routed experts in
their format (``fmt.bytes_per_expert``: packed weights + scales, biases at bf16): one routed expert
(w13 + w2), and the expert weights one token touches (K routed experts + shared experts + router; the
shared experts in the format they load in: fp8 where the checkpoint is fp8 and its format applies to
them, as :func:`moekit.load_moe_layers` keeps them, else bf16).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..ops.activation import is_gated
from .architectures import checkpoint_block_key, plan_layers
from .files import read_config
from .plan import LayerPlan
from .quant import checkpoint_formats, experts_format, quantization_dict
from .quant_shared import shared_format


def _expert_bytes(p: LayerPlan, fmt) -> int:
    """One routed expert as stored: the format's bytes (+ biases at bf16), or bf16."""
    if fmt is None:
        return p.expert_bytes(2)
    gated = is_gated(p.activation)
    bias = 2 * ((2 if gated else 1) * p.intermediate_size + p.hidden_size) if p.has_bias else 0
    return fmt.bytes_per_expert(p.intermediate_size, p.hidden_size, gated) + bias


def _shared_bytes(p: LayerPlan, sfmt) -> int:
    """The shared MLP as it loads: fp8 (``sfmt``: weights + scales) or bf16."""
    if sfmt is None:
        return p.shared_bytes(2)
    return sfmt.bytes_per_expert(p.shared_intermediate_size, p.outer_hidden_size, is_gated(p.shared_activation))


def _token_bytes(p: LayerPlan, fmt, sfmt=None) -> int:
    routed = p.top_k * (p.expert_bytes(2) - _expert_bytes(p, fmt))
    return p.active_bytes_per_token(2) - routed - (p.shared_bytes(2) - _shared_bytes(p, sfmt))


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


def _ckpt_name(spec, p: LayerPlan, rel: str) -> str:
    """A block-relative moekit name -> the checkpoint module name (the spec's renames undone)."""
    return (p.ckpt_prefixes[0] + checkpoint_block_key(spec, rel + "."))[:-1]


def _signature(p: LayerPlan):
    return (
        p.num_experts, p.num_zero_experts, p.shared_intermediate_size, p.top_k, p.routing, p.hidden_size,
        p.intermediate_size, p.activation, p.has_bias, p.name.rsplit(".", 1)[-1],
    )  # fmt: skip


def rows(config: dict) -> tuple[str, list[dict]]:
    """(architecture name, one dict per group of identical consecutive MoE blocks)."""
    spec, plans = plan_layers(config)
    fmt, dense_fmt, _ = checkpoint_formats(config, None)  # routed experts; other linears (shared experts)
    groups: list[list[LayerPlan]] = []
    for p in plans:
        if groups and _signature(groups[-1][-1]) == _signature(p) and groups[-1][-1].layer_idx + 1 == p.layer_idx:
            groups[-1].append(p)
        else:
            groups.append([p])
    out = []
    for g in groups:
        p = g[0]
        f = experts_format(fmt, p)
        sf = shared_format(dense_fmt, p, lambda rel: _ckpt_name(spec, p, rel))
        shared = f"1 x {p.shared_intermediate_size}" if p.shared_intermediate_size else "-"
        if p.shared_expert_gate:
            shared += " (gated)"
        if sf is not None:
            shared += f" {sf.name}"
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
                "quant": f.name if f is not None else "bf16",
                "bytes/expert": _fmt_bytes(_expert_bytes(p, f)),
                "bytes/token": _fmt_bytes(_token_bytes(p, f, sf)),
                "_bytes": _expert_bytes(p, f),
                "_token_bytes": _token_bytes(p, f, sf),
                "_count": len(g),
                "_plan": p,
            }
        )
    return spec.name, out


def render(arch: str, table: list[dict], config: dict) -> str:
    cols = ["layers", "module", "experts", "shared", "top_k", "routing", "H", "I", "act", "quant", "bytes/expert",
            "bytes/token"]
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols} if table else {c: len(c) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(r[c].ljust(widths[c]) for c in cols) for r in table]
    n_moe = sum(r["_count"] for r in table)
    total = sum(r["_count"] * r["_plan"].num_experts * r["_bytes"] for r in table)
    per_token = sum(r["_count"] * r["_token_bytes"] for r in table)
    head = (
        f"{arch} (model_type={config.get('model_type')!r}): {n_moe} MoE blocks of "
        f"{next((config[k] for k in ('num_hidden_layers', 'num_layers', 'n_layers') if k in config), '?')} layers"
    )
    q = quantization_dict(config)
    quants = ", ".join(dict.fromkeys(r["quant"] for r in table if r["quant"] != "bf16"))  # DeepSeek-V4 fp8: mxfp4
    stored = "at bf16"
    if isinstance(q, dict):
        stored = f"as stored ({q.get('quant_method')}{': ' + quants if quants else ''})"
    foot = f"routed expert weights: {_fmt_bytes(total)} {stored}; expert weights read per token: {_fmt_bytes(per_token)}"
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
    except (NotImplementedError, FileNotFoundError, KeyError, ValueError, TypeError) as err:
        print(f"moekit inspect: {err}", file=sys.stderr)
        return 1
    print(render(arch, table, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(inspect_main())
