"""benchmarks/quant_probe.py's ``time_alternated``: the A/B scripts' timing (heuristic_ab, zero_ab) rotates the
variants' order each round, so that none is always timed last (round 37: the last ran ~5 % slow)."""

import pytest

from bench_scripts import bench_script


@pytest.fixture(scope="module")
def qp():
    pytest.importorskip("triton")
    with bench_script("quant_probe") as mod:
        yield mod


def test_each_round_rotates_the_order(qp, monkeypatch):
    timed, prepared = [], []
    # a fake timer: the µs are the call's position, so each variant's list shows where it ran in every round
    monkeypatch.setattr(qp, "time_graph", lambda fn, sets, **kw: (timed.append(fn()), float(len(timed)))[1])
    fns = {name: (lambda name=name: name) for name in ("a", "b", "c")}
    got = qp.time_alternated(fns, [()], 4, before=prepared.append)
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert prepared == timed  # before(name) ran right before each timing
    assert got == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}
    assert qp.time_alternated(fns, [()], 0) == {"a": [], "b": [], "c": []}  # no rounds: nothing timed
