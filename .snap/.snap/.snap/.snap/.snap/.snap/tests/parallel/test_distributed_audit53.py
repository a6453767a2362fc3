"""Round 53 audit: EP / TP combinations (quantised formats, routing features, EPLB's life cycle, state dicts, meta
construction) in spawned gloo groups (see dist_checks_audit53)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit53  # noqa: E402
from dist_harness import assert_ok, cached_results, world_cases  # noqa: E402

pytestmark = pytest.mark.distributed

def _cases(world):
    return world_cases(dist_checks_audit53, world)


@pytest.mark.parametrize("name", _cases(2))
def test_gloo_world2_audit53(name):
    assert_ok(cached_results(dist_checks_audit53, 2), name)


@pytest.mark.parametrize("name", _cases(4))
def test_gloo_world4_audit53(name):
    assert_ok(cached_results(dist_checks_audit53, 4), name)
