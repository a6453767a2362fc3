"""Distributed checks of hierarchical EPLB's limits (run in spawned gloo ranks by dist_harness).

Round 50: with node groups, more redundant experts than ``E·(W/N - 1)`` cannot keep every expert group's replicas on
its node (no GPU holds two replicas of one expert); ``rebalance(num_nodes=N)`` raised ``ValueError`` then. It now
falls back to global balancing with a ``UserWarning`` and reports ``"policy": "global"``.
"""

from __future__ import annotations

import warnings

import torch

from dist_checks import _check_slots, _rank_batch, experts_backend, make_pair, registry
from moekit.parallel.eplb import imbalance

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()
E = 4


def _rebalanced(ctx, redundant: int):
    """(ref, par, args, stats, warnings) after 2 skewed forwards and ``rebalance(num_nodes=2)`` on an E=4 layer with
    2 expert groups (each of the 2 'nodes' is one rank)."""
    ref, par, args = make_pair(ctx, E=E, dtype=torch.bfloat16, ep_group=ctx.world_group, enable_eplb=True,
                               num_redundant_experts=redundant, use_grouped_topk=True, num_expert_group=2,
                               topk_group=1)
    skew = torch.tensor([4.0, 0.0, 3.0, 0.0])  # experts 0 and 2 hot
    x, lg = _rank_batch(ctx, [9, 5], 32, E, torch.bfloat16, ctx.rank, skew=skew)
    for _ in range(2):
        par(x, lg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = par.rebalance(num_nodes=2)
    return ref, par, args, stats, [str(w.message) for w in seen if issubclass(w.category, UserWarning)], (x, lg)


@check(2)
def eplb_hierarchical_too_many_replicas(ctx):
    # edge: R = 2 > E·(W/N - 1) = 4·(2/2 - 1) = 0 (each node is one GPU: its group's 2 experts cannot take 3 slots
    # without two replicas on one GPU); construction allows R <= E·(W - 1) = 4
    ref, par, args, stats, warned, (x, lg) = _rebalanced(ctx, 2)
    ctx.expect(stats["policy"] == "global", f"policy {stats['policy']!r}")
    ctx.expect(any("num_redundant_experts = 2 exceeds" in m and "= 0" in m for m in warned), f"warnings {warned}")
    new = stats["physical_to_logical"]
    for rank in range(ctx.world):  # linear: rank r holds physical ids [3r, 3r + 3)
        held = new[3 * rank: 3 * rank + 3]
        ctx.expect(len(set(held)) == 3, f"rank {rank} holds a duplicate replica: {held}")
    ctx.expect(sorted(set(new)) == list(range(E)), f"an expert lost its replicas: {new}")
    ctx.expect(stats["imbalance_after"] <= stats["imbalance_before"], f"stats {stats}")
    ctx.expect(abs(imbalance(stats["load"], new, ctx.world, "linear") - stats["imbalance_after"]) < 1e-12, "stat")
    _check_slots(ctx, par, args, "after the global fallback")
    ctx.expect_close(par(x, lg), ref(x, lg), "output after the global fallback")


@check(2)
def eplb_hierarchical_at_the_bound(ctx):
    # edge: R = 0 = E·(W/N - 1), exactly the bound: hierarchical, no warning, each node keeps one whole group
    ref, par, args, stats, warned, (x, lg) = _rebalanced(ctx, 0)
    ctx.expect(stats["policy"] == "hierarchical", f"policy {stats['policy']!r}")
    ctx.expect(not any("EPLB" in m for m in warned), f"unexpected warnings {warned}")
    groups = [sorted(stats["physical_to_logical"][2 * r: 2 * r + 2]) for r in range(ctx.world)]
    ctx.expect(sorted(groups) == [[0, 1], [2, 3]], f"groups split over nodes: {groups}")
    ctx.expect_close(par(x, lg), ref(x, lg), "output after the hierarchical rebalance")
