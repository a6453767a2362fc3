"""Round 61's placement audit: hand-built placements and the EPLB pure functions' arguments."""

import pytest
import torch

import moekit
from moekit.experts.placement import ExpertPlacement
from moekit.experts.routed import RoutedExperts
from moekit.parallel import assign_slots, imbalance, local_physical_ids, plan_weight_moves, rank_loads
from moekit.runner import MoERunner

E, K, H, I = 4, 2, 16, 8


@pytest.mark.parametrize("p2l, match", [
    ((0, 0, 0, 0), r"every logical expert at least once; missing \[1, 2, 3\]"),
    ((0, 1, 2, 7), r"logical experts in \[0, 4\), got \[7\]"),
    ((0, 1, -1, 3), r"logical experts in \[0, 4\), got \[-1\]"),
])
def test_build_refuses_a_placement_that_is_not_one(p2l, match):
    # the edges: ids out of range and an expert missing were accepted; the layer's output was then silently wrong
    with pytest.raises(ValueError, match=match):
        ExpertPlacement.build(E, physical_to_logical=p2l)
    with pytest.raises(ValueError, match=match):
        ExpertPlacement.build(E).with_physical_to_logical(p2l)


def test_build_refuses_two_replicas_on_one_rank():
    # the edge: 4 experts + 2 replicas over 2 ranks (linear: rank 0 holds slots 0-2); a second copy of expert 0 there
    with pytest.raises(ValueError, match="two replicas of expert 0 on EP rank 0"):
        ExpertPlacement.build(E, 2, ep_size=2, physical_to_logical=(0, 1, 0, 2, 3, 1))
    ExpertPlacement.build(E, 2, ep_size=2, physical_to_logical=(0, 1, 2, 2, 3, 0))  # a valid one


def test_permuted_placement_without_eplb_is_refused():
    # the edge: a valid permutation, but without EPLB routing logical expert e runs in slot e: the layer ran the
    # other experts' weights (275 off) before
    ref = moekit.FusedMoE(E, K, H, I, backend="torch")
    experts = RoutedExperts("l", torch.float32, ref.moe_config,
                            placement=ExpertPlacement.build(E, physical_to_logical=(1, 0, 2, 3)))
    with pytest.raises(ValueError, match="without EPLB routing .* logical expert e runs in physical slot e"):
        MoERunner("l", ref.moe_config, ref.router, experts)
    # the identity (hand-built) is fine
    MoERunner("l", ref.moe_config, ref.router,
              RoutedExperts("l", torch.float32, ref.moe_config, placement=ExpertPlacement.build(E)))


@pytest.mark.parametrize("call, err, match", [
    (lambda: rank_loads([1, 1, 1, 100], [0, 1, 2, 2], 2, "linear"), ValueError, r"experts \[3\] carry load"),
    (lambda: imbalance([1, 1, 1, 100], [0, 1, 2, 2], 2, "linear"), ValueError, r"experts \[3\] carry load"),
    (lambda: plan_weight_moves([0, 1], [1, 0], 0, "linear"), ValueError, "ep_size must be >= 1"),
    (lambda: rank_loads([1, 1], [0, 1], 0, "linear"), ValueError, "ep_size must be >= 1"),
    (lambda: local_physical_ids(4, 2, 5, "linear"), ValueError, "ep_rank in .* got ep_size=2, ep_rank=5"),
    (lambda: local_physical_ids(4, 0, 0, "linear"), ValueError, "ep_size must be >= 1"),
    (lambda: local_physical_ids(4, 2, True, "linear"), TypeError, "ep_rank must be an int"),
    (lambda: assign_slots([[0, 1], [2, 9]], [0, 1, 2, 3], "linear"), ValueError, r"GPU 1 must get 2 distinct .*9"),
])
def test_pure_functions_refuse_bad_arguments(call, err, match):
    # the edges: an expert with load and no replica lost its load (imbalance 1.33 reported for 100 : 3), EP size 0
    # planned moves between rank -1 slots, a rank past the group got ids that do not exist, expert 9 of 4 was placed
    with pytest.raises(err, match=match):
        call()


def test_pure_functions_still_accept_an_expert_without_load_or_replica():
    # the control: an expert of zero load without a replica adds nothing to any rank
    assert [float(v) for v in rank_loads([1, 1, 2, 0], [0, 1, 2, 2], 2, "linear")] == [2.0, 2.0]
