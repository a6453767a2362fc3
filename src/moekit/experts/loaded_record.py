"""What of a :class:`~moekit.experts.routed.RoutedExperts`' tensors has been written: the loaded-record, by
``(local slot, shard, kind)`` (kind: weight / bias / scale / input_scale). A forward before every one was written
raises (SPEC §1: never compute with an initialiser's values)."""

from __future__ import annotations

import torch

from .._checks import values_checkable
from .layout import shards
from .packed import follow_weight_dtype
from .params import unset_input_scale
from .placement_state import maps_rebuilt, placement_loaded

_MISSING_KIND = {"weight": "", "bias": " bias", "scale": " scale", "input_scale": " input_scale"}
_SHARD_CODES, _KIND_CODES = ("w1", "w3", "w2"), tuple(_MISSING_KIND)
#: the state-dict key of what a layer saved unwritten (only in the state dict of a layer not fully loaded)
UNWRITTEN_KEY = "unwritten_slots"


class LoadedRecord:
    """needed: every ``(slot, shard, kind)`` the layer holds; :meth:`mark` records writes, :meth:`clear` forgets
    them (the values are gone: ``.to("meta")``)."""

    def __init__(self, needed):
        self.needed = frozenset(needed)
        self.written: set[tuple[int, str, str]] = set()
        self.complete = False
        self.saved_unwritten = False  # a state dict loaded here said its layer had not written some of them

    def mark(self, slots, shard_ids, kind: str) -> None:
        self.written.update((slot, s, kind) for slot in slots for s in shard_ids)
        self.complete = self.needed <= self.written

    def clear(self) -> None:
        self.written = set()
        self.complete = False
        self.saved_unwritten = False

    def unmark(self, slots, shard_ids, kind: str) -> None:
        self.written.difference_update((slot, s, kind) for slot in slots for s in shard_ids)
        self.complete = self.needed <= self.written

    def missing(self, logical_ids, gated: bool) -> list[str]:
        """What is still unwritten, by logical expert (``logical_ids[slot]``), ordered: ``["expert 3 w2", "expert 0
        w1 bias", "expert 1 w3 scale", ...]``."""
        by_order, by_kind = shards(gated), list(_MISSING_KIND)
        order = {s: i for i, s in enumerate(by_order)}
        kinds = {k: i for i, k in enumerate(by_kind)}
        names = {(logical_ids[slot], order[s], kinds[k]) for slot, s, k in self.needed - self.written}
        return [f"expert {e} {by_order[i]}{_MISSING_KIND[by_kind[k]]}" for e, i, k in sorted(names)]

    def saved(self, destination: dict, prefix: str) -> None:
        """After ``_save_to_state_dict``: a layer not fully loaded saves what it never wrote (``[n, 3]`` int64 rows
        ``(local slot, shard code, kind code)``), so that loading its state dict leaves those unwritten (round 54's
        leftover: a never-loaded layer's initialiser values loaded as written, the forward computed with them)."""
        if self.complete:
            return
        unwritten = sorted(self.needed - self.written)
        rows = [(slot, _SHARD_CODES.index(s), _KIND_CODES.index(k)) for slot, s, k in unwritten]
        destination[prefix + UNWRITTEN_KEY] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    def check(self, layer_name: str, logical_ids, gated: bool) -> None:
        """Raise ``RuntimeError`` naming what is missing unless every tensor was written."""
        if self.complete:
            return
        missing = self.missing(logical_ids, gated)
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        why = ("; a state dict loaded into it came from a layer that had not loaded them (values written into the "
               "parameters in place do not count)") if self.saved_unwritten else ""
        raise RuntimeError(
            f"layer {layer_name!r}: forward before the expert weights were loaded (missing "
            f"{', '.join(missing[:6])}{more}{why}); load them with load_expert_weights(), load_weights() "
            "or moekit.load_moe_layers()"
        )


class InputScales:
    """The static input scales (kind ``input_scale``) a layer was given, by parameter name and ``(logical expert,
    shard)``. Every slot holds the largest of each expert's latest one (SPEC §8), so giving an expert's scale again
    replaces it instead of only raising the maximum (round 53: reloading a checkpoint with smaller input scales kept
    the first one's, and the layer differed from one loaded with the second alone)."""

    def __init__(self):
        self.values: dict[str, dict[tuple[int, str], float]] = {}

    def given(self, name: str, entries: dict) -> float:
        """Record ``{(logical, shard): value}`` for ``name``; the largest recorded value."""
        mine = self.values.setdefault(name, {})
        mine.update(entries)
        return max(mine.values())

    def stack(self, name: str, full: torch.Tensor, shards) -> torch.Tensor:
        """A global ``[E]`` stack replaces every expert's value; its largest (a tensor: no host read to fill with)."""
        self.values[name] = ({(e, s): v for e, v in enumerate(full.tolist()) for s in shards}
                             if values_checkable(full) else {})
        return full.max()

    def forget(self, name: str) -> None:
        """``name`` is unset again (a state dict gave it all zero)."""
        self.values.pop(name, None)

    def seed(self, experts, names) -> None:
        """After a state-dict load or an adoption: each input scale of ``names`` holds the largest of experts whose own
        ones are unknown, so that value stands for every expert until it is given again."""
        for name in names:
            spec, t = experts.specs[name], getattr(experts, name)
            if spec.kind != "input_scale":
                continue
            top = float(t.max()) if values_checkable(t) and t.numel() else None
            every = range(experts.moe_config.num_experts)
            self.values[name] = {} if top is None else {(e, s): top for e in every for s in spec.shards}


def state_loaded(experts, state_dict: dict, prefix: str, placement, unwritten, unexpected_keys: list) -> None:
    """After :class:`~moekit.RoutedExperts` copied a state dict: the placement it gives (``placement``, from
    :func:`~moekit.experts.placement_state.incoming_placement`), what it wrote marked loaded (an all-zero input scale
    is "not given", and so is what the saved layer never wrote: ``unwritten``, from :func:`unwritten_rows`), the input
    scales' record seeded, what loads convert to following an assigned dtype, and the maps
    derived from the placement where they were on meta (weights assigned to a layer built there)."""
    placement_loaded(experts, placement, prefix, unexpected_keys)
    given, every = [], range(experts.placement.num_local)
    for name, spec in experts.specs.items():
        if prefix + name not in state_dict:
            continue
        if unset_input_scale(spec, state_dict[prefix + name]):  # "not given": the forward says it is missing
            experts._record.unmark(every, spec.shards, spec.kind)
            experts._input_scales.forget(name)
        else:
            given.append(name)
            experts._mark(every, spec.shards, spec.kind)
    unwritten_loaded(experts, unwritten, prefix, given, unexpected_keys)
    experts._input_scales.seed(experts, given)
    follow_weight_dtype(experts)
    if not experts.w13_weight.is_meta and any(t is not None and t.is_meta for t in (experts.expert_map,
                                                                                     experts._norm_p2l)):
        maps_rebuilt(experts)


def unwritten_rows(experts, state_dict: dict, prefix: str) -> list | None:
    """What the state dict's layer never wrote (:meth:`LoadedRecord.saved`), checked before anything is copied:
    ``[(slot, shard id, kind)]``, or None when it records nothing (a layer fully loaded saves no record)."""
    key, rows = prefix + UNWRITTEN_KEY, state_dict.get(prefix + UNWRITTEN_KEY)
    if rows is None:
        return None
    n = experts.placement.num_local
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[-1] != 3 or rows.dtype != torch.int64 or \
            rows.is_meta or (rows.numel() and (rows.min() < 0 or rows[:, 0].max() >= n or
                                               rows[:, 1].max() >= len(_SHARD_CODES) or
                                               rows[:, 2].max() >= len(_KIND_CODES))):
        what = f"{rows.dtype} {list(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"layer {experts.layer_name!r}, state dict {key}: {what}; expected int64 [n, 3] rows (local "
                         f"slot < {n}, shard code < {len(_SHARD_CODES)}, kind code < {len(_KIND_CODES)}) as a moekit "
                         "layer not fully loaded saves them")
    return [(slot, _SHARD_CODES[s], _KIND_CODES[k]) for slot, s, k in rows.tolist()]


def unwritten_loaded(experts, rows: list | None, prefix: str, given: list[str], unexpected_keys: list) -> None:
    """``rows`` (:func:`unwritten_rows`) stay unwritten here too, for the tensors the state dict carried (``given``);
    the others keep what this layer had."""
    if prefix + UNWRITTEN_KEY in unexpected_keys:
        unexpected_keys.remove(prefix + UNWRITTEN_KEY)
    carried = {(s, experts.specs[name].kind) for name in given for s in experts.specs[name].shards}
    for slot, s, k in rows or ():
        if (s, k) in carried:
            experts._record.unmark((slot,), (s,), k)
            experts._record.saved_unwritten = True
