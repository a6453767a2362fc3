"""EPLB balancing as pure, deterministic functions (no torch.distributed, no state).

Given the load ``L[e]`` of each logical expert (tokens routed to it over a window), find how many
replicas each expert gets and which GPU holds each replica, so that the per-GPU load
``Σ_{replicas ρ on g} L[e(ρ)] / count[e(ρ)]`` is as even as a greedy pass makes it. Hierarchical
(like DeepSeek's EPLB): expert groups → nodes (so a group's tokens stay on one node), then replicas
inside each node, then replicas → the node's GPUs.

Rules, everywhere: arithmetic on loads is exact (``fractions.Fraction``), ties break toward the lowest
id (stable), and no GPU ever holds two replicas of one expert. Every rank that calls these functions
with the same inputs gets the same answer, which is what keeps collectives in step.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch

from ..experts.placement import physical_owners
from ._packing import SEARCH_SLOTS, as_ints, pack, pack_replicas, search_counts, try_all_counts


def _frac(x, what: str = "loads") -> Fraction:
    """``x`` (a finite real >= 0) as an exact fraction; else ``TypeError`` / ``ValueError`` naming ``what``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be an int or float, got {x!r} ({type(x).__name__})")
    if isinstance(x, numbers.Integral):
        x = int(x)
    elif not isinstance(x, Fraction):
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"{what} must be finite, got {x}")
    if x < 0:
        raise ValueError(f"{what} must be >= 0, got {x}")
    return Fraction(x)


def _plain(values):
    """A tensor (a layer's own ``physical_to_logical`` or ``window_load()``) as a list of Python numbers (round 64:
    0-d tensors hash by identity, so ``set`` / ``dict`` lookups said "expert 3 is nowhere in the old placement");
    anything else as it is."""
    return values.tolist() if isinstance(values, torch.Tensor) else values


def _fracs(values: Sequence, name: str) -> list[Fraction]:
    return [_frac(x, f"{name}[{i}]") for i, x in enumerate(values)]


def _count(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def replicate_experts(load: Sequence, num_physical: int, max_replicas: int | None = None) -> list[int]:
    """Replica count per expert: start with one each, then give the next replica to the expert with the
    highest load per replica ``L[e] / count[e]`` (ties: lowest id) that has fewer than ``max_replicas``.

    load: [E] ints/floats >= 0; returns counts [E] summing to ``num_physical``.
    """
    loads = _fracs(load, "load")
    e = len(loads)
    num_physical = _count("num_physical", num_physical)
    if max_replicas is not None:
        max_replicas = _count("max_replicas", max_replicas)
    if num_physical < e:
        raise ValueError(f"num_physical ({num_physical}) must be >= the number of experts ({e})")
    cap = num_physical if max_replicas is None else max_replicas
    if e * cap < num_physical:
        raise ValueError(f"{num_physical} physical experts need more than max_replicas={cap} copies of some of {e} experts")
    counts = [1] * e
    for _ in range(num_physical - e):
        best = None
        for i in range(e):
            if counts[i] >= cap:
                continue
            # strictly greater per-replica load wins; equal keeps the lower id
            if best is None or loads[i] * counts[best] > loads[best] * counts[i]:
                best = i
        counts[best] += 1
    return counts


def balanced_packing(weights: Sequence, num_packs: int, labels: Sequence | None = None) -> list[list[int]]:
    """Split items into ``num_packs`` packs of equal size with even total weight (greedy).

    Items go heaviest first (ties: lowest index) to the lightest pack with room (ties: lowest pack id)
    that holds no item with the same label. If no such pack is left, a repair swap moves an item of a
    full pack into the lowest-id pack with room and puts the new item in its place.
    weights: [N]; labels: [N] or None; returns the item indices of each pack, in placement order.
    """
    w = _fracs(weights, "weights")
    n = len(w)
    num_packs = _count("num_packs", num_packs)
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} packs of equal size")
    # (review of round 62: tensor labels compared by value, as the greedy's == did, not by hash / identity)
    lab = _plain(labels) if isinstance(labels, torch.Tensor) else \
        [x.item() if isinstance(x, torch.Tensor) else x for x in labels] if labels is not None else list(range(n))
    if len(lab) != n:
        raise ValueError(f"labels must have one entry per weight ({n}), got {len(lab)}")
    try:
        {x: 0 for x in lab}
    except TypeError:
        raise TypeError("labels must be hashable (an expert id per item)") from None
    return pack(as_ints(w)[0], num_packs, lab)


def hierarchical_redundancy_bound(num_experts: int, num_gpus: int, num_nodes: int) -> int:
    """The most redundant experts ``R`` hierarchical balancing can place: ``E·(W/N - 1)``.

    Each node holds ``E/N`` experts (whole groups) in ``(E + R)/N`` slots over ``W/N`` GPUs, and no GPU holds two
    replicas of one expert, so a node has at most ``(E/N)·(W/N)`` distinct (expert, GPU) slots: ``(E + R)/N <=
    E·W/N²``, i.e. ``R <= E·(W/N - 1)`` (``num_gpus % num_nodes == 0``). Global balancing needs only ``R <=
    E·(W - 1)``, which every EPLB layer satisfies (checked at construction). Arguments: positive ints, ``num_gpus``
    divisible by ``num_nodes`` (``ValueError`` otherwise)."""
    num_experts, num_gpus, num_nodes = (_count(n, v) for n, v in (("num_experts", num_experts), ("num_gpus", num_gpus),
                                                                  ("num_nodes", num_nodes)))
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be divisible by num_nodes ({num_nodes})")
    return num_experts * (num_gpus // num_nodes - 1)


def balancing_policy(num_experts: int, num_physical: int, num_gpus: int, num_groups: int = 1,
                     num_nodes: int = 1) -> tuple[str, str | None]:
    """``("hierarchical", None)`` or ``("global", why)``: the policy :func:`rebalance_experts` runs for these sizes
    (arguments as there, already checked). Global when ``num_nodes == 1``, when the node count does not divide the
    groups (as DeepSeek's EPLB), or when the redundant experts ``R = num_physical - E`` exceed
    :func:`hierarchical_redundancy_bound` (a node has too few distinct GPUs for its share of the replicas). Arguments
    are checked as there (positive ints, ``num_physical >= num_experts``; ``ValueError`` naming the argument)."""
    num_experts, num_physical, num_groups = (_count(n, v) for n, v in (
        ("num_experts", num_experts), ("num_physical", num_physical), ("num_groups", num_groups)))
    bound = hierarchical_redundancy_bound(num_experts, num_gpus, num_nodes)  # checks num_gpus / num_nodes
    if num_physical < num_experts:
        raise ValueError(f"num_physical ({num_physical}) must be >= num_experts ({num_experts})")
    if num_nodes == 1:
        return "global", None
    if num_groups % num_nodes:
        return "global", f"num_groups ({num_groups}) is not divisible by num_nodes ({num_nodes})"
    if num_physical - num_experts > bound:
        return "global", (
            f"num_redundant_experts = {num_physical - num_experts} exceeds E·(W/N - 1) = {num_experts}·({num_gpus}/"
            f"{num_nodes} - 1) = {bound}, the most that hierarchical balancing can place (no GPU holds two replicas "
            f"of one expert, and each node keeps its groups' replicas)"
        )
    return "hierarchical", None


def rebalance_experts(
    load: Sequence, num_physical: int, num_gpus: int, num_groups: int = 1, num_nodes: int = 1
) -> list[list[int]]:
    """Logical experts on each GPU (each list ascending, ``num_physical / num_gpus`` long).

    Hierarchical when ``num_groups % num_nodes == 0``: (1) pack the ``G`` expert groups (contiguous
    blocks of ``E / G`` ids) onto nodes by group load; (2) inside each node replicate its experts up to
    ``num_physical / num_nodes`` slots, at most ``num_gpus / num_nodes`` copies each; (3) pack the
    replicas (weight ``L[e] / count[e]``, label ``e``) onto the node's GPUs; a node of at most
    :data:`SEARCH_SLOTS` slots then searches the replica counts (:func:`_search_counts`, :func:`_try_all_counts`).
    Otherwise the same with one node and one group (global balancing).

    Too many redundant experts for the nodes (round 50): with ``R = num_physical - E`` above
    ``E·(W/N - 1)`` (:func:`hierarchical_redundancy_bound`) no placement keeps every group's replicas on its node,
    as no GPU may hold two replicas of one expert. Such sizes get global balancing too, with a ``UserWarning``
    saying why (:func:`balancing_policy`; a rebalance reports ``"policy"``), rather than a ``ValueError`` (until round
    49): ``num_nodes`` is only known here (a layer cannot refuse it at construction), the global placement is valid
    (outputs unchanged, only the node locality these sizes cannot have is lost), and a rebalance of a serving model
    should not fail hours after it was built.
    load: [E] per-logical-expert load; GPU ``g`` belongs to node ``g // (num_gpus / num_nodes)``.
    """
    load = _fracs(load, "load")
    e = len(load)
    num_physical = _count("num_physical", num_physical)
    num_groups, num_nodes, num_gpus = (_count(n, v) for n, v in zip(("num_groups", "num_nodes", "num_gpus"),
                                                                      (num_groups, num_nodes, num_gpus)))
    if e % num_groups:
        raise ValueError(f"the number of experts ({e}) must be divisible by num_groups ({num_groups})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be divisible by num_nodes ({num_nodes})")
    if num_physical % num_gpus or num_physical < e:
        raise ValueError(f"num_physical ({num_physical}) must be >= {e} and divisible by num_gpus ({num_gpus})")
    if num_physical > e * num_gpus:  # no policy can place these: refused before choosing one
        raise ValueError(f"num_physical ({num_physical}) must be <= E·num_gpus = {e * num_gpus}: no GPU holds two "
                         f"replicas of one expert")
    policy, why = balancing_policy(e, num_physical, num_gpus, num_groups, num_nodes)
    if policy == "global":
        if why is not None and num_groups % num_nodes == 0:  # too many replicas: not what was asked for, say so
            warnings.warn(f"EPLB: global balancing instead of hierarchical over {num_nodes} nodes: {why}",
                          UserWarning, stacklevel=2)
        num_groups, num_nodes = 1, 1
    per_group = e // num_groups
    group_load = [sum(load[g * per_group : (g + 1) * per_group], Fraction(0)) for g in range(num_groups)]
    node_groups = balanced_packing(group_load, num_nodes)
    gpus_per_node = num_gpus // num_nodes
    slots_per_node = num_physical // num_nodes
    out: list[list[int]] = []
    for node in range(num_nodes):
        experts = sorted(x for g in node_groups[node] for x in range(g * per_group, (g + 1) * per_group))
        if slots_per_node < len(experts) or slots_per_node > len(experts) * gpus_per_node:
            raise ValueError(f"a node holds {len(experts)} experts in {slots_per_node} slots over {gpus_per_node} "
                             "GPUs: each expert needs one slot and at most one copy per GPU")
        node_load = [load[x] for x in experts]
        counts = replicate_experts(node_load, slots_per_node, gpus_per_node)
        worst, gpus = pack_replicas(experts, node_load, counts, gpus_per_node)
        if slots_per_node <= SEARCH_SLOTS:
            worst, gpus = search_counts(experts, node_load, counts, gpus_per_node, worst, gpus)
            worst, gpus = try_all_counts(experts, node_load, gpus_per_node, slots_per_node, worst, gpus)
        out.extend(gpus)
    return out


def assign_slots(gpu_experts: Sequence[Sequence[int]], old_physical_to_logical: Sequence[int], strategy: str) -> list[int]:
    """New ``physical_to_logical`` from the experts of each GPU, moving as few weights as possible:
    a slot that already holds one of its GPU's new experts keeps it; the rest go to the remaining
    slots in ascending order. GPU ``g``'s slots are its physical ids under ``strategy``."""
    old_physical_to_logical = _plain(old_physical_to_logical)
    gpu_experts = [_plain(g) for g in _plain(gpu_experts)]
    p = len(old_physical_to_logical)
    owners = physical_owners(p, len(gpu_experts), strategy)
    slots = [[] for _ in gpu_experts]
    for phys, (rank, _) in enumerate(owners):
        slots[rank].append(phys)
    new, known = [-1] * p, set(old_physical_to_logical)  # (round 61: expert 9 of 4 went into the placement)
    for g, experts in enumerate(gpu_experts):
        if len(set(experts)) != len(experts) or len(experts) != len(slots[g]) or not set(experts) <= known:
            raise ValueError(f"GPU {g} must get {len(slots[g])} distinct experts of old_physical_to_logical "
                             f"(ids {min(known)}..{max(known)}), got {list(experts)}")
        todo = set(experts)
        for phys in slots[g]:
            if old_physical_to_logical[phys] in todo:
                new[phys] = old_physical_to_logical[phys]
                todo.discard(new[phys])
        rest = sorted(todo)
        for phys in slots[g]:
            if new[phys] < 0:
                new[phys] = rest.pop(0)
    return new


def rank_loads(load: Sequence, physical_to_logical: Sequence[int], ep_size: int, strategy: str) -> list[Fraction]:
    """Expected load of each rank: every replica of ``e`` takes ``L[e] / count[e]``."""
    loads = _fracs(_plain(load), "load")
    count = [0] * len(loads)
    for phys, e in enumerate(_plain(physical_to_logical)):
        if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < len(loads):
            raise ValueError(f"physical_to_logical[{phys}] must be a logical expert id in [0, {len(loads)}), got {e!r}")
        count[e] += 1
    if any(c == 0 and loads[e] for e, c in enumerate(count)):  # (round 61: that load vanished from the ranks')
        raise ValueError(f"experts {[e for e, c in enumerate(count) if c == 0 and loads[e]]} carry load but have no "
                         "replica in physical_to_logical")
    owners = physical_owners(len(physical_to_logical), ep_size, strategy)
    out = [Fraction(0)] * ep_size
    for phys, e in enumerate(physical_to_logical):
        out[owners[phys][0]] += loads[e] / count[e]
    return out


def imbalance(load: Sequence, physical_to_logical: Sequence[int], ep_size: int, strategy: str) -> float:
    """``max / mean`` of :func:`rank_loads` (1.0 is perfect; 1.0 as well when there is no load)."""
    per_rank = rank_loads(load, physical_to_logical, ep_size, strategy)
    total = sum(per_rank)
    if total == 0:
        return 1.0
    return float(max(per_rank) * len(per_rank) / total)


def logical_to_physical(physical_to_logical: Sequence[int], num_logical: int, max_replicas: int) -> tuple[list, list]:
    """``(table [E][max_replicas] with -1 padding, counts [E])``; replicas in ascending physical id."""
    table = [[-1] * max_replicas for _ in range(num_logical)]
    counts = [0] * num_logical
    for phys, e in enumerate(physical_to_logical):
        if not 0 <= e < num_logical:
            raise ValueError(f"physical_to_logical[{phys}] = {e} is not a logical expert id in [0, {num_logical})")
        if counts[e] >= max_replicas:
            raise ValueError(f"expert {e} has more than max_replicas={max_replicas} replicas")
        table[e][counts[e]] = phys
        counts[e] += 1
    missing = [e for e in range(num_logical) if counts[e] == 0]
    if missing:
        raise ValueError(f"logical experts {missing} have no physical replica")
    return table, counts


@dataclass(frozen=True)
class Move:
    """Copy the weights in slot ``src_slot`` of EP rank ``src`` into slot ``dst_slot`` of rank ``dst``."""

    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_weight_moves(old: Sequence[int], new: Sequence[int], ep_size: int, strategy: str) -> list[Move]:
    """The copies that turn placement ``old`` into ``new`` (physical ids ascending). A slot whose new
    expert its own rank already holds copies locally; otherwise the source is the ``i``-th old holder
    (ascending physical id) of that expert, ``i`` counting earlier remote fetches of it (spreads sends)."""
    old, new = _plain(old), _plain(new)
    if len(old) != len(new):
        raise ValueError(f"old and new placements differ in length: {len(old)} vs {len(new)}")
    owners = physical_owners(len(old), ep_size, strategy)
    holders: dict[int, list[int]] = {}
    for phys, e in enumerate(old):
        holders.setdefault(e, []).append(phys)
    fetched: dict[int, int] = {}
    moves = []
    for phys, e in enumerate(new):
        if old[phys] == e:
            continue
        dst, dst_slot = owners[phys]
        if e not in holders:
            raise ValueError(f"expert {e} is in the new placement but nowhere in the old one")
        local = [h for h in holders[e] if owners[h][0] == dst]
        if local:
            src_phys = local[0]
        else:
            i = fetched.get(e, 0)
            fetched[e] = i + 1
            src_phys = holders[e][i % len(holders[e])]
        moves.append(Move(owners[src_phys][0], owners[src_phys][1], dst, dst_slot))
    return moves
