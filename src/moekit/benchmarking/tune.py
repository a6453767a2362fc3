"""``moekit tune``: search Triton kernel configs for MoE shapes and write them where lookups find them.

For each (shape, token count) the search starts from the config in use (the tuned file's entry, or
:func:`moekit.ops.triton_configs.heuristic_config`) and runs a coordinate descent: for each candidate
``BLOCK_M`` it times w13-kernel tiles (w2 fixed), then w2-kernel tiles with the best w13, each with
and without TMA weight tiles (and, with ``pdl``, programmatic dependent launch). Each candidate is one
whole ``fused_experts`` call over ``R`` rotating routings captured in a CUDA graph
(:func:`moekit.benchmarking.timer.time_graph`). The winner is re-timed against the starting config,
alternating, ``3`` rounds (median); it is kept only if it is faster by more than ``min_gain`` and
computes the same output (relative RMS < 1e-2; a PDL config bit-identical to the same tiles without
PDL, eagerly and under graph replay). Every tuned bucket's config is merged into ``<out>/<device>.json``
(the winner, or the starting config when nothing beat it: the lookup takes all buckets of a shape
from one file, so each tuned bucket is written).

Batch invariance (SPEC §9): the buckets of one shape must keep the reduction order, so the tuner
refuses split-K and any candidate whose ``BLOCK_K`` (w13 and w2) differs from the shape's buckets
already in the output file (:func:`invariance_violation`); the first bucket tuned for a new shape fixes
it. A file whose buckets of one shape already disagree is refused (remove that shape's entries).

    moekit tune --models qwen3-30b-a3b --tokens 1,64,1024
    moekit tune --points qwen3-30b-a3b:1,gpt-oss-120b:1024 --pdl
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..ops.activation import is_gated
from ..ops.triton_configs import (
    clear_config_cache, device_key, heuristic_config, lookup_config, shape_key, user_config_dir,
)
from .shapes import ModelShape
from .timer import time_graph

#: (BN, BK, num_warps, num_stages) candidates per regime of rows per expert
SMALL = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)]
MEDIUM = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3)]
LARGE_W13 = [(64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]
LARGE_W2 = [(128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4)]
TILE_KEYS = ("BN", "BK", "num_warps", "num_stages")


def default_out() -> Path:
    """Where ``moekit tune`` writes by default, the first folder the config lookup searches:
    ``$MOEKIT_CONFIG_DIR`` when set, else ``~/.cache/moekit/configs``."""
    env = os.environ.get("MOEKIT_CONFIG_DIR")
    return Path(env) if env else user_config_dir()


def block_k(cfg: dict) -> tuple[int, int]:
    """(w13 BLOCK_K, w2 BLOCK_K): the reduction steps over H and over I."""
    return int(cfg["w13"]["BK"]), int(cfg["w2"]["BK"])


def shape_block_k(table: dict) -> tuple[int, int] | None:
    """The BLOCK_K shared by every bucket of one shape's ``{bucket: config}`` (None when empty);
    ``ValueError`` when the buckets disagree (their outputs may differ with the batch size)."""
    found = {block_k(c) for c in table.values()}
    if len(found) > 1:
        raise ValueError(f"the buckets of this shape use different BLOCK_K {sorted(found)}: a token's output "
                         "could change with the batch size (SPEC §9); remove the shape's entries and re-tune")
    return found.pop() if found else None


def invariance_violation(cfg: dict, fixed_bk: tuple[int, int] | None) -> str | None:
    """Why ``cfg`` cannot join a shape whose buckets use ``fixed_bk`` without breaking batch
    invariance (SPEC §9), or None: split-K (the K slices would be summed in another order), or a
    ``BLOCK_K`` other than ``fixed_bk`` (None: any)."""
    for part in (cfg, cfg.get("w13", {}), cfg.get("w2", {})):
        if int(part.get("SPLIT_K", 1)) != 1:
            return f"split-K ({part['SPLIT_K']})"
    if fixed_bk is not None and block_k(cfg) != tuple(fixed_bk):
        return f"BLOCK_K {block_k(cfg)} differs from the shape's {tuple(fixed_bk)}"
    return None


def with_block_k(cfg: dict, bk: tuple[int, int] | None) -> dict:
    """``cfg`` with its BLOCK_K set to ``bk`` (unchanged when None)."""
    if bk is None:
        return cfg
    return {**cfg, "w13": {**cfg["w13"], "BK": bk[0]}, "w2": {**cfg["w2"], "BK": bk[1]}}


def candidates(rows: float, bm_default: int, bk: tuple[int, int] | None = None) -> tuple[list[int], list, list]:
    """(BLOCK_M values, w13 tiles, w2 tiles) to try for ``rows`` expected rows per touched expert;
    with ``bk`` the tiles take that (w13, w2) BLOCK_K (batch invariance: see the module docstring)."""
    if rows <= 40:
        bms, c13s, c2s = sorted({bm_default, min(128, bm_default * 2)}), SMALL, SMALL
    elif rows <= 200:
        bms, c13s, c2s = sorted({64, 128, bm_default}), MEDIUM, MEDIUM
    else:
        bms, c13s, c2s = [128], LARGE_W13, LARGE_W2
    if bk is not None:
        fix = lambda tiles, k: list(dict.fromkeys((bn, k, w, st) for bn, _, w, st in tiles))  # noqa: E731
        c13s, c2s = fix(c13s, bk[0]), fix(c2s, bk[1])
    return bms, c13s, c2s


def _cfg(bm: int, c13: tuple, c2: tuple, group_m: int = 8, **flags) -> dict:
    mk = lambda c: dict(zip(TILE_KEYS, c), GROUP_M=group_m)  # noqa: E731
    return {"BLOCK_M": bm, "w13": mk(c13), "w2": mk(c2), **flags}


def _tiles(kernel_cfg: dict) -> tuple:
    return tuple(kernel_cfg[n] for n in TILE_KEYS)


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


def _call(problem, act: str, cfg: dict, warmup: bool = False) -> torch.Tensor:
    from ..ops.triton_experts import fused_experts_impl

    x, w1, w2, w, ids, b1, b2 = problem
    return fused_experts_impl(x, w1, w2, w, ids, act, False, b1, b2, None, None, config=cfg, warmup=warmup)


def time_config(problems, act: str, cfg: dict, replays: int = 5) -> float:
    """Median µs of one ``fused_experts`` call with ``cfg``, rotating over ``problems`` in a CUDA graph."""
    return time_graph(lambda pr: _call(pr, act, cfg), [(pr,) for pr in problems], target_ms=8.0, replays=replays)


def precompile(problem, act: str, cfgs, log) -> None:
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
                    _call(problem, act, cfg, warmup=True)
                except Exception as exc:
                    log(f"  precompile {cfg}: {type(exc).__name__}")
    log(f"  precompiled {len(cfgs)} configs in {time.time() - t0:.1f} s")


def same_output(problems, act: str, cfg: dict, ref_cfg: dict) -> bool:
    """``cfg`` computes what ``ref_cfg`` does: finite, relative RMS difference < 1e-2 on every problem."""
    for pr in problems:
        got, ref = _call(pr, act, cfg).float(), _call(pr, act, ref_cfg).float()
        diff = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if not (bool(torch.isfinite(got).all()) and diff < 1e-2):
            return False
    return True


def pdl_identical(problems, act: str, cfg: dict) -> bool:
    """A PDL config equals the same tiles without PDL, bit for bit, eagerly and under CUDA-graph replay."""
    plain = {k: v for k, v in cfg.items() if k != "pdl"}
    want = [_call(pr, act, plain) for pr in problems]
    ok = all(torch.equal(_call(pr, act, cfg), w) for pr, w in zip(problems, want))
    outs = [None] * len(problems)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        _call(problems[0], act, cfg)
        with torch.cuda.graph(graph, stream=stream):
            for j, pr in enumerate(problems):
                outs[j] = _call(pr, act, cfg)
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        ok &= all(torch.equal(o, w) for o, w in zip(outs, want))
    return bool(ok)


def _search(base: dict, rows: float, pdl: bool, score, bk: tuple[int, int] | None = None) -> dict:
    """Coordinate descent from ``base``: the fastest config by ``score(cfg) -> µs`` (tiles with
    BLOCK_K ``bk`` when given; ``base`` must have it too)."""
    bms, c13s, c2s = candidates(rows, base["BLOCK_M"], bk)
    w2_fixed = _tiles(base["w2"])
    flag_sets = [{}, {"tma": True}] + ([{"pdl": True}, {"tma": True, "pdl": True}] if pdl else [])
    best = base
    for bm in bms:
        b13 = min(c13s, key=lambda c: score(_cfg(bm, c, w2_fixed)))
        b2 = min(c2s, key=lambda c: score(_cfg(bm, b13, c)))
        for flags in flag_sets:
            best = min(best, _cfg(bm, b13, b2, **flags), key=score)
    for flags in flag_sets[1:]:
        best = min(best, {**base, **flags}, key=score)
    return best


def _prefill(base: dict, rows: float, pdl: bool, bk: tuple[int, int] | None = None) -> list[dict]:
    """The configs :func:`_search` is likely to time, to compile them in parallel first."""
    bms, c13s, c2s = candidates(rows, base["BLOCK_M"], bk)
    n = max(len(c13s), len(c2s))
    pre = [base] + [_cfg(bm, c13s[j % len(c13s)], c2s[j % len(c2s)]) for bm in bms for j in range(n)]
    pre += [_cfg(bm, c, _tiles(base["w2"])) for bm in bms for c in c13s]
    pre += [dict(c, tma=True) for c in pre] + ([dict(c, pdl=True) for c in pre] if pdl else [])
    return pre


def _confirm(problems, act: str, base: dict, best: dict, rounds: int = 3) -> tuple[float, float]:
    """(base µs, best µs): medians of ``rounds`` alternating re-timings (drift hits both alike)."""
    times = {"base": [], "best": []}
    for _ in range(rounds):
        times["base"].append(time_config(problems, act, base, replays=7))
        times["best"].append(time_config(problems, act, best, replays=7))
    return statistics.median(times["base"]), statistics.median(times["best"])


def tune_point(m: ModelShape, t: int, dtype, device, *, pdl=False, min_gain=0.015, rotations=4,
               weights=None, fixed_bk=None, log=print) -> tuple[dict, tuple]:
    """(the config to store for ``m`` at ``t`` tokens, the weights used): the winner, or the config in
    use when nothing beat it. ``fixed_bk``: the (w13, w2) BLOCK_K of the shape's other buckets (the
    start and every candidate take it: :func:`invariance_violation`)."""
    name = torch.cuda.get_device_name(device)
    key = shape_key(m.E, m.H, m.I, m.K, dtype, m.gated)
    base = with_block_k(lookup_config(name, key, t) or heuristic_config(t, m.E, m.H, m.I, m.K, dtype), fixed_bk)
    problems = []
    for r in range(rotations):
        pr = make_problem(t, m.E, m.H, m.I, m.K, dtype, m.act, m.has_bias, device, seed=r, weights=weights)
        weights = (pr[1], pr[2], pr[5], pr[6])
        problems.append(pr)
    rows = t * m.K / min(m.E, t * m.K)
    precompile(problems[0], m.act, _prefill(base, rows, pdl, fixed_bk), log)
    tried: dict[str, float] = {}

    def score(cfg: dict) -> float:
        k = json.dumps(cfg, sort_keys=True)
        why = invariance_violation(cfg, fixed_bk)
        if why is not None and k not in tried:
            log(f"  refuse {cfg}: {why} (batch invariance)")
            tried[k] = float("inf")
        if k not in tried:
            try:
                tried[k] = time_config(problems, m.act, cfg)
            except Exception as exc:  # e.g. out of shared memory for this tile, PDL before sm_90
                log(f"  skip {cfg}: {type(exc).__name__}")
                tried[k] = float("inf")
        return tried[k]

    best = _search(base, rows, pdl, score, fixed_bk)
    if best == base:
        log(f"  T={t:6d}: the config in use is the fastest ({score(base):.1f} us) {base}")
        return base, weights
    base_us, best_us = _confirm(problems, m.act, base, best)
    ok = same_output(problems, m.act, best, base) and (not best.get("pdl") or pdl_identical(problems, m.act, best))
    take = ok and best_us < (1.0 - min_gain) * base_us
    log(f"  T={t:6d}: {best_us:9.1f} us vs {base_us:9.1f} us in use, checks {'ok' if ok else 'FAILED'}: "
        f"{'take' if take else 'keep the config in use'} {best}")
    return (best if take else base), weights


def run_tune(targets: list[tuple[ModelShape, list[int]]], dtype=torch.bfloat16, *, out: Path | None = None,
             budget_s: float = 600.0, pdl: bool = False, min_gain: float = 0.015, rotations: int = 4,
             log=print) -> Path:
    """Tune each (shape, token counts) target on the current CUDA device; merge winners into
    ``<out>/<device>.json`` (written after every shape, so partial results survive). Returns the path."""
    from tqdm import tqdm

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    path = (default_out() if out is None else Path(out)) / f"{device_key(name)}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"device": name, "entries": {}}
    for m, tokens in targets:
        key = shape_key(m.E, m.H, m.I, m.K, dtype, m.gated)
        table = data["entries"].get(key, {})
        try:
            fixed_bk = shape_block_k(table)
        except ValueError as exc:
            log(f"skipping {m.name} ({key}) in {path}: {exc}")
            continue
        log(f"tuning {m.name} ({key}) on {name}" + (f", BLOCK_K fixed at {fixed_bk}" if fixed_bk else ""))
        deadline, weights = time.time() + budget_s, None
        for t in tqdm(tokens, desc=m.name, leave=False):
            if time.time() > deadline:
                log(f"  budget spent: T={t} and above keep the config in use")
                break
            found, weights = tune_point(m, t, dtype, device, pdl=pdl, min_gain=min_gain, rotations=rotations,
                                        weights=weights, fixed_bk=fixed_bk, log=log)
            data["entries"].setdefault(key, {})[str(t)] = found
            fixed_bk = block_k(found)  # the first bucket of a new shape fixes BLOCK_K for the others
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True))
        clear_config_cache()  # later lookups in this process read what was just written
        del weights
        torch.cuda.empty_cache()
    log(f"wrote {path}")
    return path
