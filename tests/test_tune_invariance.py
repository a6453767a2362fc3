"""The tuner refuses configs that would break batch invariance (SPEC §9): split-K, or a BLOCK_K other
than the one the shape's other buckets use."""

import pytest

from moekit.benchmarking.tune import (
    _cfg, _prefill, _search, block_k, candidates, invariance_violation, shape_block_k, with_block_k,
)


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


def test_shape_block_k():
    a = _cfg(16, (64, 128, 4, 4), (64, 256, 4, 4))
    assert shape_block_k({}) is None
    assert shape_block_k({"1": a, "8": dict(a, BLOCK_M=32)}) == (128, 256)
    with pytest.raises(ValueError, match="BLOCK_K"):
        shape_block_k({"1": a, "4096": _cfg(128, (128, 64, 8, 3), (128, 64, 8, 3))})


@pytest.mark.parametrize("rows", [1, 8, 100, 1000])
def test_candidates_take_the_fixed_block_k(rows):
    bms, c13s, c2s = candidates(rows, 16, (64, 128))
    assert bms and {c[1] for c in c13s} == {64} and {c[1] for c in c2s} == {128}
    assert len(set(c13s)) == len(c13s)
    base = with_block_k(_cfg(bms[0], c13s[0], c2s[0]), (64, 128))
    assert all(block_k(c) == (64, 128) for c in _prefill(base, rows, pdl=True, bk=(64, 128)))


def test_search_never_times_another_block_k():
    base = _cfg(16, (64, 256, 4, 4), (64, 256, 4, 4))
    seen = []

    def score(cfg):
        seen.append(cfg)
        return 1.0 / cfg["w13"]["BN"]

    best = _search(base, rows=8, pdl=True, score=score, bk=(256, 256))
    assert block_k(best) == (256, 256) and all(block_k(c) == (256, 256) for c in seen)
