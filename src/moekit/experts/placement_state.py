"""Which expert each slot holds, in state dicts: once EPLB moved a slot, ``state_dict()`` carries the placement beside
the per-slot weights and ``load_state_dict`` restores it, so the loaded weights sit in the slots the placement says.

Round 46: without it, a state dict saved after a rebalance loaded silently into the initial placement (the routing
maps are not persistent buffers), each moved slot holding another expert's weights. A state dict without the key is
the initial placement (as every state dict saved before a rebalance, and before this round, is).

Round 56: a layer split over ranks (EP or TP size > 1) also saves which share it holds (:data:`SHARD_KEY`: the EP and
TP sizes and ranks and the physical ids of its slots); a state dict of another rank's share, or of another placement
strategy, has the same shapes and loaded silently (a user trial: relative RMS error 1.4 against the single-process
layer); it is refused now. A state dict without the key (a single-process layer's, one saved before round 56, a
checkpoint filled into a template) is taken as this rank's.
"""

from __future__ import annotations

import weakref

import torch

from .output_norm import norm_ids_map
from .packed import spec_packed_saved
from .placement import ExpertPlacement, initial_physical_to_logical

#: the key (under the experts' prefix) of ``physical_to_logical [P]`` int64, saved once EPLB moved a slot
PLACEMENT_KEY = "eplb_physical_to_logical"
#: the key of ``[ep_size, ep_rank, tp_size, tp_rank, *local physical ids]`` int64, saved by layers split over ranks
SHARD_KEY = "expert_shard"


def initial_p2l(p: ExpertPlacement) -> tuple[int, ...]:
    return initial_physical_to_logical(p.num_logical, p.num_physical, p.ep_size, p.strategy)


def shard_of(p: ExpertPlacement) -> tuple[int, ...]:
    """``(ep_size, ep_rank, tp_size, tp_rank, *local physical ids)``: the share of the experts a rank holds."""
    return (p.ep_size, p.ep_rank, p.tp_size, p.tp_rank, *p.local_ids)


class Transient:
    """A per-object cache holding weak references (``value``), which pickles cannot carry and copies should not:
    a pickled or copied object's starts empty (round 66's CI: a layer that ran a forward no longer pickled)."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def __reduce__(self):
        return (Transient, ())

    def __deepcopy__(self, memo):
        return Transient()


def state_buffers(experts, movable: bool) -> None:
    """Register the keys as persistent int64 buffers (on the weights' device) where they apply: :data:`SHARD_KEY` on a
    layer split over ranks, :data:`PLACEMENT_KEY` on an EPLB layer (``movable``; its placement, refreshed in place by
    :func:`placement_moved`). Round 67: written into state dicts only, they were no attribute of the module and
    ``torch.distributed.checkpoint``'s ``get_model_state_dict`` failed (``AttributeError``); a DCP load fills only the
    keys a fresh layer's state dict has, so a rebalanced placement saved by DCP loaded as the initial one (silently
    wrong); and ``set_model_state_dict(broadcast_from_rank0=True)`` sends only parameters and buffers (every rank took
    rank 0's share). A state dict without them (saved before) loads as before: the key is not reported missing."""
    p, device = experts.placement, experts.w13_weight.device  # (meta: filled by maps_rebuilt after to_empty)
    wanted = {SHARD_KEY: shard_of(p) if p.ep_size > 1 or p.tp_size > 1 else None,
              PLACEMENT_KEY: tuple(p.physical_to_logical) if movable else None}
    for key, values in wanted.items():
        if values is None:
            experts._buffers.pop(key, None)
        else:
            with torch.inference_mode(False):  # (a normal tensor in any mode: rebalances refresh it in place)
                experts.register_buffer(key, torch.tensor(values, dtype=torch.int64, device=device))


def buffers_refreshed(experts) -> None:
    """The buffers of :func:`state_buffers` hold the layer's share and placement (after a rebalance, ``to_empty``)."""
    p = experts.placement
    for key, values in ((SHARD_KEY, shard_of(p)), (PLACEMENT_KEY, tuple(p.physical_to_logical))):
        buf = experts._buffers.get(key)
        if buf is not None and not buf.is_meta:
            if buf.is_inference() and not torch.is_inference_mode_enabled():  # (moved under inference mode)
                experts._buffers[key] = buf = buf.clone()
            with torch.no_grad():
                buf.copy_(torch.tensor(values, dtype=torch.int64))


def buffer_keys_missing(experts, prefix: str, missing_keys: list) -> None:
    """A state dict without the buffers' keys (saved before round 67, or by a single-process layer) is not missing
    anything: the absent placement is the initial one, the absent share this rank's (module docstring)."""
    for key in (SHARD_KEY, PLACEMENT_KEY):
        if key in experts._buffers and prefix + key in missing_keys:
            missing_keys.remove(prefix + key)


def placement_saved(experts, destination: dict, prefix: str) -> None:
    """Add the placement to a state dict being saved, when it is not the initial one, and the rank's share
    (:data:`SHARD_KEY`) when the layer is split over ranks.

    A state dict holds the live weight tensors, which a rebalance moves in place: the dicts an EPLB layer
    (``experts.placement_movable``) saved into are remembered (weakly) and :func:`placement_moved` gives those whose
    weights still are the layer's the new placement (round 66: a state dict held across a rebalance paired the moved
    weights with the placement of its save, or with none, and loaded silently wrong). A dict whose weights were copied
    keeps the placement of its save, as its weights do."""
    placement, own = experts.placement, experts._buffers  # (the buffers of :func:`state_buffers` are saved already)
    p2l = tuple(placement.physical_to_logical)
    if p2l != initial_p2l(placement) and PLACEMENT_KEY not in own:
        destination[prefix + PLACEMENT_KEY] = torch.tensor(p2l, dtype=torch.int64)
    if PLACEMENT_KEY in own and prefix + PLACEMENT_KEY in destination:  # a copy, not the buffer a rebalance rewrites
        destination[prefix + PLACEMENT_KEY] = destination[prefix + PLACEMENT_KEY].clone()  # (review: a dict whose
        # weights were copied took a later placement; the dicts sharing the live weights follow by placement_moved)
    if (placement.ep_size > 1 or placement.tp_size > 1) and SHARD_KEY not in own:
        destination[prefix + SHARD_KEY] = torch.tensor(shard_of(placement), dtype=torch.int64)
    if getattr(experts, "placement_movable", False):
        try:
            ref = weakref.ref(destination)
        except TypeError:  # (a plain dict passed as ``destination``: not followed)
            return
        held = [(r, pre) for r, pre in _saved_dicts(experts) if r() is not None]
        experts.__dict__["_saved_dicts"] = Transient(held + [(ref, prefix)])


def placement_moved(experts) -> None:
    """The state dicts :func:`placement_saved` remembered that still hold the layer's live per-slot tensors (one not
    re-laid shares the layer's memory) get the new placement (a fresh tensor: another dict's is not changed), and
    fresh copies of the weights a 4-bit layer saves re-laid (SPEC §8's packing, copied at the save: round 66's review,
    their codes stayed in the old slots while the scales moved)."""
    buffers_refreshed(experts)  # (a dict holding the placement buffer follows with it)
    relaid = experts._relaid_weights()
    names = [n for n in experts.specs if n not in relaid]
    held = []
    for ref, prefix in _saved_dicts(experts):
        d = ref()
        if d is None:
            continue
        held.append((ref, prefix))
        if any(_shares(d.get(prefix + n), getattr(experts, n)) for n in names):
            d[prefix + PLACEMENT_KEY] = torch.tensor(tuple(experts.placement.physical_to_logical), dtype=torch.int64)
            for n in relaid:
                if prefix + n in d:
                    d[prefix + n] = getattr(experts, n).detach()
            spec_packed_saved(relaid, d, prefix)
    experts.__dict__["_saved_dicts"] = Transient(held)


def _saved_dicts(experts) -> list:
    cache = experts.__dict__.get("_saved_dicts")
    return cache.value or [] if cache is not None else []


def _shares(saved, live) -> bool:
    return isinstance(saved, torch.Tensor) and not saved.is_meta and saved.numel() > 0 and \
        saved.untyped_storage().data_ptr() == live.untyped_storage().data_ptr()


def slots_of(experts, logical_id: int) -> list[int]:
    """The local slots of ``experts`` holding logical expert ``logical_id`` now (made once per placement: a load
    writes each expert's shards one call at a time; round 66: a scan of the slots per call was O(E²) a layer)."""
    cached = experts.__dict__.get("_slots_by_logical")
    if cached is None or cached[0] is not experts.placement:
        by: dict[int, list[int]] = {}
        for slot, logical in enumerate(experts.placement.local_logical_ids()):
            by.setdefault(logical, []).append(slot)
        cached = experts.__dict__["_slots_by_logical"] = (experts.placement, by)
    return list(cached[1].get(logical_id, ()))


def check_shard(experts, state_dict: dict, prefix: str) -> None:
    """``ValueError`` when a state dict carries another rank's share of the experts than ``experts`` holds (its
    :data:`SHARD_KEY`: other EP / TP sizes or ranks, another placement strategy); nothing when it carries none."""
    saved = state_dict.get(prefix + SHARD_KEY)
    if saved is None or (isinstance(saved, torch.Tensor) and saved.is_meta):  # (meta: no values to compare)
        return
    got, mine = tuple(int(v) for v in torch.as_tensor(saved).flatten().tolist()), shard_of(experts.placement)
    if got == mine:
        return

    def said(s):
        if len(s) < 4:
            return f"a malformed share {list(s)}"
        return f"EP rank {s[1]} of {s[0]}, TP rank {s[3]} of {s[2]}, physical experts {list(s[4:])}"

    raise ValueError(f"layer {experts.layer_name!r}, state dict {prefix}{SHARD_KEY}: it holds the experts of "
                     f"{said(got)}; this layer is {said(mine)} (placement {experts.placement.strategy!r}): load each "
                     "rank's own state dict (saved by the rank of the same EP / TP rank and placement strategy)")


def incoming_placement(experts, state_dict: dict, prefix: str) -> tuple[int, ...] | None:
    """The placement a state dict being loaded gives ``experts`` (physical -> logical), checked (with the shapes of its
    per-slot tensors) before anything is copied (round 53's review: a refusal after the copy left a changed layer):
    the one it carries, else the initial one when it holds every per-slot tensor; None (keep) when it holds none of
    them (a partial one, the gate's alone).
    One that holds some of them and no placement, into a layer an EPLB rebalance moved, is refused (``ValueError``:
    its slots would mix two placements). Input scales are the same in every slot: they do not count. Another rank's
    share is refused (:func:`check_shard`)."""
    check_shard(experts, state_dict, prefix)
    for name in experts.specs:  # torch copies the other keys and raises at the end: a half-loaded layer (review)
        t, mine = state_dict.get(prefix + name), getattr(experts, name)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(mine.shape):
            pl = experts.placement  # (round 64: a single-process layer's wrong I blamed EP / TP)
            parallel = pl.ep_size > 1 or pl.num_physical > pl.num_logical or pl.tp_size > 1
            why = ("saved with another EP / TP size or num_redundant_experts?" if parallel else
                   f"saved by a layer of other sizes? this one has H = {experts.moe_config.hidden_size}, "
                   f"I = {experts.moe_config.intermediate_size}")
            who = experts.layer_name or type(experts).__name__
            raise ValueError(f"layer {who!r}, state dict {prefix}{name}: shape {list(t.shape)}, this rank holds "
                             f"{list(mine.shape)} ({why})")
    saved = saved_p2l(state_dict, prefix)
    slotted = [n for n, spec in experts.specs.items() if spec.kind != "input_scale"]
    held = [n for n in slotted if prefix + n in state_dict]
    current = tuple(experts.placement.physical_to_logical)
    p2l = initial_p2l(experts.placement) if saved is None else saved
    if saved is not None:
        try:
            experts.placement.with_physical_to_logical(p2l)  # (its checks)
        except ValueError as err:
            raise placement_error(experts, prefix, err) from None
    if p2l != current and (saved is not None or held) and len(held) < len(slotted):
        raise ValueError(f"layer {experts.layer_name!r}, state dict at {prefix!r}: it holds "
                         f"{', '.join(held) or 'no weights'} but not {', '.join(n for n in slotted if n not in held)}, "
                         f"and its placement{'' if saved is not None else ' (none: the initial one)'} differs from "
                         "the layer's (an EPLB rebalance moved one of them): the slots would mix two placements; load "
                         "a whole state dict")
    return p2l if saved is not None or held else None


def saved_p2l(state_dict: dict, prefix: str) -> tuple[int, ...] | None:
    """The placement a state dict carries (``prefix + PLACEMENT_KEY``), None when it carries none."""
    saved = state_dict.get(prefix + PLACEMENT_KEY)
    return None if saved is None else tuple(int(e) for e in saved.tolist())


def placement_error(experts, prefix: str, err: Exception) -> ValueError:
    """A saved placement this layer cannot take, naming the layer, the key and the likely cause."""
    return ValueError(f"layer {experts.layer_name!r}, state dict {prefix}{PLACEMENT_KEY}: {err} (saved with another "
                      "EP size or num_redundant_experts?)")


def placement_loaded(experts, p2l: tuple[int, ...] | None, prefix: str, unexpected_keys: list) -> None:
    """Take ``p2l`` (:func:`incoming_placement`) into ``experts``
    (:meth:`~moekit.RoutedExperts.set_physical_to_logical`) after the copy (its key is no unexpected one); the
    executor's EPLB maps follow in its load hook (:func:`moekit.parallel.eplb_state.watch_placement`)."""
    for key in (PLACEMENT_KEY, SHARD_KEY):
        if prefix + key in unexpected_keys:
            unexpected_keys.remove(prefix + key)
    if p2l is not None and p2l != tuple(experts.placement.physical_to_logical):
        experts.set_physical_to_logical(p2l)


def maps_rebuilt(experts) -> None:
    """After ``to_empty`` from the meta device, or weights assigned to a layer built there (round 53): the
    non-persistent maps (``expert_map``, the per-expert norm's ids) hold uninitialised memory or stay on meta; they are
    derived from the placement again (allocated where they were on meta)."""
    device = experts.w13_weight.device
    if experts.expert_map is not None:
        fresh = experts.placement.expert_map(device)
        experts.expert_map = fresh if experts.expert_map.is_meta else experts.expert_map.copy_(fresh)
    norm_ids = experts._norm_p2l
    experts._norm_p2l = norm_ids_map(experts.placement, experts.expert_output_norm, device,
                                     None if norm_ids is None or norm_ids.is_meta else norm_ids)
    for key in (SHARD_KEY, PLACEMENT_KEY):
        buf = experts._buffers.get(key)
        if buf is not None and buf.device != device:  # (on meta until here: no values to move; review of round 67)
            experts._buffers[key] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
    buffers_refreshed(experts)
