"""The tuner refuses configs that would break batch invariance (SPEC §9): split-K, a BLOCK_K other than
the one the shape's other buckets use, or another value of a top-level key that changes the arithmetic
(``fp8_acc``)."""

import pytest
import torch

from moekit.benchmarking.tune import quant_spec
from moekit.benchmarking.tune_space import (
    Space, _cfg, arith, block_k, invariance_violation, prior_configs, search, shape_arith, shape_block_k,
    with_arith, with_block_k,
)

DIMS = (128, 2048, 768, 8, True)


def test_rule():
    a = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    b = _cfg(128, (128, 64, 8, 3), (128, 64, 8, 3))
    assert invariance_violation(a, None) is None
    assert invariance_violation(a, (128, 128)) is None
    assert "BLOCK_K" in invariance_violation(b, (128, 128))
    assert "BLOCK_K" in invariance_violation(_cfg(16, (64, 128, 4, 4), (64, 64, 4, 4)), (128, 128))
    split = dict(a, w2=dict(a["w2"], SPLIT_K=2))
    assert "split-K" in invariance_violation(split, None)
    assert "split-K" in invariance_violation(dict(a, SPLIT_K=4), (128, 128))
    assert invariance_violation(dict(a, SPLIT_K=1), None) is None
    assert block_k(with_block_k(b, (128, 256))) == (128, 256) and block_k(b) == (64, 64)


def test_arithmetic_keys_are_part_of_the_rule():
    a = _cfg(64, (128, 128, 4, 4), (64, 128, 4, 4), fp8_acc=128)
    assert invariance_violation(a, (128, 128), {"fp8_acc": 128}) is None
    assert "fp8_acc" in invariance_violation(a, (128, 128), {"fp8_acc": 32})
    assert "fp8_acc" in invariance_violation(dict(a, fp8_acc=None), None, {"fp8_acc": 128})
    assert "fp8_acc" in invariance_violation({k: v for k, v in a.items() if k != "fp8_acc"}, None,
                                             {"fp8_acc": 128})
    assert arith(a) == {"fp8_acc": 128} and arith(_cfg(16, (1, 1, 1, 1), (1, 1, 1, 1))) == {"fp8_acc": None}
    assert with_arith(a, {"fp8_acc": None}).get("fp8_acc", "gone") == "gone"
    assert with_arith(a, {"fp8_acc": 32})["fp8_acc"] == 32 and with_arith(a, None) is a


def test_shape_block_k_and_arith():
    a = _cfg(16, (64, 128, 4, 4), (64, 256, 4, 4))
    assert shape_block_k({}) is None and shape_arith({}) is None
    assert shape_block_k({"1": a, "8": dict(a, BLOCK_M=32)}) == (128, 256)
    assert shape_arith({"1": a, "8": dict(a, BLOCK_M=32)}) == {"fp8_acc": None}
    with pytest.raises(ValueError, match="BLOCK_K"):
        shape_block_k({"1": a, "4096": _cfg(128, (128, 64, 8, 3), (128, 64, 8, 3))})
    with pytest.raises(ValueError, match="fp8_acc"):
        shape_arith({"1": a, "8": dict(a, fp8_acc="fp32")})


@pytest.mark.parametrize("rows", [1, 8, 30, 100, 1000])
@pytest.mark.parametrize("quant", [None, "fp8", "mxfp4", "int4"])
def test_every_candidate_keeps_the_shape_invariants(rows, quant):
    _, spec = quant_spec(quant)
    bk = (64, 128) if quant is None else (128, 128)
    fixed = {"fp8_acc": 128} if quant == "fp8" else None
    space = Space(DIMS, torch.bfloat16, spec, bk, fixed)
    base = _cfg(16, (64, 256, 4, 4), (64, 256, 4, 4))
    seen = []

    def score(cfg):
        seen.append(cfg)
        return 1.0 / cfg["w13"]["BN"] + cfg["w2"]["num_stages"] * 1e-3

    best, times = search(base, rows, space, score, pdl=True)
    assert seen and len(times) == len(seen)
    for cfg in seen + [best]:
        assert invariance_violation(cfg, bk, fixed) is None, cfg
        assert block_k(cfg) == bk


def test_a_new_shape_may_try_both_block_k_at_its_first_large_bucket():
    base = _cfg(128, (128, 64, 8, 3), (256, 64, 8, 3), tma=True)
    ks = {block_k(c) for c in prior_configs(2000, base, "bf16", None)}
    assert ks == {(64, 64), (128, 128)}
    assert {block_k(c) for c in prior_configs(2000, base, "bf16", (128, 128))} == {(128, 128)}
