"""float16 layers of weight-only formats (mxfp4, int4): the GEMM reads ``W = dequantise(codes, scales)`` rounded to
``params_dtype`` (SPEC §8), so a group whose dequantised values pass float16's range turns every token routed to the
expert non-finite. Round 67's audit: unquantised weights were refused at load (:func:`moekit.experts.params.
check_range`), 4-bit ones loaded and gave 192 of 192 outputs NaN. The check needs a shard's codes and scales together:
whole stacks (``load_expert_weights``, state dicts) are checked at once; one-shard loads (the checkpoint loader's) keep
the first of the pair given until the second comes (:class:`PendingPairs`), on float16 layers only. Round 68: one half
given alone (a partial state dict, ``load_expert_shard`` of a scale after the codes came by another path) is paired
with the other half the layer holds, for the slots and shards whose other half is recorded written
(:func:`check_halves`); and a cast that makes a loaded bfloat16 / float32 layer a float16 one (``.half()``,
``.to(torch.float16)``) checks the pairs the layer holds before anything moves (:func:`cast_dtype_checked`)."""
from __future__ import annotations

import weakref

import torch

from .._checks import values_checkable
from ..ops.formats import WeightFormat
from ..ops.quantize import dequantize_weight
from ..ops.w4_layout import unrelay_rega
from .layout import DOWN
from .packed import RELAID_WEIGHTS, cast_params_dtype
from .params import check_range, stored
from .placement_state import Transient

_OTHER = {"weight": "scale", "scale": "weight"}
_WORD = {"weight": "codes", "scale": "scale"}


def applies(dtype: torch.dtype, fmt: WeightFormat | None) -> bool:
    """Whether a layer of ``params_dtype`` ``dtype`` and weight format ``fmt`` needs the check."""
    return dtype == torch.float16 and fmt is not None and not fmt.quantizes_activations


def check_stacks(dtype: torch.dtype, fmt: WeightFormat | None, codes: torch.Tensor, scale: torch.Tensor, what: str,
                 shards: int | None = None, ids=None) -> None:
    """``ValueError`` (:func:`check_range`'s) naming ``what`` and the expert (``ids[e]``; default ``e``) where a
    dequantised weight of ``codes [E, N, K / pack]`` with ``scale`` would be a finite value beyond float16's range;
    one expert at a time (float32 of one expert, not of the stack)."""
    if not applies(dtype, fmt) or not (values_checkable(codes) and values_checkable(scale)):
        return
    for e in range(codes.shape[0]):
        check_range(dtype, dequantize_weight(codes[e], scale[e], fmt, shards=shards),
                    f"{what} of expert {e if ids is None else ids[e]}")


def check_named(experts, tensors: dict, prefix: str = "", what: str = "", ids=None) -> None:
    """:func:`check_stacks` over the ``{prefix}w13_weight`` / ``_scale`` and ``w2`` pairs of ``tensors`` (a state dict
    being loaded, ``load_expert_weights``' checked stacks, or the local ones ``adopt_weights`` is given, ``ids`` their
    slots' logical experts) for the layer ``experts``. A pair given whole replaces what :class:`PendingPairs` kept of
    its shards (round 68: a later one-shard half was paired with a stale one)."""
    c = experts.moe_config
    if not applies(c.params_dtype, experts.quant):
        return
    for side in ("w13", "w2"):
        codes, scale = tensors.get(f"{prefix}{side}_weight"), tensors.get(f"{prefix}{side}_scale")
        if isinstance(codes, torch.Tensor) and isinstance(scale, torch.Tensor):
            shards = 2 if side == "w13" and c.gated else None
            check_stacks(c.params_dtype, experts.quant, codes, scale, f"{what}{side}", shards, ids)
            pending_pairs(experts).forget(experts.specs[f"{side}_weight"].shards)


def check_state_dict(experts, state_dict: dict, prefix: str) -> None:
    """A state dict being loaded: its pairs (:func:`check_named`), and each side's codes or scales given without the
    other (``strict=False``) against the other half the layer holds (:func:`check_halves`), before anything is
    copied. A state dict's per-slot tensors are this rank's (SPEC §8's packing), slot by slot; a partial one keeps the
    layer's placement (:func:`~.placement_state.incoming_placement`), so slot ``s`` holds expert
    ``local_logical_ids()[s]`` after it as before."""
    check_named(experts, state_dict, prefix, f"state dict entries {prefix}")
    if not applies(experts.moe_config.params_dtype, experts.quant):
        return
    ids = experts.placement.local_logical_ids()
    for side in ("w13", "w2"):
        given = {k: state_dict.get(f"{prefix}{side}_{k}") for k in _OTHER}
        given = {k: t for k, t in given.items() if isinstance(t, torch.Tensor)}
        if len(given) != 1:
            continue
        (kind, t), = given.items()
        name, spec = f"{side}_{kind}", experts.specs[f"{side}_{kind}"]
        if tuple(t.shape) != tuple(getattr(experts, name).shape):
            continue  # (refused by incoming_placement, naming the shapes)
        t = stored(spec, _plain(t), f"state dict entry {prefix + name!r}")
        check_halves(experts, kind, [(slot, s, spec.shard_rows(t[slot], s)) for slot in range(t.shape[0])
                                     for s in spec.shards],
                     lambda slot, s: f"state dict entry {prefix}{name} of expert {ids[slot]} {s} (dequantised "
                                     f"with the layer's {_WORD[_OTHER[kind]]})")
        pending_pairs(experts).forget(spec.shards, kind)


def shard_given(experts, logical_id: int, shard_id: str, kind: str, part: torch.Tensor, slots, what: str) -> None:
    """``load_expert_shard``: ``part`` (one full shard's codes or scale, in storage form, SPEC §8's packing) is about
    to be written to ``slots``. Paired with the other half if a one-shard load gave it (:class:`PendingPairs`: the
    whole shard, on every rank), else with the other half those slots hold (this rank's TP slice of ``part``:
    :func:`check_halves`); ``ValueError`` before anything is written."""
    c = experts.moe_config
    if not applies(c.params_dtype, experts.quant) or kind not in _OTHER:
        return
    spec = experts.specs[f"{'w2' if shard_id == DOWN else 'w13'}_{kind}"]
    mine = spec.take(part, experts.tp_rows)
    pending_pairs(experts).given(c.params_dtype, experts.quant, logical_id, shard_id, kind, part, what, lambda: (
        check_halves(experts, kind, [(slot, shard_id, mine) for slot in slots],
                     lambda slot, s: f"{what} (dequantised with the layer's {_WORD[_OTHER[kind]]})")))


def check_halves(experts, kind: str, halves, what) -> None:
    """``halves``: ``(slot, shard, tensor)``, this rank's share of one shard's ``kind`` ("weight": the codes, or
    "scale") about to be written to ``slot``, in SPEC §8's packing. Each is dequantised with the other half the layer
    holds for that slot and shard where the loaded-record says it was written (unwritten: the unset values, the e8m0
    byte 255, NaN or 0, which mean nothing); ``ValueError`` (:func:`check_range`'s) naming ``what(slot, shard)``."""
    c, written, held = experts.moe_config, experts._record.written, {}
    if not applies(c.params_dtype, experts.quant) or kind not in _OTHER:
        return
    other = _OTHER[kind]
    for slot, shard, t in halves:
        if (slot, shard, other) not in written or not values_checkable(t):
            continue
        name = f"{'w2' if shard == DOWN else 'w13'}_{other}"
        if name not in held:
            held[name] = _plain(getattr(experts, name).detach())
        if not values_checkable(held[name]):
            continue
        theirs = _held(experts, name, held[name], slot, shard)
        codes, scale = (t, theirs) if kind == "weight" else (theirs, t)
        check_range(c.params_dtype, dequantize_weight(codes, scale, experts.quant), what(slot, shard))


def cast_dtype_checked(experts, fn) -> torch.dtype | None:
    """The ``params_dtype`` a quantised :class:`~moekit.RoutedExperts`' ``_apply(fn)`` gives it
    (:func:`~.packed.cast_params_dtype`; None: unquantised, or no such layer), checked before anything moves:
    ``ValueError`` where ``fn`` makes a bfloat16 / float32 layer a float16 one (``.half()``, ``.to(torch.float16)``)
    while a weight-only layer's dequantised weight of a slot and shard written (the loaded-record; the codes and
    scales are kept, :func:`~.packed.follow_params_dtype`) passes float16's range (round 68: every token of the expert
    came out NaN), or a bias does (any quantised format: the biases convert with ``params_dtype``; round 69: one
    became inf, unchecked). The layer stays as it was. The layer holding it checks first too (``FusedMoE._apply``); a
    module holding that one has moved its other children before it (torch's ``_apply`` goes depth first)."""
    if getattr(experts, "quant", None) is None or not hasattr(experts, "_record"):
        return None
    new = cast_params_dtype(experts, fn)
    if new == experts._params_dtype or new != torch.float16:
        return new
    mark = experts.__dict__.pop("_range16_cast", None)  # the layer holding it checked this very cast: not twice
    if mark is not None and mark.value is not None and mark.value() is fn:
        return new
    ids, written = experts.placement.local_logical_ids(), experts._record.written
    who = f"layer {experts.layer_name!r}" if experts.layer_name else "the layer"
    for side in ("w13", "w2") if applies(new, experts.quant) else ():
        names = (f"{side}_weight", f"{side}_scale")
        whole = [_plain(getattr(experts, n).detach()) for n in names]
        if not all(values_checkable(t) for t in whole):
            continue
        for slot in range(experts.placement.num_local):
            for s in experts.specs[names[0]].shards:
                if (slot, s, "weight") in written and (slot, s, "scale") in written:
                    codes, scale = (_held(experts, n, t, slot, s) for n, t in zip(names, whole))
                    check_range(new, dequantize_weight(codes, scale, experts.quant),
                                f"{side} of expert {ids[slot]} {s} (dequantised; a cast of {who} to float16)")
    for name in ("w13_bias", "w2_bias"):  # (an unset bias is 0: nothing to tell written from unwritten)
        bias = getattr(experts, name)
        if bias is not None and values_checkable(bias):
            bias = _plain(bias.detach())
            for slot in range(bias.shape[0]):
                check_range(new, bias[slot], f"{name} of expert {ids[slot]} (a cast of {who} to float16)")
    try:  # (a method descriptor or methodcaller cannot be weakly referenced: checked twice then, review of r68)
        experts.__dict__["_range16_cast"] = Transient(weakref.ref(fn))
    except TypeError:
        pass
    return new


def _held(experts, name: str, whole: torch.Tensor, slot: int, shard: str) -> torch.Tensor:
    """What the layer holds of ``name`` (``whole``, its tensor) for ``slot``'s ``shard``, in SPEC §8's packing (a
    re-laid layer's codes, ``packed_layout == "rega"``, laid back: :func:`~moekit.ops.w4_layout.unrelay_rega`)."""
    t = experts.specs[name].shard_rows(whole[slot], shard)
    return unrelay_rega(t) if experts.packed_layout == "rega" and name in RELAID_WEIGHTS else t


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) whole (every rank runs the load or cast that reads it: round 67's rule), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def pending_pairs(experts) -> "PendingPairs":
    """The layer's :class:`PendingPairs` (made on first use)."""
    if "_pending_pairs" not in experts.__dict__:
        experts.__dict__["_pending_pairs"] = PendingPairs()
    return experts.__dict__["_pending_pairs"]


class PendingPairs:
    """One-shard loads of a float16 weight-only layer: each shard's codes or scales, kept until the other comes."""

    def __init__(self):
        self.waiting: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.quantised: tuple | None = None  # (logical id, shard, codes) of the pair :meth:`keep` checked

    def given(self, dtype, fmt, logical_id: int, shard_id: str, kind: str, tensor: torch.Tensor, what: str,
              alone=None) -> None:
        """``tensor`` (``kind`` "weight" or "scale" of one full shard, in storage form): checked with the other half
        kept here, if any (``ValueError`` before the second is written; the pair is dropped either way), else
        ``alone()`` is called (the check against the layer's own, :func:`shard_given`) and, if it passes, ``tensor`` is
        kept until the other comes."""
        if not applies(dtype, fmt) or kind not in _OTHER:
            return
        key, done = (logical_id, shard_id), self.quantised
        if done is not None and done[:2] == key and (kind == "scale" or tensor is done[2]):
            if kind == "weight":
                self.quantised = None
            self.waiting.pop(key, None)
            return
        first = self.waiting.get(key, {}).get(_OTHER[kind])
        if first is not None:
            del self.waiting[key]
            codes, scale = (tensor, first) if kind == "weight" else (first, tensor)
            check_range(dtype, dequantize_weight(codes, scale, fmt), f"{what} (dequantised)")
            return
        if alone is not None:
            alone()
        self.waiting[key] = {kind: tensor}

    def keep(self, experts, logical_id: int, shard_id: str, codes: torch.Tensor, scale: torch.Tensor,
             what: str) -> None:
        """A float shard quantised on load: its pair checked here (``ValueError`` naming the weight given), and
        neither half again when loaded next (the scale, then these codes): not with what the layer held before
        either, which they replace."""
        c = experts.moe_config
        if applies(c.params_dtype, experts.quant):
            check_range(c.params_dtype, dequantize_weight(codes, scale, experts.quant), f"{what} (dequantised)")
            self.quantised = (logical_id, shard_id, codes)

    def forget(self, shard_ids, kind: str | None = None) -> None:
        """Drop what is kept of ``shard_ids`` (of every expert; ``kind`` only, or both): the layer was given them by
        another path, so what is kept is no longer what it holds."""
        for key in [k for k in self.waiting if k[1] in shard_ids]:
            parts = self.waiting[key]
            for k in ([kind] if kind else list(parts)):
                parts.pop(k, None)
            if not parts:
                del self.waiting[key]
