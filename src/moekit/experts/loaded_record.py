"""What of a :class:`~moekit.experts.routed.RoutedExperts`' tensors has been written: the loaded-record, by
``(local slot, shard, kind)`` (kind: weight / bias / scale / input_scale). A forward before every one was written
raises (SPEC §1: never compute with an initialiser's values)."""

from __future__ import annotations

import weakref

import torch
from torch.nn.utils import parametrize

from .._checks import values_checkable
from .layout import shards
from .legacy_state import warn_zero_scales
from .packed import follow_weight_dtype
from .params import unset_input_scale, unset_mask, unset_value
from .placement_state import Transient, buffer_keys_missing, maps_rebuilt, placement_loaded

_ORDER = shards(True)  # gate, up, down: the order of messages
_MISSING_KIND = {"weight": "", "bias": " bias", "scale": " scale", "input_scale": " input_scale"}


def fill_unset(experts) -> None:
    """Every expert tensor of ``experts`` set to :func:`unset_value` (``to_empty``'s uninitialised memory)."""
    quantised = experts.quant is not None
    with torch.no_grad():
        for name, t in experts.expert_tensors().items():
            t.fill_(unset_value(experts.specs[name], quantised))


def writable(experts, name: str) -> torch.Tensor:
    """``experts.<name>`` for a load to write into; ``TypeError`` where a parametrization
    (``torch.nn.utils.parametrize``) computes it: the write would land in a computed tensor and be lost (round 63:
    the layer then counted it loaded and ran on the never-written values)."""
    if parametrize.is_parametrized(experts, name):
        raise TypeError(f"{name} of {type(experts).__name__} is parametrized (torch.nn.utils.parametrize), so a load "
                        f"cannot write it; load the weights before registering the parametrization, or load a state "
                        f"dict holding its 'parametrizations.{name}.original' entry")
    return getattr(experts, name)


#: what :func:`values_sample` takes of each tensor (its first elements)
_SAMPLE = 64


def values_sample(experts) -> list | None:
    """The first values of ``w13_weight`` (and of ``w13_scale``, quantised: codes can be all zero) before an
    ``_apply``, None on meta: what :func:`values_kept` compares after it."""
    if experts.w13_weight.is_meta:
        return None
    names = [n for n in ("w13_weight", "w13_scale") if n in experts.specs]
    return [(n, getattr(experts, n).detach().reshape(-1)[:_SAMPLE].clone()) for n in names]


def values_kept(sample, experts) -> bool:
    """Whether an ``_apply`` kept the values (a device move or a cast; not ``to_empty``, whose memory is uninitialised:
    round 63, a layer with values stayed "loaded" on it): each sampled tensor's first elements, bit for bit, equal the
    sample cast as the tensor now is (a cast rounds the same way). A heuristic, but never wrong where values were kept;
    on meta, or from it (``sample`` None): not kept."""
    if sample is None or experts.w13_weight.is_meta:
        return False
    for name, old in sample:
        t = getattr(experts, name).detach().reshape(-1)[:old.numel()]
        if not torch.equal(old.to(device=t.device, dtype=t.dtype).view(torch.uint8), t.view(torch.uint8)):
            return False
    return True


class LoadedRecord:
    """needed: every ``(slot, shard, kind)`` the layer holds; :meth:`mark` records writes, :meth:`clear` forgets
    them (the values are gone: ``.to("meta")``)."""

    def __init__(self, needed):
        self.needed = frozenset(needed)
        self.written: set[tuple[int, str, str]] = set()
        self.complete = False
        self.unset_loaded = False  # a state dict loaded here held a never-loaded layer's values for some: "unset"
        # (NaN / e8m0 255), or "legacy" (all-zero scales of a dict saved before round 62, version 1)

    def mark(self, slots, shard_ids, kind: str) -> None:
        self.written.update((slot, s, kind) for slot in slots for s in shard_ids)
        self.complete = self.needed <= self.written

    def clear(self) -> None:
        self.written = set()
        self.complete = False
        self.unset_loaded = False

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

    def check(self, layer_name: str, logical_ids, gated: bool) -> None:
        """Raise ``RuntimeError`` naming what is missing unless every tensor was written."""
        if self.complete:
            return
        missing = self.missing(logical_ids, gated)
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        why = {"unset": "; a state dict loaded into it held the values of a layer never loaded for them (NaN weights "
               "or NaN scales)", "legacy": _LEGACY}.get("unset" if self.unset_loaded is True else self.unset_loaded, "")
        raise RuntimeError(
            f"layer {layer_name!r}: forward before the expert weights were loaded (missing "
            f"{', '.join(missing[:6])}{more}{why}); load them with load_expert_weights(), load_weights() "
            "or moekit.load_moe_layers()" + (_LEGACY_WAY if self.unset_loaded == "legacy" else "")
        )


#: why (and what to do) where a state dict saved before round 62 (version 1) marked experts never loaded (round 69)
_LEGACY = ("; a state dict loaded into it held, for them, all-zero scales, the unset mark of state dicts saved "
           "before round 62 (version 1): read as never loaded")
_LEGACY_WAY = ("; if those zeros are real values (an all-zero padding expert), load the state dict without its "
               "metadata instead (layer.load_state_dict(dict(sd)): all-zero scales are values since round 62)")


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


def state_loaded(experts, state_dict: dict, prefix: str, placement, incompatible: tuple[list, list],
                 legacy: bool | None = False) -> None:
    """After :class:`~moekit.RoutedExperts` copied a state dict: the placement it gives (``placement``, from
    :func:`~moekit.experts.placement_state.incoming_placement`), what it wrote marked loaded (an all-zero input scale
    is "not given", and so is a slot's shard still holding a never-loaded layer's values: :func:`unset_slices`; a
    quantised shard's codes with its scales), the input scales' record
    seeded, what loads convert to following an assigned dtype, and the maps derived from the placement where they
    were on meta (weights assigned to a layer built there). ``legacy``: the state dict's version (its torch
    ``_metadata``) was 1 (saved before round 62: all-zero scale shards read as never written); False: 2; None: it had
    no version, all-zero scale shards read as values with a ``UserWarning`` (:mod:`.legacy_state`; round 69)."""
    unexpected_keys, missing_keys = incompatible
    placement_loaded(experts, placement, prefix, unexpected_keys)
    buffer_keys_missing(experts, prefix, missing_keys)
    given, every, quantised, zeros = [], range(experts.placement.num_local), experts.quant is not None, []
    for name, spec in experts.specs.items():
        key = prefix + name  # (a parametrized tensor's values are its 'original': round 63)
        key = f"{prefix}parametrizations.{name}.original" if parametrize.is_parametrized(experts, name) else key
        if key not in state_dict:
            continue
        t = state_dict[key]
        if unset_input_scale(spec, t):  # "not given": the forward says it is missing
            experts._record.unmark(every, spec.shards, spec.kind)
            experts._input_scales.forget(name)
            continue
        given.append(name)
        experts._record.mark(every, spec.shards, spec.kind)
        for slot, s in unset_slices(spec, t, quantised, bool(legacy)):
            experts._record.unmark((slot,), (s,), spec.kind)
            if spec.kind == "scale":  # its codes mean nothing without it (and are not checked: any value is one)
                experts._record.unmark((slot,), (s,), "weight")
            record = experts._record
            record.unset_loaded = "legacy" if legacy and spec.kind == "scale" else record.unset_loaded or "unset"
        if legacy is None and spec.kind == "scale":  # no version metadata: all-zero scales are values (round 69)
            ids = experts.placement.local_logical_ids()
            zeros += [(ids[slot], _ORDER.index(s)) for slot, s in unset_slices(spec, t, quantised, True)]
    if zeros:
        warn_zero_scales(experts.layer_name, [f"expert {e} {_ORDER[i]} scale" for e, i in sorted(set(zeros))])
    experts._input_scales.seed(experts, given)
    follow_weight_dtype(experts)
    if not experts.w13_weight.is_meta and any(t is not None and t.is_meta for t in (
            experts.expert_map, experts._norm_p2l, *experts._buffers.values())):  # (the placement buffers too)
        maps_rebuilt(experts)


def unset_slices(spec, t, quantised: bool, legacy: bool = False) -> list[tuple[int, str]]:
    """The ``(slot, shard)`` slices of a state dict's per-slot weight or scale ``t`` ([slots, rows, ...], the shards
    splitting the rows in equal parts: gate rows, then up rows) that hold what a never-loaded layer holds
    (:func:`unset_value`): an unquantised layer's all-NaN weight shard, a quantised layer's all-NaN (e8m0: all-255)
    scale shard (no real checkpoint has either; round 62: all-zero scales were the mark, and are valid). Read as
    "never written" (round 55: a never-loaded layer's state dict loaded as loaded and the copy computed with
    ``torch.empty``'s memory). Round 56: zeros were the mark of weights too, and a layer holding an all-zero expert
    (padding experts added so that E divides the EP size) could not be restored from its own state dict. Quantised codes
    are not checked (every value is a code), biases neither (zeros are a value). One host read per tensor; nothing under
    compile or capture. ``legacy``: the state dict was saved before round 62 (:func:`~.params.unset_mask`)."""
    if (spec.kind == "scale" or spec.kind == "weight" and not quantised) and hasattr(t, "full_tensor"):
        t = t.full_tensor()  # a DTensor (FSDP2; round 67: .tolist() refused it): every rank loads, every rank gathers
    unset = unset_mask(spec, t, quantised, legacy)
    return [] if unset is None else \
        [(slot, spec.shards[i]) for slot, row in enumerate(unset.tolist()) for i, v in enumerate(row) if v]


_FLOAT_TENSORS = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def check_swapped_in(experts) -> None:
    """Unquantised expert tensors swapped in since the last check (``torch.func.functional_call``, an assignment,
    ``p.data = ...``) must have the layer's shapes and its one float dtype: ``ValueError`` / ``TypeError`` naming them
    (round 66: torch's matmul errors, or an ``IndexError``; quantised layers' kernels checked theirs already). Tensors
    are compared by identity, shape and dtype against the last ones checked, held weakly (one check per swap)."""
    names = _FLOAT_TENSORS if "w13_bias" in experts.specs else _FLOAT_TENSORS[:2]
    own = experts._parameters  # (a plain dict read: Module.__getattr__ costs ~0.7 µs a name; eager forward path)
    now = [own.get(n) for n in names]
    if any(t is None for t in now):  # parametrized: computed from the layer's own (checked when loaded) on every
        names = [n for n, t in zip(names, now) if t is not None]  # read (round 67: computed twice a forward)
        now = [own[n] for n in names]
    seen = experts.__dict__.get("_checked_swaps")
    seen = seen.value if seen is not None else None
    if seen is not None and len(seen) == len(now) and \
            all(r() is t and t.shape == s and t.dtype == d for (r, s, d), t in zip(seen, now)):
        return
    want = {n: tuple(experts.specs[n].local_shape(experts.placement.num_local, experts.tp_rows)) for n in names}
    for name, t in zip(names, now):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)} (a tensor "
                            "swapped in: functional_call or an assignment)")
    if len({t.dtype for t in now}) > 1:  # (round 67: the first tensor's dtype was "the experts'", blaming the others)
        raise TypeError("the expert tensors must share one float dtype, got " + ", ".join(
            f"{n} {t.dtype}" for n, t in zip(names, now)) + " (a tensor swapped in: functional_call or an assignment)")
    for name, t in zip(names, now):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {list(want[name])} (E_local, rows, H / I of this layer), got "
                             f"{list(t.shape)} (a tensor swapped in: functional_call or an assignment)")
    experts.__dict__["_checked_swaps"] = Transient([(weakref.ref(t), t.shape, t.dtype) for t in now])


def swapped_in_whole(experts) -> bool:
    """Every expert tensor is a plain tensor swapped in (``torch.func.functional_call`` of ``.detach()``-ed tensors):
    none of the layer's own, loaded or not, is read (round 66: a template layer was refused). A parameter (the layer's
    own, or another model's passed as is) or a parametrized tensor (computed from the layer's own) is not, nor is a
    swapped-in weight (quantised: scale) holding a never-loaded shard's unset values (round 67: the layer's own
    ``.detach()``-ed tensors ran on its NaN memory). That probe reads values once per set of tensors (held weakly),
    and not where values cannot be read (compile, capture, torch.func transforms)."""
    tensors = experts.expert_tensors()
    if any(isinstance(t, torch.nn.Parameter) or parametrize.is_parametrized(experts, n) for n, t in tensors.items()):
        return False
    ok = experts.__dict__.get("_whole_swaps")
    if ok is not None and ok.value is not None and all(r() is t for r, t in zip(ok.value, tensors.values())):
        return True
    quantised = experts.quant is not None
    for name, spec in experts.specs.items():
        t = tensors[name]
        if _wrapped(t):
            return True
        unset = unset_mask(spec, t, quantised)
        if unset is not None and bool(unset.any()):
            return False
    experts.__dict__["_whole_swaps"] = Transient([weakref.ref(t) for t in tensors.values()])
    return True


def _wrapped(t: torch.Tensor) -> bool:
    """A torch.func transform's tensor (vmap, grad): its values cannot be read on the host."""
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.is_functorch_wrapped_tensor(t)
