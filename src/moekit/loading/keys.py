"""Checkpoint keys -> moekit layer names, from the :class:`~moekit.loading.archs.common.ArchSpec` data.

- :func:`assign_keys`: which block a key belongs to (by the plans' key prefixes and the spec's
  ``layer_members``) and its block-relative moekit name (the spec's ``renames``);
- :func:`expand_key`: one checkpoint tensor -> the ``(name, tensor)`` pieces a layer loads (flat DBRX
  stacks of ``spec.splits``, Inkling's shared-expert stacks of ``spec.appended_experts``, one projection's
  ``[E, I, H]`` stack of a gated layer (Step-3.7), the transpose of ``spec.transposed`` weights); anything else is
  itself.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..ops.activation import is_gated
from .architectures import rename_block_key
from .fields import fields_of
from .archs.common import ArchSpec
from .plan import LayerPlan


def _layer_prefix(block_prefix: str) -> str:
    """``model.layers.3.mlp.`` -> ``model.layers.3.``."""
    return block_prefix[: block_prefix[:-1].rfind(".") + 1]


def key_prefixes(spec: ArchSpec, plans: list[LayerPlan]) -> dict[str, tuple[LayerPlan, int]]:
    """key prefix -> (plan, characters to strip for the block-relative name). Block prefixes strip
    themselves; the decoder-layer members (all ``ckpt_blocks`` of a layer-level spec, ``layer_members``
    otherwise) strip the layer prefix only, so the relative name keeps the member."""
    out: dict[str, tuple[LayerPlan, int]] = {}
    for plan in plans:
        if spec.layer_level:
            layer_prefixes, members = plan.ckpt_prefixes, spec.ckpt_blocks
        else:
            out.update({pre: (plan, len(pre)) for pre in plan.ckpt_prefixes})
            layer_prefixes, members = {_layer_prefix(p) for p in plan.ckpt_prefixes}, spec.layer_members
        out.update({f"{lp}{m}.": (plan, len(lp)) for lp in layer_prefixes for m in members})
    return out


def assign_keys(spec: ArchSpec, plans: list[LayerPlan], keys) -> dict[str, dict[str, str]]:
    """layer name -> {moekit-relative name: checkpoint key} for the keys of each planned block.

    A key belongs to a block when it starts with one of the block's prefixes (:func:`key_prefixes`);
    keys of dense layers, MTP layers past ``num_hidden_layers`` and other towers match none. Two keys of one block
    with one name (a wrapper's prefix and the plain one, a renamed and a moekit name) raise ``ValueError``."""
    by_prefix = key_prefixes(spec, plans)
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        dot = key.find(".")
        while dot != -1:
            hit = by_prefix.get(key[: dot + 1])
            if hit is not None:
                rel = rename_block_key(spec, key[hit[1] :])
                if (other := out[hit[0].name].setdefault(rel, key)) != key:  # (round 68: the last one listed won)
                    raise ValueError(f"{hit[0].name}: checkpoint keys {other!r} and {key!r} both load as {rel!r} (one "
                                     "tensor stored twice, under two names): remove one")
                break
            dot = key.find(".", dot + 1)
    return out


def stored_transposed(spec: ArchSpec, key: str) -> bool:
    """The checkpoint ``key`` holds a 2-D weight stored ``[in, out]`` (a tail in ``spec.transposed``)."""
    return bool(spec.transposed) and key.endswith(tuple("." + name for name in spec.transposed))


def check_not_transposed(spec: ArchSpec, what: str, keys) -> None:
    """Quantised dense weights are read ``[out, in]``: one among ``keys`` stored ``[in, out]`` raises."""
    if any(stored_transposed(spec, k) for k in keys):
        raise NotImplementedError(f"{what}: a quantised weight stored [in, out] ({spec.name}'s checkpoint layout) is "
                                  "not read (its scales' block grid would be transposed too)")


def expand_key(spec: ArchSpec, plan: LayerPlan, rel: str, t: torch.Tensor,
               key: str = "") -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` to load for one checkpoint tensor ``key`` of block-relative moekit name ``rel``."""
    if stored_transposed(spec, key):
        if t.dim() != 2:
            raise ValueError(f"has shape {list(t.shape)}, expected a 2-D [in, out] weight (stored transposed)")
        return [(rel, t.T)]
    for name, proj, transposed in spec.splits:  # flat [E * I, H] stacks (DBRX)
        if rel == name:
            if t.dim() != 2 or t.shape[0] % plan.num_experts:
                raise ValueError(f"has shape {list(t.shape)}, expected [{plan.num_experts} * I, H]")
            per = t.view(plan.num_experts, -1, t.shape[-1])
            return [(f"experts.{e}.{proj}.weight", per[e].T if transposed else per[e]) for e in range(len(per))]
    first = plan.num_experts - plan.routed_shared_experts
    if plan.routed_shared_experts and rel in ("experts.gate_up_proj", "experts.down_proj"):
        if rel == "experts.down_proj":  # the routed experts' stacks: E - S experts, loaded one by one
            return [(f"experts.{e}.down_proj.weight", t[e]) for e in range(first)]
        i = plan.intermediate_size
        return [(f"experts.{e}.{p}.weight", t[e, s * i : (s + 1) * i]) for e in range(first)
                for s, p in enumerate(("gate_proj", "up_proj"))]
    if rel in spec.appended_experts:  # [S, ...] shared-expert stacks: experts E - S .. E - 1
        proj = ("gate_proj", "up_proj", "down_proj")[spec.appended_experts.index(rel)]
        return [(f"experts.{first + s}.{proj}.weight", t[s]) for s in range(t.shape[0])]
    if rel in _PROJ_STACKS and is_gated(plan.activation):
        # the gate or the up stack [E, I, H] of a gated layer, stored apart (Step-3.7's Hub layout, round 63): per
        # expert (a non-gated layer's experts.up_proj is its whole input stack, loaded as a fused one)
        if t.dim() != 3 or t.shape[0] != plan.num_experts:
            raise ValueError(f"checkpoint key {key!r} has shape {list(t.shape)}, expected [{plan.num_experts}, "
                             f"{plan.intermediate_size}, {plan.hidden_size}] (one projection's stacked experts)")
        proj = rel.rpartition(".")[2]
        return [(f"experts.{e}.{proj}.weight", t[e]) for e in range(plan.num_experts)]
    return [(rel, t)]


#: stacks of one projection of the routed experts, by moekit name (see :func:`expand_key`)
_PROJ_STACKS = ("experts.gate_proj", "experts.up_proj")


#: tensors a layer takes at construction (a selection bias, a hash table), by moekit name
CONSTRUCTION = ("router.e_score_correction_bias", "router.hash_indices_table")


def construction_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The :data:`CONSTRUCTION` tensors among ``named`` (moekit names); a selection bias stored per expert
    group ``[1, E]`` (ERNIE-4.5) is flattened to ``[E]``."""
    out = {rel: t for rel, t in named.items() if rel in CONSTRUCTION}
    bias = out.get(CONSTRUCTION[0])
    if bias is not None and bias.dim() == 2 and bias.shape[0] == 1:
        out[CONSTRUCTION[0]] = bias.reshape(-1)
    return out


_SHARED_HEADS = ("shared_experts.", "shared_expert_gate.")


def zero_width_shared_gate(plan: LayerPlan, rel: str, numels: dict[str, int]) -> bool:
    """``rel`` is the gate of a zero-width shared expert (Qwen2-MoE with ``shared_expert_intermediate_size = 0``):
    transformers builds the shared MLP with empty weights and its sigmoid gate multiplies zeros, so neither adds
    anything; the plan has no shared expert; nor does its output norm, Ergo's, over zeros: round 65). ``numels``:
    block-relative name -> element count of the block's tensors. Only where every shared-expert projection is empty:
    a real shared expert is never dropped."""
    extra = rel.startswith(_SHARED_HEADS[1]) or (rel.startswith(_SHARED_HEADS[0]) and "proj" not in rel)
    if plan.shared_intermediate_size or not extra:
        return False
    shared = [n for name, n in numels.items() if name.startswith(_SHARED_HEADS[0]) and "proj" in name]
    return bool(shared) and not any(shared)


def field_hint(plan: LayerPlan, rel: str) -> str:
    """The config fields most likely behind a tensor of block-relative moekit name ``rel`` that a layer built from
    ``plan`` lacks or has no place for (a clause for error messages; worded for config.json and a live model.config
    alike, as the loader and ``patch()`` both use it)."""
    if rel.startswith(_SHARED_HEADS):
        if rel.endswith(".bias"):
            return ("the shared MLP's biases: the config's mlp_bias (ERNIE: use_bias) says whether the shared MLP "
                    f"has them (planned: {plan.shared_bias})")
        if not plan.shared_intermediate_size:
            return ("a shared expert, which the config plans none of: its width field (n_shared_experts / "
                    "num_shared_experts, shared_expert_intermediate_size, moe_shared_expert_intermediate_size ...) "
                    "is 0 or missing")
        return (f"the shared MLP (planned width {plan.shared_intermediate_size}, activation "
                f"{plan.shared_activation!r}): its width field and hidden_act / mlp_hidden_act")
    if rel.startswith(("gate.", "router.")):
        return "the router: num_experts / n_routed_experts / num_local_experts, router_bias and the selection bias"
    if rel.startswith(("experts.", "routed_experts.")) or rel.startswith("expert "):
        return (f"the routed experts (planned: {plan.num_experts} experts of width {plan.intermediate_size}, "
                f"activation {plan.activation!r}, biases {plan.has_bias}): num_experts / n_routed_experts / "
                "num_local_experts, moe_intermediate_size and hidden_act / mlp_hidden_act (a gated activation reads "
                "gate and up rows)")
    return ""


def check_construction(plan: LayerPlan, tensors: dict, keys: dict, source=None, spec=None) -> None:
    """``source``: (config.json path, its dict of the blocks' fields), which the top-k error names; ``spec``: the
    architecture, whose names a missing tensor is given in (round 65: DeepSeek-V4's and LongCat's bias was named
    ``gate.e_score_correction_bias``, a key neither has). Values are checked here too, naming the key (round 65: a
    non-finite bias or a table id out of range was blamed on config.json)."""
    sample = next(iter(keys.values()), "")  # the prefix this checkpoint uses (a wrapper's, or the plain stack's)
    pre = next((p for p in plan.ckpt_prefixes if sample.startswith(_layer_prefix(p))), plan.ckpt_prefixes[0])
    members = (spec.ckpt_blocks if spec.layer_level else spec.layer_members) if spec else ()

    def named(rel: str, default: str) -> str:
        names = list(dict.fromkeys(old + rel[len(new):] for old, new in (spec.renames if spec else ())
                                   if rel.startswith(new) and old)) or [rel if spec else default]
        # a decoder-layer member's key sits under the layer, not the block (Step-3.7's moe.router_bias: round 65)
        return " or ".join((_layer_prefix(pre) if n.split(".")[0] in members else pre) + n for n in names)

    most = plan.num_experts + plan.num_zero_experts
    if not 1 <= plan.top_k <= most:  # before any tensor shape that depends on it names the tensor instead
        path, text = source or (None, None)
        field = fields_of(text, "top_k", plan.top_k) or "num_experts_per_tok"
        raise ValueError(f"{path + ': ' if path else ''}{plan.name}: config.json gives top_k = {plan.top_k} ({field}); "
                         f"expected 1 <= top_k <= {most} (the block's routed experts)")
    e_all = plan.num_experts + plan.num_zero_experts - plan.routed_shared_experts
    if plan.has_score_bias:
        t = tensors.get("router.e_score_correction_bias")
        if t is None:
            name = named("router.e_score_correction_bias", "gate.e_score_correction_bias")
            raise KeyError(f"missing checkpoint tensor {name} (router selection bias, [{e_all}])")
        if tuple(t.shape) != (e_all,):
            raise ValueError(f"checkpoint key {keys['router.e_score_correction_bias']!r} has shape {list(t.shape)}, "
                             f"expected [{e_all}]")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"checkpoint key {keys['router.e_score_correction_bias']!r} (the selection bias) holds "
                             f"non-finite values, e.g. {t[~torch.isfinite(t)][:3].tolist()}; expected finite floats")
    if plan.hash_routing:
        t = tensors.get("router.hash_indices_table")
        if t is None:
            raise KeyError(f"missing checkpoint tensor {named('router.hash_indices_table', 'gate.tid2eid')} (hash "
                           f"routing table, [vocab, {plan.top_k}])")
        if t.dim() != 2 or t.shape[1] != plan.top_k:
            raise ValueError(
                f"checkpoint key {keys['router.hash_indices_table']!r} has shape {list(t.shape)}, "
                f"expected [vocab, {plan.top_k}]"
            )
        if t.numel() and not t.is_floating_point() and (int(t.min()) < 0 or int(t.max()) >= plan.num_experts):
            raise ValueError(f"checkpoint key {keys['router.hash_indices_table']!r} (the hash routing table) holds "
                             f"expert ids in [{int(t.min())}, {int(t.max())}]; expected ids in [0, {plan.num_experts})")
