"""Round 62: executor settings that differ between EP ranks are refused on every rank (see dist_checks_audit62)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit62  # noqa: E402
from dist_harness import assert_ok, run_checks, world_cases  # noqa: E402

_RESULTS: dict = {}


def _results(world):
    if world not in _RESULTS:  # once per world, a crash included (every test reports it)
        try:
            _RESULTS[world] = run_checks(world, world_cases(dist_checks_audit62, world),
                                         dist_checks_audit62.__name__, timeout=120)
        except Exception as err:  # noqa: BLE001 - reported by each test
            _RESULTS[world] = {"__setup__": f"world {world} crashed: {type(err).__name__}: {err}"}
    return _RESULTS[world]


@pytest.mark.distributed
@pytest.mark.parametrize("name", world_cases(dist_checks_audit62, 2))
def test_gloo_world2_audit62(name):
    assert_ok(_results(2), name)
