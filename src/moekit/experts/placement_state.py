"""Which expert each slot holds, in state dicts: once EPLB moved a slot, ``state_dict()`` carries the placement beside
the per-slot weights and ``load_state_dict`` restores it, so the loaded weights sit in the slots the placement says.

Round 46: without it, a state dict saved after a rebalance loaded silently into the initial placement (the routing
maps are not persistent buffers), each moved slot holding another expert's weights. A state dict without the key is
the initial placement (as every state dict saved before a rebalance, and before this round, is).
"""

from __future__ import annotations

import torch

from .output_norm import norm_ids_map
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
    (:meth:`~moekit.RoutedExperts.set_physical_to_logical`); the executor's EPLB maps follow in its load hook on
    the experts (:func:`moekit.parallel.eplb_state.follow_placement`)."""
    key = prefix + PLACEMENT_KEY
    if key in unexpected_keys:
        unexpected_keys.remove(key)
    saved = state_dict.get(key)
    if saved is None and not any(prefix + name in state_dict for name in experts.specs):
        return  # (round 53) a partial state dict (the gate's alone) keeps the slots' placement: they keep their weights
    p2l = tuple(int(e) for e in saved.tolist()) if saved is not None else initial_p2l(experts.placement)
    if p2l != tuple(experts.placement.physical_to_logical):
        experts.set_physical_to_logical(p2l)


def maps_rebuilt(experts) -> None:
    """After ``to_empty`` from the meta device (round 53): the non-persistent maps (``expert_map``, the per-expert
    norm's ids) hold uninitialised memory; they are rebuilt from the placement."""
    if experts.expert_map is not None:
        experts.expert_map.copy_(experts.placement.expert_map(experts.expert_map.device))
    experts._norm_p2l = norm_ids_map(experts.placement, experts.expert_output_norm, experts.w13_weight.device,
                                     experts._norm_p2l)
