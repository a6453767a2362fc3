"""Hierarchical EPLB's limits in a spawned gloo group of 2 ranks (see dist_checks_eplb)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_eplb  # noqa: E402
from dist_harness import assert_ok, run_checks  # noqa: E402

pytestmark = pytest.mark.distributed
_RESULTS: dict = {}


def _results() -> dict:
    if not _RESULTS:
        _RESULTS.update(run_checks(2, list(dist_checks_eplb.CHECKS), "dist_checks_eplb", backend="gloo",
                                   timeout=float(os.environ.get("MOEKIT_DIST_TIMEOUT", "240"))))
    return _RESULTS


@pytest.mark.parametrize("name", list(dist_checks_eplb.CHECKS))
def test_gloo_world2_eplb(name):
    assert_ok(_results(), name)
