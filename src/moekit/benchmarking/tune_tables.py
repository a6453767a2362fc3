"""The tables ``moekit tune`` writes: merging a bucket into ``<out>/<device>.json``, the order buckets are
tuned in, the config in use where a search starts, and the buckets a new table is filled with so that it is
whole (a lookup runs the nearest bucket of the first table it finds: see :mod:`.tune`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..ops.config_heuristic import heuristic_config
from ..ops.triton_configs import nearest_bucket, read_config_file
from .shapes import TOKENS
from .tune_space import Space, as_run, block_k, shape_block_k


def out_table(path: Path, key: str) -> dict:
    """The ``{bucket: config}`` of shape ``key`` in the config file ``path`` ({} where it has none)."""
    return read_config_file(path).get("entries", {}).get(key) or {}


def merge_entries(path: Path, device_name: str, key: str, table: dict) -> None:
    """Merge ``{bucket: config}`` of shape ``key`` into the config file ``path`` (other shapes and
    buckets kept), re-reading it first and replacing it atomically."""
    data = read_config_file(path)
    data.setdefault("device", device_name)
    data.setdefault("entries", {}).setdefault(key, {}).update({str(b): c for b, c in table.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def bucket_order(tokens) -> list[int]:
    """Largest first (it fixes BLOCK_K for a new shape), then the rest ascending; duplicates dropped."""
    ts = sorted(set(int(t) for t in tokens))
    return ts[-1:] + ts[:-1]


def _space(m, dtype, spec, fixed_bk, fixed_arith) -> Space:
    """The search space of shape ``m`` with the shape's fixed BLOCK_K and arithmetic keys."""
    return Space((m.E, m.H, m.I, m.K, m.gated), dtype, spec, fixed_bk, fixed_arith, elt=dtype.itemsize)


def config_in_use(m, t, dtype, before: dict, spec, fixed_bk, fixed_arith, num_sms: int = 132,
                  capability: tuple[int, int] | None = None) -> tuple[Space, dict]:
    """(the shape's search space, the config lookups gave at ``t`` before the run — the nearest bucket of
    ``before``, the shape's table then, else the heuristic of the format for ``num_sms`` SMs of compute
    ``capability`` — fixed by the space): where a search starts (timed even where the space's estimates would
    refuse it: the search then scores it as failed), and what a bucket past the budget keeps. A ``before`` entry
    whose BLOCK_K the space changed and which then no longer fits (shared memory) gives way to the heuristic, and
    a start that still does not fit at the new BLOCK_K is made to (:meth:`Space.fit`)."""
    quant = None if spec is None else spec.key
    heuristic = heuristic_config(t, m.E, m.H, m.I, m.K, dtype, num_sms, quant, capability)
    base = nearest_bucket(before, t) or heuristic
    space = _space(m, dtype, spec, fixed_bk, fixed_arith)
    cfg = space.apply(base)
    if base is not heuristic and block_k(base) != block_k(cfg) and space.refusal(cfg) is not None:
        # round 51's review: a table in use at another BLOCK_K (tuned anew, --block-k) gave starts whose tiles no
        # longer fit shared memory (BK 64 -> 128 doubles a stage): the heuristic at the shape's BLOCK_K then, as
        # fill_missing does; what a bucket past the budget keeps is never a refused config where that one fits
        fallback = space.apply(heuristic)
        if space.refusal(fallback) is None:
            cfg = fallback
    if block_k(base) != block_k(cfg) and space.refusal(cfg) == "shared memory":
        # round 57 (H100, gpt-oss-20b, --block-k auto): the heuristic itself at the shape's BLOCK_K (64 -> 128)
        # needed 294 KB; it failed at launch and the run stopped. Fewer stages (then a narrower BN) make it fit
        cfg = space.fit(cfg)
    return space, cfg


def fill_missing(m, dtype, spec, path: Path, key: str, before: dict, fixed_bk, fixed_arith,
                 num_sms: int = 132, capability: tuple[int, int] | None = None) -> dict:
    """{bucket: config} for the buckets of :data:`TOKENS` the shape's table in ``path`` lacks, each the first
    of these that the shape's space accepts (BLOCK_K and arithmetic keys fixed, shared memory): ``before``'s
    own entry (only when ``before`` has the shape's BLOCK_K), the format's heuristic for ``num_sms`` SMs (of
    ``capability``), the nearest bucket already in the table (always accepted: it was tuned or kept under the same
    space)."""
    table = out_table(path, key)
    quant = None if spec is None else spec.key
    space = _space(m, dtype, spec, fixed_bk, fixed_arith)
    before = {str(b): c for b, c in before.items()}
    try:
        same_bk = fixed_bk is None or not before or shape_block_k(as_run(before, spec, dtype)) == tuple(fixed_bk)
    except ValueError:  # ``before`` mixes BLOCK_K itself
        same_bk = False
    out = {}
    for t in TOKENS:
        if str(t) in table:
            continue
        tries = [before.get(str(t)) if same_bk else None,
                 heuristic_config(t, m.E, m.H, m.I, m.K, dtype, num_sms, quant, capability)]
        for cand in [c for c in tries if c is not None]:
            cfg = space.apply(cand)
            if space.refusal(cfg) is None:
                out[t] = cfg
                break
        else:
            if table:
                out[t] = nearest_bucket(table, t)
    return out


def log_summary(summary, log) -> None:
    """One line per shape: T: tuned µs (change vs the config in use)."""
    for model, quant, results in summary:
        parts = []
        for t in sorted(results):
            r = results[t]
            if r.get("base_failed"):
                parts.append(f"T={t}: {r['best_us']:.1f} us (the config in use does not run here)")
            elif r["best_us"] == r["best_us"]:  # not NaN
                gain = 100.0 * (1.0 - r["best_us"] / r["base_us"]) if r["base_us"] else 0.0
                failed = f"; the best candidate failed {r['check_failed'].split()[0]}" if r.get("check_failed") else ""
                parts.append(f"T={t}: {r['best_us']:.1f} us ({gain:.0f}% faster{failed})")
            else:
                parts.append(f"T={t}: untuned")
        log(f"summary {model} [{quant}]: " + ", ".join(parts))
