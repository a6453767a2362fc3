"""The kernel-form neighbours of ``moekit tune``'s second stage (:func:`.tune_space.neighbour_configs`): the keys
that switch a GEMM between the Triton kernel and its Gluon forms at the same tiles (the same bits), and PDL."""

from __future__ import annotations

from ..ops.config_keys import gluon_rega_value


def without_gluon(part: dict) -> dict:
    """A GEMM's config dict without any ``gluon*`` key: the Triton kernel at the same tiles (the same bits)."""
    return {k: v for k, v in part.items() if not k.startswith("gluon")}


def gluon_toggled(cfg: dict) -> dict:
    """``cfg`` with both GEMMs' ``"gluon"`` switched the other way (set when neither has it, else removed with
    every ``gluon_*`` key)."""
    on = not (cfg["w13"].get("gluon") or cfg["w2"].get("gluon"))
    return {**cfg, **{part: {**without_gluon(cfg[part]), **({"gluon": 1} if on else {})} for part in ("w13", "w2")}}


def rega_toggled(cfg: dict) -> dict:
    """4-bit, both GEMMs swapped: ``cfg`` asking for the register-operand Gluon GEMMs (``"gluon_rega"``: the sum
    pass on, w13 fused, as they need), or, when it asks for them, on the Triton GEMMs (:func:`gluon_toggled`).
    H200 round 13: 3-12 % faster decode steps at the same tiles, slower where the inline align and fused sum
    would have run (gpt-oss T = 1), so the tuner measures it per bucket."""
    if cfg["w13"].get("gluon_rega") or cfg["w2"].get("gluon_rega"):
        return gluon_toggled(cfg)
    return {**cfg, "sum_pass": True, "w13_split": False,
            **{part: {**without_gluon(cfg[part]), "gluon": 1, "gluon_rega": 1} for part in ("w13", "w2")}}


def early_set(cfg: dict, early: int) -> dict:
    """``cfg`` with ``"gluon_early"`` = ``early`` on each GEMM that asks for the register-operand kernels (the ring
    refilled a step earlier, round 20; the key means nothing to the others)."""
    return {**cfg, **{part: {**cfg[part], "gluon_early": early} for part in ("w13", "w2")
                      if gluon_rega_value(part, cfg[part])}}


def form_neighbours(best: dict, pdl: bool, fam: str) -> list[dict]:
    """Candidates around ``best`` that change a kernel form, not a tile: PDL toggled when asked or around an fp8
    decode-w2 winner; fp8: the Gluon GEMMs toggled, the Gluon w2's (or decode w2's) ``gluon_nt`` halved / doubled, the
    Gluon w13's ``gluon_stack`` / ``gluon_ws`` toggled, with swapped w2 tiles the decode w2's ``gluon_dec`` (on / off,
    1 <-> 2), with swapped w13 tiles the decode w13's (on / off); 4-bit with both GEMMs swapped: the register-operand
    GEMMs, their gate-then-up w13 and early refill."""
    out = []
    # PDL toggled; around an fp8 decode-w2 or decode-w13 winner unasked (round 30: 1.4-2.2 µs at two T = 1 buckets,
    # slower at one; round 32: the decode w13's first weight tiles before its grid wait, 5 µs at DeepSeek-V3 T = 1)
    if pdl or (fam == "fp8" and (best["w2"].get("gluon_dec") or best["w13"].get("gluon_dec"))):
        out.append({**best, "pdl": not best.get("pdl", False)})
    if fam == "fp8":  # the Gluon fp8 block GEMMs (the same bits; the launcher runs them where it may)
        out.append(gluon_toggled(best))
        if best["w2"].get("gluon") or best["w2"].get("gluon_dec") == 1:  # column tiles per program, halved / doubled
            nt = int(best["w2"].get("gluon_nt", 1))
            for n in (nt // 2, nt * 2):
                if 1 <= n <= 8 and n != nt:
                    out.append({**best, "w2": {**best["w2"], "gluon_nt": n}})
        if best["w13"].get("gluon"):  # the Gluon w13's forms: gate | up as one wgmma, warp-specialised (2 consumers)
            c13 = best["w13"]
            out.append({**best, "w13": {**c13, "gluon_stack": 0 if c13.get("gluon_stack") else 1}})
            out.append({**best, "w13": {**c13, "gluon_ws": 0 if c13.get("gluon_ws") else 2}})
        if best["w2"].get("SWAP"):  # the Gluon decode w2 (inline layout, fused sum; where the plan takes it), or back
            dec = int(best["w2"].get("gluon_dec", 0))
            out.append({**best, "w2": {**best["w2"], "gluon_dec": 0 if dec else 1}})
            if dec:  # and its other form (2: warp-specialised, one column tile per program)
                c2 = {k: v for k, v in best["w2"].items() if k != "gluon_nt"}
                out.append({**best, "w2": {**c2, "gluon_dec": 3 - dec}})
        if best["w13"].get("SWAP"):  # the Gluon decode w13 (loads in a producer warp; where the plan takes it), or back
            out.append({**best, "w13": {**best["w13"], "gluon_dec": 0 if best["w13"].get("gluon_dec") else 1}})
    if fam == "4bit" and best["w13"].get("SWAP") and best["w2"].get("SWAP"):  # the register-operand GEMMs
        out.append(rega_toggled(best))
        rega = gluon_rega_value("w13", best["w13"])
        if rega:  # and their w13 with gate, then up (one fragment live: four programs per SM), or back
            out.append({**best, "w13": {**best["w13"], "gluon_rega": 3 - rega}})
            # and the ring refilled a step earlier, in both GEMMs (round 20: faster or slower by bucket), or back
            out.append(early_set(best, 0 if best["w13"].get("gluon_early") else 1))
    return out
