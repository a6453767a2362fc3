"""Round 54 audit: a rank that fails before a forward's first collective makes every rank raise (EP both dispatchers,
TP with the token check, EP x TP) instead of leaving its peers in the collective (see dist_checks_audit54)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit54  # noqa: E402
from dist_harness import assert_ok, run_checks, world_cases  # noqa: E402

import moekit  # noqa: E402

pytestmark = pytest.mark.distributed
_RESULTS: dict = {}
#: the whole world's bound (a regression makes the peers wait dist_checks_audit54.GROUP_TIMEOUT_S per collective)
WORLD_TIMEOUT_S = 120


def _results(world):
    if world not in _RESULTS:  # once per world, a crash included (a rank aborted by gloo: every test reports it)
        try:
            _RESULTS[world] = run_checks(world, world_cases(dist_checks_audit54, world),
                                         dist_checks_audit54.__name__, timeout=WORLD_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - reported by each test
            _RESULTS[world] = {"__setup__": f"world {world} crashed: {type(err).__name__}: {err}"}
    return _RESULTS[world]


def _cases(world):
    return world_cases(dist_checks_audit54, world)


@pytest.mark.parametrize("name", _cases(2))
def test_gloo_world2_audit54(name):
    assert_ok(_results(2), name)


@pytest.mark.parametrize("name", _cases(4))
def test_gloo_world4_audit54(name):
    assert_ok(_results(4), name)


def test_single_process_layer_unchanged():
    # no groups: the runner's forward is the plain call (no guard) and a bad input raises as before
    layer = moekit.FusedMoE(8, 2, 32, 16, backend="torch", device="cpu")
    assert not hasattr(layer.expert_executor, "forward_guard")
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[\.\.\., 32\]"):
        layer(torch.randn(3, 16), torch.randn(3, 8))
    eplb_only = moekit.FusedMoE(8, 2, 32, 16, backend="torch", device="cpu", enable_eplb=True)
    assert eplb_only.expert_executor.forward_guard() is None  # a parallel executor without groups: no guard
