"""Round 46's distributed regressions (EP dispatch of an empty rank, EPLB placement in state dicts, expert mappings
after a rebalance, TP with per-row activation scales) in spawned gloo groups (see dist_checks_fuzz)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_fuzz  # noqa: E402
from dist_harness import assert_ok, run_checks  # noqa: E402

pytestmark = pytest.mark.distributed
_RESULTS: dict = {}


def _results() -> dict:
    if not _RESULTS:
        _RESULTS.update(run_checks(2, list(dist_checks_fuzz.CHECKS), "dist_checks_fuzz", backend="gloo",
                                   timeout=float(os.environ.get("MOEKIT_DIST_TIMEOUT", "240"))))
    return _RESULTS


@pytest.mark.parametrize("name", list(dist_checks_fuzz.CHECKS))
def test_gloo_world2_fuzz_regressions(name):
    assert_ok(_results(), name)
