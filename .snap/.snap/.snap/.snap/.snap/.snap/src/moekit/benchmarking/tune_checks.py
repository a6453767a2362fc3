"""The tuner's output checks: a candidate computes what the config in use does (tolerance), and the switches
that must not change a bit do not (``w13_split``, ``sum_pass``, swapped tiles, PDL).
``call(problem, cfg)`` runs one experts call under a config (:class:`.tune.Kernel`)."""

from __future__ import annotations

import torch

from .tune_forms import without_gluon
from .tune_space import config_id


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS difference (inf when ``got`` is not finite)."""
    got, ref = got.float(), ref.float()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def same_output(problems, call, cfg: dict, ref_cfg: dict, tol: float) -> bool:
    """``cfg`` computes what ``ref_cfg`` does: finite, relative RMS difference < ``tol`` on every problem."""
    return all(rel_rms(call(pr, cfg), call(pr, ref_cfg)) < tol for pr in problems)


def twin_output(problems, call, cfg: dict, tol: float) -> bool:
    """``cfg`` computes what the unquantised torch twin does: relative RMS difference < ``tol`` on every problem."""
    from ..ops.experts import fused_experts_torch

    for x, w1, w2, w, ids, b1, b2 in problems:
        ref = fused_experts_torch(x, w1, w2, w, ids, activation=call.act, w1_bias=b1, w2_bias=b2)
        if not rel_rms(call((x, w1, w2, w, ids, b1, b2), cfg), ref) < tol:
            return False
    return True


def run_checks(checks) -> tuple[bool, str]:
    """(every check passed, the first failing check's name and why); a check that raises fails, named."""
    for name, check in checks:
        try:
            if not check():
                return False, name
        except Exception as exc:  # noqa: BLE001 - named in the log and the summary, never taken
            return False, f"{name} raised {type(exc).__name__}: {str(exc)[:120]}"
    return True, ""


def same_bits(problems, call, cfg: dict, *refs: dict) -> bool:
    """``cfg``'s output equals every ``refs`` config's bit for bit on every problem."""
    return all(torch.equal(call(pr, cfg), call(pr, ref)) for pr in problems for ref in refs)


def fused_identical(problems, call, cfg: dict) -> bool:
    """A ``w13_split`` / ``sum_pass`` / ``gluon`` / ``tail_bm`` / ``gather_pass`` config equals the same tiles with the
    fused w13, the Triton GEMMs, BLOCK_M blocks only, the w13 input gathered by pointers, and with a stated
    ``sum_pass`` turned the other way (the fused combine or the
    sum pass), bit for bit: the same dots, sums and roundings, so it must, and such a winner may then sit in any
    bucket without breaking SPEC §9.
    (Without the key the launcher picks by slot count, which may be the winner's own word: round 7 compared
    against that and so could test a config with itself.)"""
    gluon = bool(cfg["w13"].get("gluon") or cfg["w2"].get("gluon"))
    if (not cfg.get("w13_split") and cfg.get("sum_pass") is None and not gluon and not cfg.get("tail_bm")
            and not cfg.get("gather_pass")):
        return True  # no switch stated: the reference would be the config itself
    ref = {k: v for k, v in cfg.items() if k not in ("w13_split", "tail_bm", "gather_pass")}
    if cfg.get("sum_pass") is not None:
        ref["sum_pass"] = not cfg["sum_pass"]
    for part in ("w13", "w2"):  # the Gluon GEMMs (fp8, 4-bit, any form): the Triton kernels' bits
        ref[part] = without_gluon(cfg[part])
    return same_bits(problems, call, cfg, ref)


#: ring stages of the unswapped reference at most: the swapped winner's depth at BLOCK_M >= 64 may not fit in shared
#: memory (round 38: gpt-oss fp8, w13 BN 128 with 6 stages, 246 KB), and the depth changes no bit (the same K steps
#: in the same order)
UNSWAPPED_MAX_STAGES = 3


def unswapped(cfg: dict) -> dict:
    """``cfg`` without ``SWAP`` in its kernel dicts, at BLOCK_M >= 64 (the fp8 unswapped wgmma rows) and at most
    :data:`UNSWAPPED_MAX_STAGES` ring stages."""
    out = {**cfg, "BLOCK_M": max(64, int(cfg["BLOCK_M"]))}
    for part in ("w13", "w2"):
        out[part] = {k: v for k, v in cfg[part].items() if k != "SWAP"}
        out[part]["num_stages"] = min(int(out[part]["num_stages"]), UNSWAPPED_MAX_STAGES)
    return out


def swap_identical(problems, call, cfg: dict, base: dict | None = None) -> bool:
    """A swapped config (``"SWAP"`` in a kernel dict) equals, bit for bit, the same tiles unswapped (at
    BLOCK_M >= 64: wgmma over token rows) and ``base``, the bucket's config in use (e.g. a 16-row
    ``mma.sync`` decode tile): the condition for a swapped bucket beside unswapped ones (SPEC §9). Measured
    true for fp8 and bf16 on the H200, and for mxfp4 / int4 since round 5's k-order barrier (false before:
    ``benchmarks/swap_probe.py``), so this is checked, not assumed."""
    return same_bits(problems, call, cfg, unswapped(cfg), *([base] if base is not None else []))


def pdl_identical(problems, call, cfg: dict) -> bool:
    """A PDL config equals the same tiles without PDL, bit for bit, eagerly and under CUDA-graph replay."""
    plain = {k: v for k, v in cfg.items() if k != "pdl"}
    want = [call(pr, plain) for pr in problems]
    ok = all(torch.equal(call(pr, cfg), w) for pr, w in zip(problems, want))
    outs = [None] * len(problems)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        call(problems[0], cfg)
        with torch.cuda.graph(graph, stream=stream):
            for j, pr in enumerate(problems):
                outs[j] = call(pr, cfg)
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        ok &= all(torch.equal(o, w) for o, w in zip(outs, want))
    return bool(ok)


def output_checks(problems, call, best: dict, base: dict | None, tol: float) -> tuple[bool, str]:
    """(every check passed, the first failing check's name and why): ``best`` computes what ``base`` does within
    ``tol`` (``base`` None: a start that cannot run, so the unquantised torch twin is the reference,
    :func:`twin_output`), and where it states PDL, a fused / Gluon / tail switch or swapped tiles, the bits of the same
    tiles without them. A check that raises (round 38: the unswapped reference of a swapped winner out of shared
    memory) fails with its exception named: the winner is not proven, so it is not taken, and the search goes on."""
    if base is None:
        checks = [("twin_output", lambda: twin_output(problems, call, best, tol))]
    else:
        checks = [("same_output", lambda: same_output(problems, call, best, base, tol))]
    if best.get("pdl"):
        checks.append(("pdl_identical", lambda: pdl_identical(problems, call, best)))
    checks.append(("fused_identical", lambda: fused_identical(problems, call, best)))
    if best["w13"].get("SWAP") or best["w2"].get("SWAP"):
        checks.append(("swap_identical", lambda: swap_identical(problems, call, best, base)))
    return run_checks(checks)


class BucketNotTuned(RuntimeError):
    """A bucket whose start cannot run here and no checked candidate can replace it (:func:`base_failed`)."""


def base_failed(m, t, spec, call, problems, base: dict, best: dict, times: dict, why: str, before: dict,
                log) -> dict:
    """The bucket's answer where its start (the config in use, at the shape's BLOCK_K) could not run here (``why``: the
    exception's name): the fastest candidate that ran, once its output matches the torch twin within SPEC §4's bound
    (1e-4 in float32, 1e-2 else: no config in use to compare with) and its switches their bits (PDL, fused / Gluon,
    swapped tiles: :func:`output_checks` with no config in use); :class:`BucketNotTuned` naming the bucket where none
    ran or a check fails, or where the format is quantised (its BLOCK_K is the format's, so its config in use runs
    unless a table is broken)."""
    what = f"{m.name} at T={t}: the config in use does not run here ({why}: {base})"
    if config_id(best) == config_id(base) or times.get(config_id(best), float("inf")) == float("inf"):
        raise BucketNotTuned(f"moekit tune: {what}, and none of the {len(times)} candidates ran")
    if spec is not None:
        hint = ("the table in use is broken: remove the shape's entries and tune again" if before else
                "the format's heuristic gave it: please report this shape")
        raise BucketNotTuned(f"moekit tune: {what}; a quantised shape's BLOCK_K is its format's, so {hint}")
    tol = 1e-4 if problems[0][0].dtype == torch.float32 else 1e-2
    ok, failed_check = output_checks(problems, call, best, None, tol)
    if not ok:
        raise BucketNotTuned(f"moekit tune: {what}, and the fastest candidate failed {failed_check}: {best}")
    log(f"  T={t:6d}: {times[config_id(best)]:9.1f} us; the config in use does not run here ({why}), checks against "
        f"the twin ok: take {best}")
    return best
