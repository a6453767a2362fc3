"""Which expert each slot holds, in state dicts: once EPLB moved a slot, ``state_dict()`` carries the placement beside
the per-slot weights and ``load_state_dict`` restores it, so the loaded weights sit in the slots the placement says.

Round 46: without it, a state dict saved after a rebalance loaded silently into the initial placement (the routing
maps are not persistent buffers), each moved slot holding another expert's weights. A state dict without the key is
the initial placement (as every state dict saved before a rebalance, and before this round, is).
"""

from __future__ import annotations

import torch

from .placement import ExpertPlacement, initial_physical_to_logical

#: the key (under the experts' prefix) of ``physical_to_logical [P]`` int64, saved once EPLB moved a slot
PLACEMENT_KEY = "eplb_physical_to_logical"


def initial_p2l(p: ExpertPlacement) -> tuple[int, ...]:
    return initial_physical_to_logical(p.num_logical, p.num_physical, p.ep_size, p.strategy)


def placement_saved(placement: ExpertPlacement, destination: dict, prefix: str) -> None:
    """Add the placement to a state dict being saved, when it is not the initial one."""
    p2l = tuple(placement.physical_to_logical)
    if p2l != initial_p2l(placement):
        destination[prefix + PLACEMENT_KEY] = torch.tensor(p2l, dtype=torch.int64)


def placement_loaded(experts, state_dict: dict, prefix: str, unexpected_keys: list) -> None:
    """Take the placement of a state dict being loaded (the initial one when it carries none) into ``experts``
    (:meth:`~moekit.RoutedExperts.set_physical_to_logical`); the executor's EPLB maps follow in the runner's load
    hook (:func:`moekit.parallel.eplb_state.follow_experts`)."""
    key = prefix + PLACEMENT_KEY
    if key in unexpected_keys:
        unexpected_keys.remove(key)
    saved = state_dict.get(key)
    p2l = tuple(int(e) for e in saved.tolist()) if saved is not None else initial_p2l(experts.placement)
    if p2l != tuple(experts.placement.physical_to_logical):
        experts.set_physical_to_logical(p2l)
