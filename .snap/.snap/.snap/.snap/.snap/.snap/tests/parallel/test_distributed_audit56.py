"""Round 56: a state dict of another rank's share of the experts is refused (see dist_checks_audit56); a
single-process layer's state dict keys are unchanged."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_audit56  # noqa: E402
from dist_harness import assert_ok, run_checks, world_cases  # noqa: E402

import moekit  # noqa: E402

_RESULTS: dict = {}


def _results(world):
    if world not in _RESULTS:  # once per world, a crash included (every test reports it)
        try:
            _RESULTS[world] = run_checks(world, world_cases(dist_checks_audit56, world),
                                         dist_checks_audit56.__name__, timeout=120)
        except Exception as err:  # noqa: BLE001 - reported by each test
            _RESULTS[world] = {"__setup__": f"world {world} crashed: {type(err).__name__}: {err}"}
    return _RESULTS[world]


@pytest.mark.distributed
@pytest.mark.parametrize("name", world_cases(dist_checks_audit56, 2))
def test_gloo_world2_audit56(name):
    assert_ok(_results(2), name)


def test_single_process_state_dict_has_no_shard_key():
    # the edge: a layer on one rank saves no share (its state dict's keys are those of earlier rounds), and a share
    # that does not parse is named as malformed
    layer = moekit.FusedMoE(8, 2, 32, 16, backend="torch")
    layer.load_expert_weights(torch.randn(8, 32, 32), torch.randn(8, 32, 16))
    sd = layer.state_dict()
    assert not any(k.endswith("expert_shard") for k in sd)
    sd["routed_experts.expert_shard"] = torch.tensor([2], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"a malformed share \[2\]; this layer is EP rank 0 of 1"):
        layer.load_state_dict(sd)
