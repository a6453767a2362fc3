"""Round 68: an EPLB layer built under inference mode (dist_checks_audit68)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit68  # noqa: E402
from dist_harness import assert_ok, cached_results, world_cases  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", world_cases(dist_checks_audit68, 2))
def test_gloo_world2_audit68(name):
    assert_ok(cached_results(dist_checks_audit68, 2), name)
