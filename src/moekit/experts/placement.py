"""Expert placement: which physical experts (and which slice of I) one rank holds (its owner: RoutedExperts).

Physical experts are the ``E`` logical experts plus ``R`` redundant replicas (``E + R`` slots), spread
over ``ep_size`` ranks, ``(E + R) / ep_size`` each:

- ``"linear"``: rank ``r`` holds physical ids ``[r·n, (r+1)·n)``
- ``"round_robin"``: rank ``r`` holds physical ids ``{p : p % ep_size == r}``

``physical_to_logical[p]`` names the logical expert whose weights slot ``p`` holds (identity for
``p < E`` until EPLB rebalances; the initial replicas ``p >= E`` are chosen by
:func:`initial_physical_to_logical`). Tensor parallelism keeps an ``I / tp_size`` slice of every expert.
Which rank holds a physical id never changes (the kernel-side ``expert_map`` stays fixed); EPLB only
changes ``physical_to_logical``, i.e. which weights a slot holds.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

PLACEMENT_STRATEGIES = ("linear", "round_robin")


def local_physical_ids(num_physical: int, ep_size: int, ep_rank: int, strategy: str) -> tuple[int, ...]:
    """Physical expert ids held by ``ep_rank`` (ascending)."""
    _check_group(ep_size, ep_rank)
    check_counts(num_physical=num_physical)
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"expert_placement_strategy must be one of {list(PLACEMENT_STRATEGIES)}, got {strategy!r}")
    if num_physical % ep_size:
        raise ValueError(
            f"the number of physical experts ({num_physical}) must be divisible by the EP size ({ep_size})"
        )
    n = num_physical // ep_size
    if strategy == "linear":
        return tuple(range(ep_rank * n, (ep_rank + 1) * n))
    return tuple(range(ep_rank, num_physical, ep_size))


def check_ep_sizes(num_logical: int, num_redundant: int, ep_size: int) -> None:
    """Raise ``ValueError`` unless ``E`` and ``E + R`` split evenly over ``ep_size`` ranks and no rank
    would need two replicas of one expert (``R <= E·(W - 1)``)."""
    check_counts(num_experts=num_logical, num_redundant_experts=num_redundant, ep_size=ep_size)
    if ep_size < 1:
        raise ValueError(f"the EP group size must be >= 1, got {ep_size}")
    if num_redundant < 0:
        raise ValueError(f"num_redundant_experts must be >= 0, got {num_redundant}")
    if num_logical % ep_size:
        raise ValueError(
            f"num_experts ({num_logical}) must be divisible by the EP group size ({ep_size}); "
            f"{num_logical} % {ep_size} = {num_logical % ep_size}"
        )
    total = num_logical + num_redundant
    if total % ep_size:
        raise ValueError(
            f"num_experts + num_redundant_experts ({num_logical} + {num_redundant} = {total}) must be divisible "
            f"by the EP group size ({ep_size})"
        )
    if num_redundant > num_logical * (ep_size - 1):
        raise ValueError(
            f"num_redundant_experts ({num_redundant}) must be <= num_experts·(ep_size - 1) = "
            f"{num_logical * (ep_size - 1)}: a rank never holds two replicas of one expert"
        )


def check_counts(**values) -> None:
    """Each value an int (not a bool): ``TypeError`` naming it (round 62: strings and floats reached the arithmetic)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")


def _check_group(ep_size, ep_rank: int = 0) -> None:
    """An EP group size (an int >= 1) and a rank in it (round 61: size 0 gave moves between rank -1 slots, a rank
    past the group physical ids that do not exist)."""
    check_counts(ep_size=ep_size, ep_rank=ep_rank)
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_size must be >= 1 and ep_rank in [0, ep_size), got ep_size={ep_size}, ep_rank={ep_rank}")


def physical_owners(num_physical: int, ep_size: int, strategy: str) -> tuple[tuple[int, int], ...]:
    """``owners[p] = (rank, local slot)`` of every physical id ``p``."""
    _check_group(ep_size)
    owners = [(-1, -1)] * num_physical
    for r in range(ep_size):
        for slot, p in enumerate(local_physical_ids(num_physical, ep_size, r, strategy)):
            owners[p] = (r, slot)
    return tuple(owners)


def check_physical_to_logical(physical_to_logical, num_logical: int, num_physical: int, ep_size: int,
                              strategy: str) -> tuple[int, ...]:
    """``physical_to_logical`` as a tuple of ints, or ``ValueError``: ``E + R`` entries, each a logical expert in
    ``[0, E)``, every expert held at least once, no EP rank holding two replicas of one expert (round 61: a hand-built
    placement took ids out of range or an expert missing, and the layer's output was silently wrong)."""
    p2l = tuple(int(e) for e in physical_to_logical)
    if len(p2l) != num_physical:
        raise ValueError(f"physical_to_logical must have {num_physical} entries, got {len(p2l)}")
    bad = sorted({e for e in p2l if not 0 <= e < num_logical})
    if bad:
        raise ValueError(f"physical_to_logical entries must be logical experts in [0, {num_logical}), got {bad}")
    missing = sorted(set(range(num_logical)) - set(p2l))
    if missing:
        raise ValueError(f"physical_to_logical must hold every logical expert at least once; missing {missing}")
    seen = set()
    for p, (rank, _) in enumerate(physical_owners(num_physical, ep_size, strategy)):
        if (rank, p2l[p]) in seen:
            raise ValueError(f"physical_to_logical puts two replicas of expert {p2l[p]} on EP rank {rank}")
        seen.add((rank, p2l[p]))
    return p2l


def initial_physical_to_logical(num_logical: int, num_physical: int, ep_size: int, strategy: str) -> tuple[int, ...]:
    """Identity for ``p < E``; each replica slot ``p >= E`` (ascending) gets the logical expert with the
    fewest copies so far (ties: lowest id) among those its rank does not hold yet."""
    check_counts(num_physical=num_physical)
    if num_physical < num_logical:  # (round 62: "num_redundant_experts must be >= 0, got -8", an argument not given)
        raise ValueError(f"num_physical ({num_physical}) must be >= num_logical ({num_logical})")
    check_ep_sizes(num_logical, num_physical - num_logical, ep_size)
    owners = physical_owners(num_physical, ep_size, strategy)
    p2l = list(range(num_logical)) + [-1] * (num_physical - num_logical)
    held = [set() for _ in range(ep_size)]
    copies = [1] * num_logical
    for p in range(num_logical):
        held[owners[p][0]].add(p)
    for p in range(num_logical, num_physical):
        rank = owners[p][0]
        e = min((e for e in range(num_logical) if e not in held[rank]), key=lambda e: (copies[e], e))
        p2l[p] = e
        held[rank].add(e)
        copies[e] += 1
    return tuple(p2l)


@dataclass(frozen=True)
class ExpertPlacement:
    """This rank's share of the experts. ``single(E)`` is the no-parallelism placement."""

    num_logical: int  # E
    num_physical: int  # E + R
    ep_size: int
    ep_rank: int
    tp_size: int
    tp_rank: int
    strategy: str
    local_ids: tuple[int, ...]  # physical ids held here, in local slot order
    physical_to_logical: tuple[int, ...]  # [E + R]

    @staticmethod
    def single(num_experts: int) -> "ExpertPlacement":
        ids = tuple(range(num_experts))
        return ExpertPlacement(num_experts, num_experts, 1, 0, 1, 0, "linear", ids, ids)

    @staticmethod
    def build(
        num_logical: int,
        num_redundant: int = 0,
        *,
        ep_size: int = 1,
        ep_rank: int = 0,
        tp_size: int = 1,
        tp_rank: int = 0,
        strategy: str = "linear",
        physical_to_logical: tuple[int, ...] | None = None,
    ) -> "ExpertPlacement":
        """Placement of rank ``(ep_rank, tp_rank)``; raises ``ValueError`` on sizes that do not split."""
        check_ep_sizes(num_logical, num_redundant, ep_size)
        check_counts(tp_size=tp_size, tp_rank=tp_rank)  # (round 62: tp_size 4.0 gave slices of floats)
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must lie in [0, tp_size={tp_size}), got {tp_rank}")
        num_physical = num_logical + num_redundant
        local = local_physical_ids(num_physical, ep_size, ep_rank, strategy)
        if physical_to_logical is None:
            physical_to_logical = initial_physical_to_logical(num_logical, num_physical, ep_size, strategy)
        physical_to_logical = check_physical_to_logical(physical_to_logical, num_logical, num_physical, ep_size,
                                                        strategy)
        return ExpertPlacement(
            num_logical, num_physical, ep_size, ep_rank, tp_size, tp_rank, strategy, local, physical_to_logical
        )

    def with_physical_to_logical(self, physical_to_logical) -> "ExpertPlacement":
        """The same slots holding other logical experts (after an EPLB rebalance)."""
        new = check_physical_to_logical(physical_to_logical, self.num_logical, self.num_physical, self.ep_size,
                                        self.strategy)
        return dataclasses.replace(self, physical_to_logical=new)

    def owners(self) -> tuple[tuple[int, int], ...]:
        """``(ep rank, local slot)`` of every physical id."""
        return physical_owners(self.num_physical, self.ep_size, self.strategy)

    @property
    def num_local(self) -> int:
        return len(self.local_ids)

    @property
    def is_trivial(self) -> bool:
        """True when this rank holds every expert whole, in logical order."""
        return self.ep_size == 1 and self.tp_size == 1 and self.num_physical == self.num_logical

    def local_logical_ids(self) -> list[int]:
        return [self.physical_to_logical[p] for p in self.local_ids]

    def expert_map(self, device=None) -> torch.Tensor:
        """[E + R] int32: physical id -> local slot, -1 where another rank holds it."""
        m = torch.full((self.num_physical,), -1, dtype=torch.int32)
        for slot, p in enumerate(self.local_ids):
            m[p] = slot
        return m.to(device) if device is not None else m

    def tp_slice(self, inter: int) -> slice:
        """Rows of the full intermediate size ``inter`` this TP rank keeps."""
        if inter % self.tp_size:
            raise ValueError(f"intermediate_size ({inter}) must be divisible by the TP size ({self.tp_size})")
        n = inter // self.tp_size
        return slice(self.tp_rank * n, (self.tp_rank + 1) * n)
