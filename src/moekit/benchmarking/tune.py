"""``moekit tune``: search Triton kernel configs for MoE shapes and write them where lookups find them.

For each shape (and weight format: the unquantised dtype, or ``--quant fp8|mxfp4|int4`` on weights
from :func:`moekit.quantize_experts` with the benchmark's formats) and each token count, the search
(:func:`moekit.benchmarking.tune_space.search`) starts from the config in use (the tuned file's
entry, or :func:`~moekit.ops.triton_configs.heuristic_config`), times a few regime priors, then the
neighbours of the best. Each candidate is one whole experts call over ``R`` rotating routings in a
CUDA graph (:func:`~moekit.benchmarking.timer.time_graph`, short replays; clear losers stop after
the eager estimate). Each stage's candidates are compiled first, in parallel (Triton's async
compile); compiled kernels are reused by later buckets. The winner is re-timed against the start,
alternating (median); it is kept only if faster by more than ``min_gain`` and it computes the
start's output (relative RMS < 1e-2 for fp8, whose re-quantised activations may flip, 1e-3
otherwise; a PDL config bit-identical to the same tiles without PDL, a ``w13_split`` config to the
same tiles with the fused w13).

Time: ``budget_s`` bounds each shape. Buckets run largest T first (it fixes BLOCK_K for a new
shape), then ascending; each gets an equal share of what is left (the first 1.5 shares), timing
stops at its share, and buckets reached after the budget keep the config in use (written too).
Progress: a line per bucket with elapsed time and ETA (and a tqdm bar on a terminal).

Every bucket is merged into ``<out>/<device>.json`` as soon as it is done (:func:`merge_entries`:
other shapes and buckets of the file are kept). Batch invariance (SPEC §9): see
:mod:`.tune_space`; an out file whose buckets of one shape already disagree is refused for that shape (the user's
table: remove its entries), while a table in use elsewhere that disagrees (the shipped H100 file predates the rule)
is tuned anew: the largest bucket fixes BLOCK_K and the out file gets a whole table at it.

Whole tables: a lookup takes a shape's table from the first folder that has it and runs the nearest
bucket for any T, so a table of only the tuned buckets would run, e.g., a T = 8 decode tile at T = 16384.
When ``<out>`` has no table for the shape, the table lookups use before the run (shipped, or another
folder's) is copied in first (its BLOCK_K then binds the tuned buckets); a shape no folder has gets every
bucket of :data:`~moekit.benchmarking.shapes.TOKENS` the run did not tune filled with the format's
heuristic at the shape's BLOCK_K. "In use" (where a search starts, what a bucket past the budget keeps)
is what lookups gave before the run, never a bucket this run just wrote.

    moekit tune --models all --out cfgs                  # -> cfgs/NVIDIA_H200.json
    moekit tune --models qwen3-30b-a3b --quant fp8 --quick
    moekit tune --points qwen3-30b-a3b:1,gpt-oss-120b:1024 --pdl
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..ops.activation import is_gated
from ..ops.config_heuristic import heuristic_capability
from ..ops.triton_configs import clear_config_cache, device_key, shape_key, shape_table, user_config_dir
from .shapes import ModelShape
from .timer import runs_on_device, time_graph
from .tune_checks import base_failed, output_checks
from .tune_space import arith, as_run, block_k, config_id, expected_rows, search, shape_arith, shape_block_k
from .tune_tables import bucket_order, config_in_use, fill_missing, log_summary, merge_entries, out_table


def default_out() -> Path:
    """Where ``moekit tune`` writes by default, the first folder the config lookup searches:
    ``$MOEKIT_CONFIG_DIR`` when set, else ``~/.cache/moekit/configs``."""
    env = os.environ.get("MOEKIT_CONFIG_DIR")
    return Path(env) if env else user_config_dir()


def quant_spec(quant: str | None):
    """(format, ``QuantSpec``) of a ``--quant`` name of the benchmark's formats, or (None, None)."""
    if quant is None:
        return None, None
    from ..ops.quant_spec import QuantSpec
    from .bench_quant import QUANT_FORMATS

    fmt = QUANT_FORMATS[quant]
    return fmt, QuantSpec.of(fmt)


def make_problem(t, e, h, i, k, dtype, act, has_bias, device, seed=0, weights=None):
    """(x [T,H], w1 [E,2I|I,H], w2 [E,H,I], topk_weights [T,K] f32, topk_ids [T,K] i32, b1, b2).

    ``weights`` = (w1, w2, b1, b2) to reuse (the big tensors are shared across routings and T)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows = 2 * i if is_gated(act) else i
    x = torch.randn(t, h, device=device, dtype=dtype, generator=g)
    if weights is None:
        w1 = torch.randn(e, rows, h, device=device, dtype=dtype, generator=g) * h**-0.5
        w2 = torch.randn(e, h, i, device=device, dtype=dtype, generator=g) * i**-0.5
        b1 = torch.randn(e, rows, device=device, dtype=dtype, generator=g) * 0.05 if has_bias else None
        b2 = torch.randn(e, h, device=device, dtype=dtype, generator=g) * 0.05 if has_bias else None
    else:
        w1, w2, b1, b2 = weights
    logits = torch.randn(t, e, device=device, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return x, w1, w2, w / w.sum(-1, keepdim=True), ids.int(), b1, b2


class Kernel:
    """One shape's experts call: unquantised, or quantised (``spec`` + ``qw`` = quantize_experts' four)."""

    def __init__(self, act: str, spec=None, qw=None):
        self.act, self.spec, self.qw = act, spec, qw

    def __call__(self, problem, cfg: dict, warmup: bool = False) -> torch.Tensor:
        x, w1, w2, w, ids, b1, b2 = problem
        if self.spec is None:
            from ..ops.triton_experts import fused_experts_impl

            return fused_experts_impl(x, w1, w2, w, ids, self.act, False, b1, b2, None, None, config=cfg,
                                      warmup=warmup)
        from ..ops.triton_experts_quant import fused_experts_quant_impl

        q13, q2, s13, s2 = self.qw
        return fused_experts_quant_impl(x, q13, q2, w, ids, self.spec, s13, s2, None, None, self.act, False, b1, b2,
                                        None, None, config=cfg, warmup=warmup)


def time_config(problems, call: Kernel, cfg: dict, replays: int = 3, target_ms: float = 3.0,
                abort_above_us: float | None = None) -> float:
    """Median µs of one experts call with ``cfg``, rotating over ``problems`` in a CUDA graph."""
    return time_graph(lambda pr: call(pr, cfg), [(pr,) for pr in problems], target_ms=target_ms, replays=replays,
                      abort_above_us=abort_above_us)


def precompile(problem, call: Kernel, cfgs, log) -> None:
    """Compile every candidate's kernels in parallel threads (Triton's async compile mode)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # older Triton: compile lazily, one by one
        return
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        with AsyncCompileMode(pool, ignore_errors=True):
            for cfg in cfgs:
                try:
                    call(problem, cfg, warmup=True)
                except Exception as exc:
                    log(f"  precompile {cfg}: {type(exc).__name__}")
    log(f"  compiled {len(cfgs)} configs in {time.time() - t0:.1f} s")


def confirm(time_fn, base: dict, best: dict, rounds: int = 3) -> tuple[float, float]:
    """(base µs, best µs): medians of ``rounds`` alternating re-timings (drift hits both alike)."""
    times = {"base": [], "best": []}
    for _ in range(rounds):
        times["base"].append(time_fn(base))
        times["best"].append(time_fn(best))
    return statistics.median(times["base"]), statistics.median(times["best"])


@runs_on_device  # (its problems, kernel launches, graphs and events on `device`: round 69)
def tune_point(m: ModelShape, t: int, dtype, device, *, spec=None, call=None, pdl=False, min_gain=0.015,
               rotations=4, weights=None, fixed_bk=None, fixed_arith=None, deadline=None, quick=False,
               log=print, before: dict | None = None) -> tuple[dict, tuple, dict]:
    """(the config to store for ``m`` at ``t`` tokens, the weights used, {"base_us", "best_us"}): the
    winner, or the config in use when nothing beat it. ``spec``/``call``: the quantised format and
    :class:`Kernel` (None: unquantised); ``fixed_bk`` / ``fixed_arith``: the shape's invariants; ``before``:
    the shape's table lookups used before the run (None: the one they use now)."""
    call = call or Kernel(m.act)
    if before is None:
        key = shape_key(m.E, m.H, m.I, m.K, dtype, m.gated, quant=None if spec is None else spec.key)
        before = shape_table(torch.cuda.get_device_name(device), key)[1]
    sms, cap = _device_traits() if torch.device(device).type == "cuda" else (132, None)
    space, base = config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith, sms, cap)
    problems = []
    for r in range(rotations):
        pr = make_problem(t, m.E, m.H, m.I, m.K, dtype, m.act, m.has_bias, device, seed=r, weights=weights)
        weights = (pr[1], pr[2], pr[5], pr[6])
        problems.append(pr)
    best_seen, failed = [float("inf")], {}

    def score(cfg: dict) -> float:
        try:
            us = time_config(problems, call, cfg, abort_above_us=1.3 * best_seen[0] + 1000.0)
        except Exception as exc:  # e.g. out of shared memory for this tile, PDL before sm_90
            log(f"  skip {cfg}: {type(exc).__name__}")
            failed[config_id(cfg)] = type(exc).__name__
            return float("inf")
        best_seen[0] = min(best_seen[0], us)
        return us

    best, times = search(base, expected_rows(t, m.E, m.K), space, score, pdl=pdl, quick=quick, deadline=deadline,
                         precompile=lambda cfgs: precompile(problems[0], call, cfgs, log))
    base_us = times.get(config_id(base), float("nan"))
    if base_us == float("inf"):  # the start failed (timed first, so it has a time): round 57's H100 tune
        why = failed.get(config_id(base), "it failed")
        return base_failed(m, t, spec, call, problems, base, best, times, why, before, log), weights, {
            "base_us": base_us, "best_us": times[config_id(best)], "timed": len(times), "base_failed": True}
    if config_id(best) == config_id(base):
        log(f"  T={t:6d}: the config in use is the fastest of {len(times)} ({base_us:.1f} us) {base}")
        return base, weights, {"base_us": base_us, "best_us": base_us, "timed": len(times)}
    base_us, best_us = confirm(lambda c: time_config(problems, call, c, replays=5, target_ms=5.0), base, best,
                               rounds=2 if quick else 3)
    tol = 1e-2 if spec is not None and spec.fp8 else 1e-3
    ok, why = output_checks(problems, call, best, base, tol)
    take = ok and best_us < (1.0 - min_gain) * base_us
    log(f"  T={t:6d}: {best_us:9.1f} us vs {base_us:9.1f} us in use ({len(times)} timed), checks "
        f"{'ok' if ok else 'FAILED: ' + why}: {'take' if take else 'keep the config in use, not'} {best}")
    return (best if take else base), weights, {"base_us": base_us, "best_us": best_us if take else base_us,
                                               "timed": len(times), **({} if ok else {"check_failed": why})}


class Progress:
    """A line per bucket (done/total, elapsed, ETA within the budget) through ``log``; a tqdm bar too
    when tqdm is importable and stderr is a terminal (``bar=False``: never)."""

    def __init__(self, desc: str, total: int, log, budget_s: float, bar: bool | None = None, clock=None):
        self.desc, self.total, self.log, self.budget_s = desc, total, log, budget_s
        self.clock = clock or time.time
        self.start, self.done, self.bar = self.clock(), 0, None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False)
            except ImportError:
                self.bar = None

    def step(self, t: int, msg: str) -> None:
        self.done += 1
        elapsed = self.clock() - self.start
        left = self.total - self.done
        eta = min(elapsed / self.done * left, max(self.budget_s - elapsed, 0.0)) if left else 0.0
        line = f"  [{self.done}/{self.total}] {self.desc} T={t}: {msg} | elapsed {elapsed:.0f} s, ETA {eta:.0f} s"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _device_name() -> str:
    return torch.cuda.get_device_name(torch.device("cuda"))


def _device_traits() -> tuple[int, tuple[int, int] | None]:
    """The current GPU's SM count and compute capability (the heuristic's, as a runtime lookup would use them)."""
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return p.multi_processor_count, heuristic_capability(p)


def run_tune(targets: list[tuple[ModelShape, list[int]]], dtype=torch.bfloat16, *, out: Path | None = None,
             budget_s: float = 150.0, pdl: bool = False, min_gain: float = 0.015, rotations: int = 4,
             quant: str | None = None, quick: bool = False, log=print, bar: bool | None = None,
             force_block_k: int | None = None, results_out: dict | None = None) -> Path:
    """Tune each (shape, token counts) target on the current CUDA device (weights in ``dtype``, or the
    ``quant`` format); merge every bucket into ``<out>/<device>.json`` as soon as it is done. Returns the path.
    ``force_block_k``: the one BLOCK_K of every bucket of an unquantised shape (SPEC §9), instead of what the largest
    bucket picks (round 51, H100: a new bf16 shape's largest bucket picked 64, 2-4 % slower at T <= 64 than 128); a
    shape whose table in use runs another is tuned anew, one the out file holds at another is skipped (remove its
    entries); chosen over all buckets instead: :func:`.tune_auto.run_tune_auto`. ``results_out``: filled with
    ``{shape key: {T: {"base_us", "best_us", "timed"}}}`` of the tuned buckets."""
    name, (sms, cap) = _device_name(), _device_traits()
    path = (default_out() if out is None else Path(out)) / f"{device_key(name)}.json"
    fmt, spec = quant_spec(quant)
    bk = force_block_k
    if bk is not None and (spec is not None or isinstance(bk, bool) or bk not in (16, 32, 64, 128, 256)):
        raise ValueError(f"force_block_k must be one of 16, 32, 64, 128, 256 and needs an unquantised shape (a "
                         f"quantised format fixes BLOCK_K), got force_block_k={bk!r}, quant={quant!r}")
    summary = []
    for m, tokens in targets:
        key = shape_key(m.E, m.H, m.I, m.K, dtype, m.gated, quant=None if spec is None else spec.key)
        table = out_table(path, key)
        src, before = shape_table(name, key)  # what lookups run for this shape now (any folder)
        before = {str(b): c for b, c in before.items()}
        try:  # (as the launcher runs them: round 65, a raw fp8 table without fp8_acc, or a 4-bit one at another BK,
            # refused every candidate of its first bucket, and the table written then was refused on the next run)
            fixed = as_run(table or before, spec, dtype)
            fixed_bk, fixed_arith = shape_block_k(fixed), shape_arith(fixed)
            anew = False
        except ValueError as exc:
            if table:  # the out file's own table breaks SPEC §9: the user's to remove (never rewritten silently)
                log(f"skipping {m.name} ({key}) in {path}: {exc}")
                continue
            # round 51: a table in use that predates the one-BLOCK_K rule (the shipped H100 file's five shapes) was
            # skipped, so tuning those shapes on an H100 did nothing; it is tuned anew instead (the largest bucket
            # fixes BLOCK_K, the other buckets are filled at it), and the out file's table then replaces it
            log(f"{m.name} ({key}): the table in use ({src}) breaks SPEC §9 ({exc}); tuning the shape anew")
            fixed_bk, fixed_arith, anew = None, None, True
        if bk is not None and fixed_bk is not None and tuple(fixed_bk) != (bk, bk):
            if table:
                log(f"skipping {m.name} ({key}) in {path}: its table runs BLOCK_K {tuple(fixed_bk)}, not "
                    f"force_block_k = {bk} (one per shape, SPEC §9): remove the shape's entries to tune it at {bk}")
                continue
            log(f"{m.name} ({key}): the table in use ({src}) runs BLOCK_K {tuple(fixed_bk)}; tuning the shape anew at "
                f"{bk}")
            fixed_arith, anew = None, True
        if bk is not None:
            fixed_bk = (bk, bk)
        order = bucket_order(tokens)
        if not order:
            log(f"skipping {m.name} ({key}): no token counts to tune")
            continue
        if not table and before and not anew:  # a whole table from the start; the tuned buckets replace its entries
            merge_entries(path, name, key, before)
            log(f"{m.name}: {path} starts from the table in use ({len(before)} buckets)")
        log(f"tuning {m.name} ({key}) on {name}, budget {budget_s:.0f} s" +
            (f", BLOCK_K fixed at {fixed_bk}" if fixed_bk else ""))
        prog = Progress(m.name + (f" {quant}" if quant else ""), len(order), log, budget_s, bar=bar)
        deadline = prog.start + budget_s
        weights, call, results = None, None, {}
        try:
            for n, t in enumerate(order):
                now = time.time()
                if now > deadline:
                    cfg = config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith, sms, cap)[1]
                    info = {"base_us": float("nan"), "best_us": float("nan"), "timed": 0}
                    msg = "budget spent: keeps the config in use"
                else:
                    share = (deadline - now) / (len(order) - n) * (1.5 if n == 0 else 1.0)
                    if call is None:
                        call, weights = make_call(m, dtype, fmt, spec, weights)
                    cfg, weights, info = tune_point(
                        m, t, dtype, torch.device("cuda"), spec=spec, call=call, pdl=pdl, min_gain=min_gain,
                        rotations=rotations, weights=weights, fixed_bk=fixed_bk, fixed_arith=fixed_arith,
                        deadline=min(deadline, now + share), quick=quick, log=log, before=before)
                    msg = f"{info['best_us']:.1f} us (in use {info['base_us']:.1f} us, {info['timed']} timed)"
                fixed_bk, fixed_arith = block_k(cfg), arith(cfg)  # the first bucket fixes them for the others
                results[t] = info
                merge_entries(path, name, key, {t: cfg})
                clear_config_cache()  # later lookups in this process read what was just written
                prog.step(t, msg)
            fill = fill_missing(m, dtype, spec, path, key, before, fixed_bk, fixed_arith, sms, cap)
            if fill:
                merge_entries(path, name, key, fill)
                clear_config_cache()
                log(f"{m.name}: buckets {sorted(fill)} not tuned, written with the heuristic (a whole table)")
        finally:
            prog.close()
            del weights, call
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        summary.append((m.name, quant or "-", results))
        if results_out is not None:
            results_out[key] = results
    log_summary(summary, log)
    log(f"wrote {path}" if summary else f"nothing tuned: {path} not written")
    return path


def make_call(m: ModelShape, dtype, fmt, spec, weights):
    """(the shape's :class:`Kernel`, the unquantised weights (w1, w2, b1, b2)); quantised once per shape, 4-bit
    words re-laid where a layer on the Triton backend would store them so (:mod:`moekit.ops.w4_layout`)."""
    if weights is None:
        pr = make_problem(1, m.E, m.H, m.I, m.K, dtype, m.act, m.has_bias, torch.device("cuda"))
        weights = (pr[1], pr[2], pr[5], pr[6])
    if spec is None:
        return Kernel(m.act), weights
    from ..ops.kernels import kernels_for
    from ..ops.quant_spec import QuantSpec
    from ..ops.quantize import quantize_experts
    from ..ops.w4_layout import packed_layout_for, relay_quantized

    with torch.no_grad():
        qw = quantize_experts(weights[0], weights[1], fmt)
        if packed_layout_for(kernels_for("triton").packed_layouts, fmt, dtype, m.H, m.I) == "rega":
            qw, spec = relay_quantized(qw), QuantSpec.of(fmt, relaid=True)  # as a Triton-backend layer stores them
    return Kernel(m.act, spec, qw), weights
