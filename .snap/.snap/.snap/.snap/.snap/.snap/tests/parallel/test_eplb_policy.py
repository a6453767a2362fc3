"""Hierarchical EPLB's feasibility bound (round 50): pure functions, no process group.

With ``N`` nodes, ``W`` GPUs and ``E`` experts, hierarchical balancing keeps each expert group's replicas on its node,
so a node's ``(E + R)/N`` slots need ``R <= E·(W/N - 1)`` (no GPU holds two replicas of one expert). Above that,
``rebalance_experts`` raised ``ValueError`` at rebalance time; it now balances globally, with a ``UserWarning``.
"""

from __future__ import annotations

import warnings

import pytest

from moekit.parallel import balancing_policy, hierarchical_redundancy_bound, rebalance_experts

LOAD = [9, 1, 5, 2]  # E = 4, 2 groups of 2: g0 = {0, 1}, g1 = {2, 3}


def test_bound_values():
    # E·(W/N - 1): 4 experts, 4 GPUs over 2 nodes -> 4; one GPU per node -> 0; one node -> E·(W - 1)
    assert hierarchical_redundancy_bound(4, 4, 2) == 4
    assert hierarchical_redundancy_bound(4, 2, 2) == 0
    assert hierarchical_redundancy_bound(4, 4, 1) == 12


def test_at_the_bound_stays_hierarchical():
    # edge: R = 4 = E·(W/N - 1) exactly (P = 8 on 4 GPUs, 2 nodes): every expert gets one copy per GPU of its node
    assert balancing_policy(4, 8, 4, 2, 2) == ("hierarchical", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning here
        gpus = rebalance_experts(LOAD, 8, 4, num_groups=2, num_nodes=2)
    nodes = [sorted(set(gpus[0] + gpus[1])), sorted(set(gpus[2] + gpus[3]))]
    assert sorted(nodes) == [[0, 1], [2, 3]], gpus  # each node holds one whole group
    assert all(len(set(g)) == len(g) == 2 for g in gpus)


@pytest.mark.parametrize("p, w, n, r", [
    (12, 4, 2, 8),  # edge: R = 8 > 4 = E·(4/2 - 1) (construction allows up to E·(W - 1) = 12)
    (8, 4, 4, 4),  # edge: one GPU per node (W/N = 1): bound 0, any redundancy is too much
    (6, 2, 2, 2),  # edge: 2 GPUs, 2 nodes, R = 2 > 0
])
def test_above_the_bound_falls_back_to_global_with_a_warning(p, w, n, r):
    # old code: ValueError "a node holds 2 experts in 6 slots over 2 GPUs" at rebalance(); now the global placement
    groups = 4 if n == 4 else 2
    policy, why = balancing_policy(4, p, w, groups, n)
    bound = hierarchical_redundancy_bound(4, w, n)
    assert policy == "global" and f"num_redundant_experts = {r} exceeds" in why and f"= {bound}," in why
    with pytest.warns(UserWarning, match=rf"global balancing instead of hierarchical over {n} nodes: "
                                         rf"num_redundant_experts = {r} exceeds"):
        gpus = rebalance_experts(LOAD, p, w, num_groups=groups, num_nodes=n)
    assert gpus == rebalance_experts(LOAD, p, w)  # exactly the global policy
    assert all(len(set(g)) == len(g) == p // w for g in gpus)  # never two replicas of one expert on a GPU
    assert sorted({x for g in gpus for x in g}) == [0, 1, 2, 3]


def test_groups_not_dividing_nodes_stay_global_without_warning():
    # edge: the documented DeepSeek fallback (G % N != 0) is unchanged: global, no warning, a reason given
    policy, why = balancing_policy(6, 12, 4, 3, 2)
    assert policy == "global" and "not divisible by num_nodes" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert rebalance_experts([8, 2, 3, 3, 6, 6], 12, 4, 3, 2) == rebalance_experts([8, 2, 3, 3, 6, 6], 12, 4)
    # edge: one node is plain global balancing
    assert balancing_policy(4, 8, 4, 2, 1) == ("global", None)


def test_sizes_beyond_global_still_raise():
    # edge: R > E·(W - 1) cannot be placed at all (a layer refuses it at construction); the pure function raises,
    # before choosing a policy (no fallback warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match=r"num_physical \(20\) must be <= E·num_gpus = 16"):
            rebalance_experts(LOAD, 20, 4, num_groups=2, num_nodes=2)


@pytest.mark.parametrize("call, match", [
    (lambda: hierarchical_redundancy_bound(4, 3, 2), "num_gpus .3. must be divisible by num_nodes .2."),  # no split
    (lambda: hierarchical_redundancy_bound(4, 4, 0), "num_nodes must be >= 1, got 0"),  # zero nodes
    (lambda: hierarchical_redundancy_bound(0, 4, 2), "num_experts must be >= 1"),  # no experts
    (lambda: balancing_policy(8, 6, 4, 1, 2), r"num_physical \(6\) must be >= num_experts \(8\)"),  # fewer slots
    (lambda: balancing_policy(8, 8, 4, 1, 0), "num_nodes must be >= 1"),  # ZeroDivisionError before
])
def test_public_helpers_check_their_arguments(call, match):
    # round 50 review: the two public helpers returned 0 / -4 or raised ZeroDivisionError on sizes that cannot be
    with pytest.raises(ValueError, match=match):
        call()
    with pytest.raises(TypeError, match="num_gpus must be an int"):
        hierarchical_redundancy_bound(4, 4.0, 2)
