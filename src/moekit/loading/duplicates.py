"""Checkpoint keys of one MoE block that hold the same routed-expert tensor (round 68's audit: per-expert
``experts.5.gate_proj.weight`` beside ``experts.5.w1.weight``, or per-expert keys beside fused ``experts.gate_up_proj``
stacks, loaded whichever was read last, silently; transformers loads one form or raises), or the same tensor of the
layer's own (round 69: ``gate.weight`` beside ``router.gate.weight``, both read as the router's weight, the last one
read kept: :func:`check_duplicate_own`).

:func:`expert_targets` maps a block-relative moekit name to the ``(expert, shard, kind)`` tensors it writes, from the
name alone, as :func:`~moekit.loading.keys.expand_key` and :func:`~moekit.experts.mapping.load_layer_weights` read it;
:func:`check_duplicate_experts` refuses two keys of a block writing one, before any tensor is read. Keys writing
disjoint parts still load: a gated stack's gate and up halves stored apart, another shard, a scale beside its weight.
"""

from __future__ import annotations

import torch

from ..experts.layout import DOWN, GATE, PROJ_NAMES, SHARD_OF_PROJ, UP
from ..experts.mapping import EXPERT_KEY_RE, FUSED_KEY_RE, KIND_OF_SUFFIX, is_slot_tensor
from ..experts.own_names import HALVES, own_target
from ..ops.activation import is_gated
from .archs.common import ArchSpec
from .keys import expand_key
from .plan import LayerPlan

#: stacks of one projection of a gated layer's routed experts (:func:`~moekit.loading.keys.expand_key`)
_PROJ_STACKS = ("experts.gate_proj", "experts.up_proj")


def expert_targets(spec: ArchSpec, plan: LayerPlan, rel: str) -> list[tuple[int, str, str]]:
    """``[(expert, shard, kind)]`` the checkpoint tensor of block-relative moekit name ``rel`` writes (``kind``:
    ``"weight"``, ``"bias"``, ``"scale"``, ``"input_scale"``); ``[]`` for no routed-expert tensor. A non-gated layer's
    one input projection is written under both ``w1`` and ``w3``, so a fused input stack meets either per-expert form
    (a per-expert gate and up pair of such a layer is refused by the mapping, with its own reason)."""
    e, gated = plan.num_experts, is_gated(plan.activation)
    first = e - plan.routed_shared_experts
    for name, proj, _ in spec.splits:  # flat [E * I, H] stacks (DBRX)
        if rel == name:
            return [(x, SHARD_OF_PROJ[proj], "weight") for x in range(e)]
    if plan.routed_shared_experts and rel in ("experts.gate_up_proj", "experts.down_proj"):
        shards = (DOWN,) if rel == "experts.down_proj" else (GATE, UP)
        return [(x, s, "weight") for x in range(first) for s in shards]
    if rel in spec.appended_experts:  # shared-expert stacks: experts E - S .. E - 1
        shard = (GATE, UP, DOWN)[spec.appended_experts.index(rel)]
        return [(x, shard, "weight") for x in range(first, e)]
    if rel in _PROJ_STACKS and gated:
        return [(x, SHARD_OF_PROJ[rel.rpartition(".")[2]], "weight") for x in range(e)]
    if m := EXPERT_KEY_RE.search(rel):
        kind, proj, x = KIND_OF_SUFFIX[m.group(4)], m.group(3), int(m.group(2))
        if kind is None or proj not in SHARD_OF_PROJ or x >= e:  # (checked, not stored; unknown; a zero expert)
            return []
        return [(x, SHARD_OF_PROJ[proj], kind)]
    if f := FUSED_KEY_RE.search(rel):
        kind, which = KIND_OF_SUFFIX[f.group(2) or ""], f.group(1)
        if which == "up_proj" and gated:  # (refused by the mapping: a gated layer has no up_proj stack)
            return []
        shards = (DOWN,) if which == "down_proj" else (GATE, UP)
        return [(x, s, kind) for x in range(e) for s in shards]
    return []


def check_duplicate_experts(spec: ArchSpec, plan: LayerPlan, keys: dict[str, str]) -> None:
    """``ValueError`` naming the block, the expert, the shard and both checkpoint keys where two of ``keys``
    (block-relative moekit name -> checkpoint key) write one routed-expert tensor."""
    seen: dict[tuple[int, str, str], str] = {}
    clashes = []
    for rel in sorted(keys):
        for target in expert_targets(spec, plan, rel):
            other = seen.setdefault(target, rel)
            if other != rel:
                clashes.append((target, other, rel))
    if not clashes:
        return
    (x, shard, kind), a, b = clashes[0]
    more = len(clashes) - 1
    also = f" (and {more} more expert tensor{'s' if more > 1 else ''} held twice)" if more else ""
    raise ValueError(
        f"{plan.name}: expert {x}'s {shard} ({'/'.join(PROJ_NAMES[shard])}) {kind} is stored twice in the checkpoint, "
        f"as {keys[a]!r} and as {keys[b]!r}{also}: remove one (moekit does not guess which copy is current)")


def check_duplicate_own(spec: ArchSpec, plan: LayerPlan, keys: dict[str, str], layer, read) -> None:
    """``ValueError`` naming the block, the tensor and both checkpoint keys where two of ``keys`` (block-relative
    moekit name -> checkpoint key) write one tensor of ``layer``'s own (a router weight, a selection bias, a shared
    expert's weight: any but the routed experts', :func:`check_duplicate_experts`; both halves of a fused gate_up_proj
    given apart are not two copies) and the two copies differ. Bit-identical copies (dtype, shape and bytes, as they
    load: a transposed one read back) load: either gives the layer the same tensor, and a save writing one tensor
    under two names (a renamed copy kept beside the original) is one transformers loads too. ``read(key)``: the
    tensor (only the keys of such a pair are read), or None where it cannot be read (inspect: a shard not on disk,
    warned of by itself)."""
    own = {n for n, _ in layer.named_parameters()} | {n for n, b in layer.named_buffers() if b is not None}
    writers: dict[str, list[tuple[str, int | None]]] = {}
    for rel in sorted(keys):
        if EXPERT_KEY_RE.search(rel) or FUSED_KEY_RE.search(rel) or expert_targets(spec, plan, rel):
            continue
        pname, half = own_target(rel, own)
        if pname is not None and not is_slot_tensor(layer, pname):
            writers.setdefault(pname, []).append((rel, half))
    tensors: dict[str, torch.Tensor | None] = {}

    def loaded(rel: str):
        if rel not in tensors:
            t = read(keys[rel])
            tensors[rel] = None if t is None else expand_key(spec, plan, rel, t, keys[rel])[0][1]
        return tensors[rel]

    for pname, group in writers.items():
        for i, (a, half_a) in enumerate(group):
            for b, half_b in group[i + 1:]:
                if half_a is not None and half_b is not None and half_a != half_b:
                    continue  # (the gate rows and the up rows)
                ta, tb = loaded(a), loaded(b)
                if ta is None or tb is None or _same(_rows(ta, half_a, half_b), _rows(tb, half_b, half_a)):
                    continue
                half = half_a if half_a is not None else half_b
                part = f" ({HALVES[half][:-1]} rows)" if half is not None else ""
                raise ValueError(f"{plan.name}: {pname}{part} is stored twice in the checkpoint, as {keys[a]!r} and "
                                 f"as {keys[b]!r}, and the two copies differ: remove one (moekit does not guess which "
                                 "copy is current; bit-identical copies load)")


def _rows(t: torch.Tensor, mine: int | None, other: int | None) -> torch.Tensor:
    """``t``, or where it is a whole fused gate_up_proj (``mine`` None) met by one half (``other``), those rows."""
    return t.chunk(2)[other] if mine is None and other is not None and t.dim() else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: one dtype, one shape, the same bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
