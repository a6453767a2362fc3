"""Round 52 audit: loaded quantised checkpoints under EP / TP and EPLB, in spawned gloo groups (see
dist_checks_audit52)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit52  # noqa: E402
from dist_harness import assert_ok, cached_results, world_cases  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", world_cases(dist_checks_audit52, 2))
def test_gloo_world2_audit52(name):
    assert_ok(cached_results(dist_checks_audit52, 2), name)


@pytest.mark.parametrize("name", world_cases(dist_checks_audit52, 4))
def test_gloo_world4_audit52(name):
    assert_ok(cached_results(dist_checks_audit52, 4), name)
