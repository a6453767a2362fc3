"""Expert/tensor parallelism and EPLB in spawned process groups: gloo on CPU at world sizes 2 and 4,
NCCL on 2 GPUs (marked gpu). One process group per world size runs every check (see dist_checks)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks  # noqa: E402
from dist_harness import assert_ok, run_checks  # noqa: E402

pytestmark = pytest.mark.distributed

_RESULTS: dict = {}


def _results(world: int, backend: str) -> dict:
    key = (world, backend)
    if key not in _RESULTS:
        names = [n for n, worlds in dist_checks.WORLD.items() if world in worlds]
        timeout = float(os.environ.get("MOEKIT_DIST_TIMEOUT", "240"))
        _RESULTS[key] = run_checks(world, names, "dist_checks", backend=backend, timeout=timeout)
    return _RESULTS[key]


def _cases(world):
    return [n for n, worlds in dist_checks.WORLD.items() if world in worlds]


_assert = assert_ok


@pytest.mark.parametrize("name", _cases(2))
def test_gloo_world2(name):
    _assert(_results(2, "gloo"), name)


@pytest.mark.parametrize("name", _cases(4))
def test_gloo_world4(name):
    _assert(_results(4, "gloo"), name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", _cases(2))
def test_nccl_world2(name):
    _assert(_results(2, "nccl"), name)
