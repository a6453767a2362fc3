"""``moekit tune --block-k auto``: the one BLOCK_K of an unquantised shape (SPEC §9) chosen over all of its buckets.

Without it the largest bucket's search fixes BLOCK_K for the others. For bf16 the untuned heuristic runs BLOCK_K 128 at
its decode tiles and 64 above, so a table whose largest bucket picks 64 runs its decode buckets at 64 too, and was
2-4 % slower there than the untuned heuristic (round 51, H100: gpt-oss-20b, DeepSeek-V2-Lite), while 128 throughout
lost 2-7 % at T >= 256. ``auto`` tunes the shape once per BLOCK_K the heuristic uses over the token counts (each run
with its share of the budget, into a scratch folder, as ``--block-k`` does), then keeps the table whose tuned buckets
are faster in geometric mean over the buckets both runs timed (:func:`pick_block_k`); the run's log shows every
bucket's µs under each. A shape the out file already holds keeps its BLOCK_K (skipped, as ``--block-k`` skips one
held at another value): remove its entries to choose again.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from ..ops.config_heuristic import heuristic_config
from ..ops.triton_configs import clear_config_cache, device_key, shape_key
from .shapes import TOKENS
from .tune_checks import BucketNotTuned
from .tune_space import block_k
from . import tune as _tune
from .tune_tables import bucket_order, merge_entries, out_table


def block_k_candidates(m, dtype, tokens, num_sms: int = 132, capability=None) -> list[int]:
    """The w13 BLOCK_K values the unquantised heuristic uses for shape ``m`` over ``tokens`` and :data:`TOKENS`, the
    largest token count's first (what the largest bucket's search would start from)."""
    out: list[int] = []
    for t in bucket_order(list(tokens) + list(TOKENS)):
        bk = block_k(heuristic_config(t, m.E, m.H, m.I, m.K, dtype, num_sms, None, capability))[0]
        if bk not in out:
            out.append(bk)
    return out


def pick_block_k(results: dict) -> tuple[int, str]:
    """(the BLOCK_K to keep, a line saying why) from ``{bk: {T: {"best_us": µs, ...}}}`` (each run's tuned buckets, in
    candidate order): the lowest geometric mean over the buckets every run timed (a bucket past a run's budget has
    ``best_us`` NaN and is left out) of µs relative to the fastest run at that bucket; the first candidate on a tie or
    when no bucket was timed by every run."""
    bks = list(results)
    common = sorted(t for t in set.intersection(*(set(r) for r in results.values()))
                    if all(math.isfinite(results[bk][t].get("best_us", math.nan)) for bk in bks))
    if not common:
        return bks[0], f"BLOCK_K {bks[0]}: no bucket timed under every BLOCK_K {bks} (budget), the first candidate"
    score = {}
    for bk in bks:
        logs = [math.log(results[bk][t]["best_us"] / min(results[b][t]["best_us"] for b in bks)) for t in common]
        score[bk] = math.exp(sum(logs) / len(logs))
    best = min(bks, key=lambda bk: (score[bk], bks.index(bk)))
    rows = ", ".join(f"T={t}: " + " / ".join(f"{results[bk][t]['best_us']:.1f}" for bk in bks) for t in common)
    return best, (f"BLOCK_K {best} kept: µs under BLOCK_K {' / '.join(map(str, bks))}: {rows}; geometric mean vs the "
                  "fastest " + ", ".join(f"{bk}: {score[bk]:.3f}" for bk in bks))


def run_tune_auto(targets, dtype=torch.bfloat16, *, out: Path | None = None, budget_s: float = 150.0, log=print,
                  quant: str | None = None, **kw) -> Path:
    """:func:`~moekit.benchmarking.tune.run_tune` (same arguments, ``kw``: the others) with BLOCK_K chosen per shape
    over all its buckets (module docstring): one run per :func:`block_k_candidates` value into a scratch folder, then
    the kept run's whole table merged into ``<out>/<device>.json``. Returns that path."""
    if quant is not None:
        raise ValueError(f"force_block_k='auto' needs an unquantised shape (a quantised format fixes BLOCK_K), got "
                         f"quant={quant!r}")
    name, (sms, cap) = _tune._device_name(), _tune._device_traits()  # (through the module: tests replace them)
    path = (_tune.default_out() if out is None else Path(out)) / f"{device_key(name)}.json"
    wrote = False
    for m, tokens in targets:
        key = shape_key(m.E, m.H, m.I, m.K, dtype, m.gated)
        held = out_table(path, key)
        if held:
            log(f"skipping {m.name} ({key}) in {path}: it holds the shape already (its BLOCK_K binds; remove the "
                "shape's entries to choose BLOCK_K anew with --block-k auto)")
            continue
        cands = block_k_candidates(m, dtype, tokens, sms, cap)
        log(f"{m.name}: BLOCK_K candidates {cands}, {budget_s / len(cands):.0f} s each")
        tables, results = {}, {}
        with tempfile.TemporaryDirectory(prefix="moekit-tune-bk-") as tmp:
            for bk in cands:
                got: dict = {}
                try:
                    p = _tune.run_tune([(m, tokens)], dtype, out=Path(tmp) / str(bk), budget_s=budget_s / len(cands),
                                       log=lambda s: None if s.startswith(("wrote ", "nothing tuned")) else log(s),
                                       force_block_k=bk, results_out=got, **kw)  # (the scratch file's path: not told)
                except BucketNotTuned as exc:  # no tile of a bucket ran (or passed its checks) at this BLOCK_K
                    log(f"{m.name}: BLOCK_K {bk} left out: {exc}")
                    continue
                table = out_table(p, key)
                if table and key in got:
                    tables[bk], results[bk] = table, got[key]
        if not tables:
            log(f"{m.name}: no run under {cands} wrote a table")
            continue
        bk, why = pick_block_k(results)
        log(f"{m.name}: {why}")
        merge_entries(path, name, key, tables[bk])
        clear_config_cache()
        wrote = True
    log(f"wrote {path}" if wrote else f"nothing tuned: {path} not written")
    return path
