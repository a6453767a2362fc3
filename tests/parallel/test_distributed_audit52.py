"""Round 52 audit: loaded quantised checkpoints under EP / TP and EPLB, in spawned gloo groups (see
dist_checks_audit52)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit52  # noqa: E402
from dist_harness import assert_ok, run_checks  # noqa: E402

pytestmark = pytest.mark.distributed
_RESULTS: dict = {}


def _cases(world: int) -> list[str]:
    return [n for n, worlds in dist_checks_audit52.WORLD.items() if world in worlds]


def _results(world: int) -> dict:
    if world not in _RESULTS:
        _RESULTS[world] = run_checks(world, _cases(world), "dist_checks_audit52", backend="gloo",
                                     timeout=float(os.environ.get("MOEKIT_DIST_TIMEOUT", "240")))
    return _RESULTS[world]


@pytest.mark.parametrize("name", _cases(2))
def test_gloo_world2_audit52(name):
    assert_ok(_results(2), name)


@pytest.mark.parametrize("name", _cases(4))
def test_gloo_world4_audit52(name):
    assert_ok(_results(4), name)
