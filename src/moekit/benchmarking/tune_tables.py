"""The tables ``moekit tune`` writes: merging a bucket into ``<out>/<device>.json``, the order buckets are
tuned in, the config in use where a search starts, and the buckets a new table is filled with so that it is
whole (a lookup runs the nearest bucket of the first table it finds: see :mod:`.tune`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..ops.triton_configs import heuristic_config, nearest_bucket
from .shapes import TOKENS
from .tune_space import Space


def merge_entries(path: Path, device_name: str, key: str, table: dict) -> None:
    """Merge ``{bucket: config}`` of shape ``key`` into the config file ``path`` (other shapes and
    buckets kept), re-reading it first and replacing it atomically."""
    data = json.loads(path.read_text()) if path.is_file() else {}
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


def config_in_use(m, t, dtype, before: dict, spec, fixed_bk, fixed_arith) -> tuple[Space, dict]:
    """(the shape's search space, the config lookups gave at ``t`` before the run — the nearest bucket of
    ``before``, the shape's table then, else the heuristic of the format — fixed by the space): where a
    search starts, and what a bucket past the budget keeps."""
    quant = None if spec is None else spec.key
    base = nearest_bucket(before, t) or heuristic_config(t, m.E, m.H, m.I, m.K, dtype, quant=quant)
    space = Space((m.E, m.H, m.I, m.K, m.gated), dtype, spec, fixed_bk, fixed_arith, elt=dtype.itemsize)
    return space, space.apply(base)


def fill_missing(m, dtype, spec, path: Path, key: str, before: dict, fixed_bk, fixed_arith) -> dict:
    """{bucket: config} for the buckets of :data:`TOKENS` the shape's table in ``path`` lacks: the format's
    heuristic at the shape's BLOCK_K (``before``'s own entry where it has one)."""
    table = json.loads(path.read_text()).get("entries", {}).get(key, {}) if path.is_file() else {}
    quant = None if spec is None else spec.key
    space = Space((m.E, m.H, m.I, m.K, m.gated), dtype, spec, fixed_bk, fixed_arith, elt=dtype.itemsize)
    return {t: space.apply(before.get(str(t)) or heuristic_config(t, m.E, m.H, m.I, m.K, dtype, quant=quant))
            for t in TOKENS if str(t) not in table}
