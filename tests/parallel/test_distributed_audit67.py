"""Round 67: torch.distributed.checkpoint and FSDP2 with moekit layers (dist_checks_audit67)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit67  # noqa: E402
from dist_harness import assert_ok, cached_results, world_cases  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", world_cases(dist_checks_audit67, 2))
def test_gloo_world2_audit67(name):
    assert_ok(cached_results(dist_checks_audit67, 2), name)
