"""The search space of ``moekit tune`` and its rules, free of any GPU (tested on CPU with a fake timer).

A bucket's search (:func:`search`) has two short stages:

1. **priors**: a handful of whole configs for the regime of ``rows`` = T·K / min(E, T·K) (expected rows
   per touched expert: decode, small, medium, large) and the weight family (``bf16`` for the
   unquantised dtypes, ``fp8``, ``4bit`` for mxfp4 / int4), drawn from the configs that won on H100
   (:data:`PRIORS`), plus swapped decode tiles for the quantised families (4-bit: also on the register-operand
   GEMMs; fp8 up to two rows per expert: also on the Gluon decode GEMMs with PDL); ``quick`` keeps the first
   BLOCK_M and three pairs.
2. **neighbours** of the stage-1 winner: each GEMM's BN halved / doubled, stages ±1, BLOCK_M halved /
   doubled, the TMA, ``w13_split``, ``sum_pass`` and (bf16 with TMA) ``gather_pass`` flags toggled, and the kernel
   forms and PDL
   (:func:`.tune_forms.form_neighbours`: the Gluon GEMMs and their keys, the decode w2's two forms, the
   register-operand 4-bit GEMMs); repeated once around a new winner (``quick``: one round of the TMA / PDL / Gluon toggles only).

Every candidate takes the shape's fixed BLOCK_K and arithmetic keys (batch invariance, below), is
clamped to the problem (BN never wider than needed), goes through the format's
``QuantSpec.fix_config`` (quantised), and is dropped when it breaks invariance, cannot fit in shared
memory, or duplicates one already listed (after fixing). Unknown top-level keys of the base config
(e.g. ``fp8_acc``) are carried through unchanged. Timing stops at the bucket's deadline (the base is
always timed first, so there is always an answer).

Batch invariance (SPEC §9): all buckets of one shape (and quant key) share w13's and w2's BLOCK_K,
never split K, and share every top-level key that changes the arithmetic (:data:`ARITH_KEYS`).
"""

from __future__ import annotations

import json
import time

from ..ops.config_heuristic import (FP8_DEC_SM90_MAX_ROWS, SWAP_4BIT_BM16_ROWS, SWAP_BM16_ROWS, SWAP_MAX_ROWS,
                                    W4_SM90_BM64_ROWS, fp8_sm90_decode, swap_tiles, w4_sm90_tiles)
from ..ops.config_keys import tail_conflicts
from .tune_forms import form_neighbours
from .tune_smem import SMEM_BYTES, smem_estimate

#: (BN, BK, num_warps, num_stages): the tile of one GEMM in the tuner's tuples
TILE_KEYS = ("BN", "BK", "num_warps", "num_stages")
#: top-level config keys that change a token's arithmetic: equal across the buckets of a shape
ARITH_KEYS = ("fp8_acc",)
#: the default BLOCK_K of an unquantised shape's candidates per regime (before the shape fixes one)
DEFAULT_BK = {"decode": 128, "small": 128, "medium": 64, "large": 64}

# family -> regime -> (BLOCK_M values, [((w13 BN, warps, stages), (w2 BN, warps, stages)), ...], tma)
PRIORS = {
    "bf16": {
        "decode": ([16], [((32, 4, 4), (64, 4, 4)), ((64, 4, 4), (64, 4, 4)), ((128, 4, 3), (128, 4, 3)),
                          ((32, 4, 4), (128, 4, 3)), ((64, 4, 4), (128, 4, 3))], False),
        "small": ([32, 64], [((64, 4, 4), (128, 4, 3)), ((128, 4, 3), (128, 4, 3)), ((64, 4, 3), (64, 4, 3)),
                             ((64, 4, 4), (128, 8, 3))], False),
        "medium": ([64, 128], [((64, 4, 4), (128, 4, 4)), ((128, 8, 4), (128, 8, 4)), ((128, 8, 3), (64, 4, 4)),
                               ((128, 8, 3), (256, 8, 3))], True),
        "large": ([128], [((128, 8, 3), (256, 8, 3)), ((128, 8, 4), (128, 8, 4)), ((128, 8, 3), (64, 4, 4)),
                          ((64, 4, 4), (128, 8, 4)), ((64, 4, 3), (128, 8, 3))], True),
    },
    "fp8": {  # BK = the block's k (fixed), 32 <= w13 BN <= BK (< BK: a separate re-quantisation pass), w2 BN <=
        # 128 (fix_config), BLOCK_M >= 64 (wgmma in every bucket)
        "decode": ([64], [((64, 4, 4), (64, 4, 4)), ((32, 4, 4), (64, 4, 4)), ((128, 4, 4), (64, 4, 4)),
                          ((64, 4, 3), (128, 4, 3))], False),
        "small": ([64], [((64, 4, 4), (128, 4, 4)), ((128, 4, 4), (128, 4, 4)), ((64, 4, 4), (64, 4, 4))], False),
        "medium": ([64, 128], [((128, 4, 4), (128, 4, 4)), ((128, 8, 3), (128, 8, 3)), ((64, 4, 4), (128, 4, 4))],
                   True),
        # large: BLOCK_M 128 / 8 warps measured ~2x slower than BLOCK_M 64 / 4 warps on H200 (4 shapes)
        "large": ([64, 128], [((64, 4, 4), (128, 4, 4)), ((128, 4, 4), (128, 4, 4)), ((128, 8, 4), (128, 8, 4))],
                  True),
    },
    "4bit": {  # BK fixed by the format (128), small BN, few stages, no TMA (packed tiles)
        "decode": ([16], [((32, 4, 3), (32, 4, 3)), ((64, 4, 3), (64, 4, 3)), ((32, 4, 2), (64, 4, 3)),
                          ((64, 4, 2), (32, 4, 2))], False),
        "small": ([32], [((32, 4, 3), (64, 4, 3)), ((64, 4, 3), (64, 4, 3)), ((32, 4, 2), (32, 4, 2))], False),
        "medium": ([32, 64], [((64, 4, 3), (64, 4, 3)), ((32, 4, 3), (64, 4, 3)), ((64, 8, 3), (128, 8, 3))], False),
        "large": ([64, 128], [((64, 8, 3), (128, 8, 3)), ((64, 4, 3), (64, 4, 3)), ((128, 8, 2), (128, 8, 2))],
                  False),
    },
}


def regime(rows: float) -> str:
    """decode (<= 8 rows per touched expert), small (<= 48), medium (<= 256), large."""
    return "decode" if rows <= 8 else "small" if rows <= 48 else "medium" if rows <= 256 else "large"


def expected_rows(t: int, e: int, k: int) -> float:
    """Expected rows per touched expert: T·K / min(E, T·K)."""
    slots = max(t * k, 1)
    return slots / min(e, slots)


def family(spec) -> str:
    """``bf16`` (unquantised, any dtype), ``fp8`` or ``4bit`` for a ``QuantSpec`` (None: unquantised)."""
    return "bf16" if spec is None else "fp8" if spec.fp8 else "4bit"


def _cfg(bm: int, c13: tuple, c2: tuple, group_m: int = 8, **flags) -> dict:
    mk = lambda c: dict(zip(TILE_KEYS, c), GROUP_M=group_m)  # noqa: E731
    return {"BLOCK_M": bm, "w13": mk(c13), "w2": mk(c2), **flags}


def config_id(cfg: dict) -> str:
    """A canonical string of ``cfg`` (dedup key; ``tma`` / ``pdl`` False count as absent)."""
    clean = {k: v for k, v in cfg.items()
             if not (k in ("tma", "pdl", "w13_split", "tail_bm", "gather_pass") and not v)
             and not (k == "sum_pass" and v is None)}
    return json.dumps(clean, sort_keys=True)


# -- batch invariance (SPEC §9) ----------------------------------------------------------------------------
def block_k(cfg: dict) -> tuple[int, int]:
    """(w13 BLOCK_K, w2 BLOCK_K): the reduction steps over H and over I."""
    return int(cfg["w13"]["BK"]), int(cfg["w2"]["BK"])


def arith(cfg: dict) -> dict:
    """The arithmetic-changing top-level keys of ``cfg`` (:data:`ARITH_KEYS`), absent ones as None."""
    return {k: cfg.get(k) for k in ARITH_KEYS}


def as_run(table: dict, spec, dtype) -> dict:
    """``{bucket: config}`` as the launcher runs each config: a quantised format's fixed keys applied
    (``spec.fix_config``: its BLOCK_K, the default and clamped ``fp8_acc``); ``ValueError`` from a config it refuses."""
    return table if spec is None else {b: spec.fix_config(c, dtype) for b, c in table.items()}


def shape_block_k(table: dict) -> tuple[int, int] | None:
    """The BLOCK_K shared by every bucket of one shape's ``{bucket: config}`` (None when empty);
    ``ValueError`` when the buckets disagree (their outputs may differ with the batch size)."""
    found = {block_k(c) for c in table.values()}
    if len(found) > 1:
        raise ValueError(f"the buckets of this shape use different BLOCK_K {sorted(found)}: a token's output "
                         "could change with the batch size (SPEC §9); remove the shape's entries and re-tune")
    return found.pop() if found else None


def shape_arith(table: dict) -> dict | None:
    """The arithmetic keys shared by every bucket of a shape (None when empty); ``ValueError`` if they differ."""
    found = {json.dumps(arith(c), sort_keys=True) for c in table.values()}
    if len(found) > 1:
        raise ValueError(f"the buckets of this shape disagree on {', '.join(ARITH_KEYS)} ({sorted(found)}): a "
                         "token's output could change with the batch size (SPEC §9); remove the shape's entries")
    return json.loads(found.pop()) if found else None


def invariance_violation(cfg: dict, fixed_bk: tuple[int, int] | None, fixed_arith: dict | None = None) -> str | None:
    """Why ``cfg`` cannot join a shape whose buckets use ``fixed_bk`` (and ``fixed_arith``) without
    breaking batch invariance (SPEC §9), or None: split-K, another ``BLOCK_K``, or another value of an
    arithmetic key (None: not fixed yet)."""
    for part in (cfg, cfg.get("w13", {}), cfg.get("w2", {})):
        if int(part.get("SPLIT_K", 1)) != 1:
            return f"split-K ({part['SPLIT_K']})"
    if fixed_bk is not None and block_k(cfg) != tuple(fixed_bk):
        return f"BLOCK_K {block_k(cfg)} differs from the shape's {tuple(fixed_bk)}"
    if fixed_arith is not None:
        for key, want in fixed_arith.items():
            if cfg.get(key) != want:
                return f"{key}={cfg.get(key)!r} differs from the shape's {want!r}"
    return None


def with_block_k(cfg: dict, bk: tuple[int, int] | None) -> dict:
    """``cfg`` with its BLOCK_K set to ``bk`` (unchanged when None)."""
    if bk is None:
        return cfg
    return {**cfg, "w13": {**cfg["w13"], "BK": bk[0]}, "w2": {**cfg["w2"], "BK": bk[1]}}


def with_arith(cfg: dict, fixed: dict | None) -> dict:
    """``cfg`` with the shape's arithmetic keys (a None value removes the key; ``fixed`` None: unchanged)."""
    if fixed is None:
        return cfg
    out = {k: v for k, v in cfg.items() if k not in fixed}
    out.update({k: v for k, v in fixed.items() if v is not None})
    return out


# -- candidates ----------------------------------------------------------------------------------------------
def clamp(cfg: dict, inter: int, hidden: int) -> dict:
    """BN never wider than the problem (w13: I columns, w2: H); stays a power of two >= 16."""
    out = {**cfg, "w13": dict(cfg["w13"]), "w2": dict(cfg["w2"])}
    for part, n in (("w13", inter), ("w2", hidden)):
        while out[part]["BN"] > 16 and out[part]["BN"] // 2 >= n:
            out[part]["BN"] //= 2
    return out


class Space:
    """Turns raw candidates into valid, distinct ones for one bucket: see the module docstring.

    dims = (E, H, I, K, gated); ``spec``: a ``QuantSpec`` or None; ``dtype``: the activations' dtype;
    ``bk`` / ``fixed_arith``: the shape's fixed BLOCK_K / arithmetic keys (None: not fixed yet)."""

    def __init__(self, dims, dtype, spec=None, bk=None, fixed_arith=None, elt: int = 2):
        self.dims, self.dtype, self.spec, self.bk, self.fixed_arith = dims, dtype, spec, bk, fixed_arith
        self.family = family(spec)
        self.elt = 1 if self.family == "fp8" else elt
        self.w_elt = {"fp8": 1, "4bit": 0.5}.get(self.family, elt)
        self.seen: set[str] = set()
        self.refused: list[tuple[dict, str]] = []

    def apply(self, cfg: dict) -> dict:
        """``cfg`` with the shape's BLOCK_K and arithmetic keys, clamped, fixed by the format."""
        _, h, i, _, _ = self.dims
        cfg = clamp(with_arith(with_block_k(cfg, self.bk), self.fixed_arith), i, h)
        if self.family == "4bit":  # packed tiles never use TMA: the flag would only duplicate
            cfg = {k: v for k, v in cfg.items() if k != "tma"}
        return self.spec.fix_config(cfg, self.dtype) if self.spec is not None else cfg

    def refusal(self, cfg: dict) -> str | None:
        """Why the (applied) ``cfg`` cannot join this shape: invariance or shared memory; None when it can."""
        why = invariance_violation(cfg, self.bk, self.fixed_arith)
        if why is None and any(smem_estimate(cfg, w, self.elt, self.w_elt, self.dims[4]) > SMEM_BYTES
                               for w in ("w13", "w2")):
            why = "shared memory"
        return why

    def fit(self, cfg: dict) -> dict:
        """The applied ``cfg`` made to fit shared memory where it does not: each GEMM over the limit loses a ring
        stage (down to 2), then halves its BN (down to 16); unchanged when it fits or cannot be made to (the
        start of a search at a BLOCK_K the config in use was not made for: round 57's H100 tune)."""
        cfg = self.apply(cfg)
        for part in ("w13", "w2"):
            size = smem_estimate(cfg, part, self.elt, self.w_elt, self.dims[4])
            while size > SMEM_BYTES:
                c = dict(cfg[part])
                if int(c["num_stages"]) > 2:
                    c["num_stages"] = int(c["num_stages"]) - 1
                elif c["BN"] > 16:
                    c["BN"] //= 2
                else:
                    break
                smaller = self.apply({**cfg, part: c})
                new_size = smem_estimate(smaller, part, self.elt, self.w_elt, self.dims[4])
                if new_size >= size:  # the format's rules undid the step (e.g. a swapped 4-bit tile's BN)
                    break
                cfg, size = smaller, new_size
        return cfg

    def fix(self, cfg: dict) -> dict | None:
        """The candidate as it would run, or None when refused or already listed."""
        cfg = self.apply(cfg)
        why = self.refusal(cfg)
        if why is not None:
            self.refused.append((cfg, why))
            return None
        key = config_id(cfg)
        if key in self.seen:
            return None
        self.seen.add(key)
        return cfg

    def fix_all(self, cfgs) -> list[dict]:
        return [c for c in (self.fix(c) for c in cfgs) if c is not None]


def _extra(base: dict) -> dict:
    """The base's top-level keys the tuner does not vary (carried through opaquely)."""
    return {k: v for k, v in base.items() if k not in ("BLOCK_M", "w13", "w2", "tma", "pdl")}


def _add_new(out: list[dict], cands: list[dict]) -> None:
    """Append to ``out`` each of ``cands`` whose :func:`config_id` it does not hold yet."""
    ids = {config_id(c) for c in out}
    for c in cands:
        if config_id(c) not in ids:
            ids.add(config_id(c))
            out.append(c)


def prior_configs(rows: float, base: dict, fam: str, bk: tuple[int, int] | None, quick: bool = False) -> list[dict]:
    """Stage-1 candidates (raw, before :meth:`Space.fix`) for ``rows`` rows per touched expert."""
    reg = regime(rows)
    bms, pairs, tma = PRIORS[fam][reg]
    if bk is None:
        k = DEFAULT_BK[reg] if fam == "bf16" else int(base["w13"]["BK"])
        bk = (k, k)
    if quick:
        bms, pairs = bms[:1], pairs[:3]
    extra, flags = _extra(base), ({"tma": True} if tma else {})
    out = [_cfg(bm, (a[0], bk[0], a[1], a[2]), (b[0], bk[1], b[1], b[2]), **flags, **extra)
           for bm in bms for a, b in pairs]
    if fam == "bf16" and reg == "large" and not quick and bk == (64, 64):  # a new shape: try BLOCK_K 128 too
        out += [_cfg(128, (64, 128, 4, 3), (128, 128, 8, 3), tma=True, **extra)]
    # swapped decode tiles (weights on wgmma's M side): fp8 and (since the k-order barrier) 4-bit measured
    # faster and bit-identical on the H200; the tuner's swap_identical still checks every swapped winner
    if fam != "bf16" and rows <= SWAP_MAX_ROWS:
        bm16 = SWAP_4BIT_BM16_ROWS if fam == "4bit" else SWAP_BM16_ROWS  # the heuristic's bound per family
        swapped = [swap_tiles(c, rows, bm16) for c in out[:1 if quick else 2]]
        if not quick:
            st = 3 if fam == "4bit" else 4
            swapped.append(swap_tiles(_cfg(16, (128, bk[0], 4, st), (128, bk[1], 4, st), tma=fam == "fp8", **extra),
                                      rows, bm16))
        _add_new(out, swapped)  # two priors may differ only in what swapping overrides
    if fam == "4bit" and not quick:
        # the register-operand Gluon GEMMs as the sm_90 heuristic runs them at these rows (w4_sm90_tiles) and, past 16
        # rows, at the other token block too, and with w2 also on them (Mixtral-8x7B's T >= 1024 winner). No stage-2
        # neighbour reaches them from an unswapped winner (the register-operand toggle follows swapped winners only):
        # H200 round 35, Qwen3-30B-A3B T = 1 / 2, 6-18 % faster than the unswapped Triton winner; round 36, Mixtral
        # T = 256, which had kept Triton tiles. They replace round 6's swapped big Triton tiles (BN 128, 8 warps),
        # which no H200 table kept. Swapped winners are checked by swap_identical on the GPU
        forms = [w4_sm90_tiles(rows)]
        if rows > SWAP_MAX_ROWS:
            bm64, bm128 = w4_sm90_tiles(W4_SM90_BM64_ROWS), w4_sm90_tiles(W4_SM90_BM64_ROWS + 1)
            both = dict(bm64["w2"])  # 128-row weight tiles on 8 warps, register operand
            forms += [bm64, bm128, {**bm128, "w13": both, "w2": both}]
        _add_new(out, [{**extra, **f, "w13": dict(f["w13"], BK=bk[0]), "w2": dict(f["w2"], BK=bk[1])} for f in forms])
    if fam == "fp8" and not quick and rows <= FP8_DEC_SM90_MAX_ROWS:
        # the Gluon decode GEMMs as programmatic dependents, as the sm_90 heuristic runs them (fp8_sm90_decode): no
        # stage-2 neighbour reaches both from Triton tiles (the toggles turn one key at a time). H200 round 37, LongCat-
        # Flash T = 1, 3.6 % faster than its table's Triton tiles, which a search without this prior had kept. Without
        # the base's sum_pass / w13_split, either of which keeps the plan off a decode GEMM
        plain = {k: v for k, v in extra.items() if k not in ("sum_pass", "w13_split")}
        _add_new(out, [fp8_sm90_decode(swap_tiles(_cfg(16, (64, bk[0], 4, 4), (64, bk[1], 4, 4), **plain), rows))])
    if fam != "4bit" and reg in ("medium", "large"):
        # w13_split: one accumulator per w13 program (the same bits): big tiles without spills (sm_90 ptxas,
        # DeepSeek-V3 fp8 BLOCK_M 128 / 8 warps: fused 255 registers + 1908 B spilled, split 249 and none)
        w2_bn = 128 if fam == "fp8" else 256
        out += [_cfg(128, (128, bk[0], 8, 4), (w2_bn, bk[1], 8, 3), tma=True, **{**extra, "w13_split": True})]
    # the base's tail blocks only where a prior's tiles take them (round 43: Mixtral's 1024 bucket, "tail_bm": 64,
    # lost its four BLOCK_M 64 priors to the launch plan's refusal)
    return [tail_ok(c) for c in out]


def neighbour_configs(best: dict, pdl: bool, quick: bool = False, fam: str = "bf16") -> list[dict]:
    """Stage-2 candidates (raw) around ``best``: see the module docstring (fp8: BLOCK_M >= 64 unless swapped)."""
    out = [{**best, "tma": not best.get("tma", False)}, {**best, "w13_split": not best.get("w13_split", False)},
           {**best, "sum_pass": True}, {**best, "sum_pass": False}]  # absent: the launcher's slot bound
    if fam == "bf16" and best.get("tma") and not best["w13"].get("SWAP"):  # the w13 input pre-gathered (TMA-read)
        out.append({**best, "gather_pass": not best.get("gather_pass", False)})
    out += form_neighbours(best, pdl, fam)
    bm, tail = int(best["BLOCK_M"]), int(best.get("tail_bm", 0))
    for v in (0, 32, 64):  # tail blocks (the Triton GEMMs, unswapped; fp8 wgmma: >= 64 rows)
        if v != tail and v < bm and not (fam == "fp8" and 0 < v < 64):
            out.append({**best, "tail_bm": v})
    if quick:
        return [tail_ok(c) for c in out]
    for part in ("w13", "w2"):
        c = best[part]
        for change in ({"BN": c["BN"] // 2}, {"BN": c["BN"] * 2}, {"num_stages": c["num_stages"] + 1},
                       {"num_stages": c["num_stages"] - 1}):
            if min(change.values()) >= (16 if "BN" in change else 2) and max(change.values()) <= 256:
                out.append({**best, part: {**c, **change}})
    # fp8 keeps its token rows on wgmma's 64-row side unless both GEMMs are swapped (weights on that side)
    swapped = bool(best["w13"].get("SWAP")) and bool(best["w2"].get("SWAP"))
    for bm in (best["BLOCK_M"] // 2, best["BLOCK_M"] * 2):
        if (64 if fam == "fp8" and not swapped else 16) <= bm <= 128:
            out.append({**best, "BLOCK_M": bm})
    return [tail_ok(c) for c in out]


def tail_ok(cfg: dict) -> dict:
    """``cfg`` without ``"tail_bm"`` where its tiles cannot take tail blocks (a swapped or Gluon GEMM, or tail blocks
    as tall as BLOCK_M: the launch plan would refuse it); ``"tail_bm": 0`` dropped too."""
    tail = int(cfg.get("tail_bm", 0))
    if "tail_bm" in cfg and (tail == 0 or tail_conflicts(cfg["w13"], cfg["w2"]) or tail >= int(cfg["BLOCK_M"])):
        return {k: v for k, v in cfg.items() if k != "tail_bm"}
    return cfg


def search(base: dict, rows: float, space: Space, score, *, pdl: bool = False, quick: bool = False,
           deadline: float | None = None, precompile=None, clock=time.time, rounds: int = 2) -> tuple[dict, dict]:
    """(the fastest config by ``score(cfg) -> µs``, {config_id: µs} of everything timed).

    ``base`` (fixed by ``space`` like every candidate) is timed first; stage 1 and 2 as in the module
    docstring; ``precompile(cfgs)`` is called with each stage's list before it is timed; timing stops
    once ``clock() > deadline``."""
    base = space.apply(base)  # the config in use is always timed (even where the estimates would refuse it)
    space.seen.add(config_id(base))
    times: dict[str, float] = {}

    def run(cfgs) -> None:
        if deadline is not None and times and clock() > deadline:
            return
        if precompile is not None and cfgs:
            precompile(cfgs)
        for c in cfgs:
            key = config_id(c)
            if key in times:
                continue
            if deadline is not None and times and clock() > deadline:
                return
            times[key] = score(c)

    stage1 = space.fix_all(prior_configs(rows, base, space.family, space.bk, quick))
    run([base] + stage1)
    by_id = {config_id(c): c for c in [base] + stage1}
    best = min((by_id[k] for k in times), key=lambda c: times[config_id(c)])
    for _ in range(1 if quick else rounds):  # greedy: the neighbours of the best, while it improves
        stage2 = space.fix_all(neighbour_configs(best, pdl, quick, space.family))
        run(stage2)
        by_id.update({config_id(c): c for c in stage2})
        new = min((by_id[k] for k in times), key=lambda c: times[config_id(c)])
        if config_id(new) == config_id(best):
            break
        best = new
    return best, times
