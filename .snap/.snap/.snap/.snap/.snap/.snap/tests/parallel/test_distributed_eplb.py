"""EPLB in spawned process groups (see dist_checks_eplb): rebalancing and each dispatch path's equality on tokens split
over ranks, gloo at world sizes 2 and 4 and NCCL on 2 GPUs (marked gpu); hierarchical EPLB's limits at world 2."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_eplb  # noqa: E402
from dist_harness import assert_ok, cached_results, world_cases  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", world_cases(dist_checks_eplb, 2))
def test_gloo_world2_eplb(name):
    assert_ok(cached_results(dist_checks_eplb, 2), name)


@pytest.mark.parametrize("name", world_cases(dist_checks_eplb, 4))
def test_gloo_world4_eplb(name):
    assert_ok(cached_results(dist_checks_eplb, 4), name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", world_cases(dist_checks_eplb, 2))
def test_nccl_world2_eplb(name):
    assert_ok(cached_results(dist_checks_eplb, 2, "nccl"), name)
