"""Expert placement: which physical experts (and which slice of I) one rank holds.

Physical experts are the ``E`` logical experts plus ``R`` redundant replicas (``E + R`` slots), spread
over ``ep_size`` ranks, ``(E + R) / ep_size`` each:

- ``"linear"``: rank ``r`` holds physical ids ``[r·n, (r+1)·n)``
- ``"round_robin"``: rank ``r`` holds physical ids ``{p : p % ep_size == r}``

``physical_to_logical[p]`` names the logical expert whose weights slot ``p`` holds (identity for
``p < E`` until EPLB rebalances). Tensor parallelism keeps an ``I / tp_size`` slice of every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEMENT_STRATEGIES = ("linear", "round_robin")


def local_physical_ids(num_physical: int, ep_size: int, ep_rank: int, strategy: str) -> tuple[int, ...]:
    """Physical expert ids held by ``ep_rank`` (ascending)."""
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
