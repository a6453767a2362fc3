"""Checkpoint names -> moekit expert parameters (SPEC §6).

A mapping entry ``(param_name, weight_name, expert_id, shard_id)`` says: a checkpoint tensor whose name
contains ``weight_name`` (e.g. ``"experts.3.gate_proj."``) is shard ``shard_id`` of physical expert
``expert_id`` and lands in ``param_name`` (``"routed_experts.w13_"`` for gate/up, ``"routed_experts.w2_"``
for down; ``+ "weight"`` or ``+ "bias"`` completes the parameter name). Shards: ``w1`` gate, ``w3`` up,
``w2`` down. Physical ids ``>= E`` are redundant replicas; their ``weight_name`` names the logical
expert they copy (``logical = physical % E`` before any EPLB rebalance).

:func:`load_layer_weights` consumes ``(name, tensor)`` pairs for one layer: per-expert names through
the mapping, fused stacks (``experts.gate_up_proj`` / ``experts.down_proj`` and their biases, in the
layout ``layer.fused_layout`` names), and any other parameter or buffer of the layer by its name.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

SHARD_OF_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}
_EXPERT_RE = re.compile(r"(?:^|\.)(experts\.(\d+)\.([A-Za-z0-9_]+)\.)(weight|bias)$")
_FUSED_RE = re.compile(r"(?:^|\.)experts\.(gate_up_proj|down_proj)(_bias)?$")

#: layouts of fused expert stacks: how ``experts.gate_up_proj`` / ``experts.down_proj`` are stored
FUSED_LAYOUTS = {
    # [E, 2I, H] gate rows then up rows; [E, H, I]            (transformers default: Mixtral, Qwen, DeepSeek)
    "rows": dict(transposed=False, interleaved=False),
    # [E, H, 2I] gate/up columns interleaved g0 u0 g1 u1 ...; [E, I, H]                      (gpt-oss)
    "transposed_interleaved": dict(transposed=True, interleaved=True),
    # [E, H, 2I] gate columns then up columns; [E, I, H]                                       (Llama 4)
    "transposed": dict(transposed=True, interleaved=False),
}


def fused_moe_make_expert_params_mapping(
    model,
    ckpt_gate_proj_name: str,
    ckpt_down_proj_name: str,
    ckpt_up_proj_name: str,
    num_experts: int,
    num_redundant_experts: int = 0,
    routed_experts_prefix: str = "routed_experts",
) -> list[tuple[str, str, int, str]]:
    """``[(param_name, weight_name, expert_id, shard_id)]`` for ``E + R`` physical experts.

    ``model`` may be None or an object whose ``placement.physical_to_logical`` (a MoERunner's
    ``routed_experts``, or the runner itself) gives the physical -> logical map; otherwise replica
    ``E + r`` copies logical expert ``r % E``.
    """
    for name, v in (("num_experts", num_experts), ("num_redundant_experts", num_redundant_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    for name, v in (
        ("ckpt_gate_proj_name", ckpt_gate_proj_name),
        ("ckpt_down_proj_name", ckpt_down_proj_name),
        ("ckpt_up_proj_name", ckpt_up_proj_name),
    ):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a non-empty str, got {v!r}")
    physical = num_experts + num_redundant_experts
    p2l = _physical_to_logical(model, num_experts, physical)
    mapping = []
    for expert_id in range(physical):
        for shard_id, ckpt in (("w1", ckpt_gate_proj_name), ("w2", ckpt_down_proj_name), ("w3", ckpt_up_proj_name)):
            param = f"{routed_experts_prefix}.w13_" if shard_id in ("w1", "w3") else f"{routed_experts_prefix}.w2_"
            mapping.append((param, f"experts.{p2l[expert_id]}.{ckpt}.", expert_id, shard_id))
    return mapping


def _physical_to_logical(model, num_experts: int, physical: int) -> list[int]:
    placement = getattr(model, "placement", None) or getattr(getattr(model, "routed_experts", None), "placement", None)
    table = getattr(placement, "physical_to_logical", None)
    if table is not None and len(table) == physical:
        return [int(x) for x in table]
    return [p if p < num_experts else (p - num_experts) % num_experts for p in range(physical)]


def default_expert_mapping(layer) -> list[tuple[str, str, int, str]]:
    """Both common per-expert conventions: ``{gate,up,down}_proj`` and Mixtral's ``w1/w3/w2``."""
    e = layer.moe_config.num_experts
    redundant = layer.routed_experts.placement.num_physical - e
    return fused_moe_make_expert_params_mapping(
        layer, "gate_proj", "down_proj", "up_proj", e, redundant
    ) + fused_moe_make_expert_params_mapping(layer, "w1", "w2", "w3", e, redundant)


# ------------------------------------------------------------------------------------------------
def load_layer_weights(layer, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Load checkpoint ``(name, tensor)`` pairs into one MoE layer; return the names consumed.

    Names are relative to the MoE block (a leading module path is tolerated):
    ``experts.{e}.{gate_proj|up_proj|down_proj|w1|w3|w2}.{weight|bias}`` (via ``layer.expert_mapping``
    or the default mapping), fused ``experts.gate_up_proj``, ``experts.down_proj`` (+ ``_bias``) in
    ``layer.fused_layout`` (default ``"rows"``), or the name of any parameter/buffer of the layer
    (``gate.weight``, ``shared_experts.up_proj.weight``, ``router.e_score_correction_bias``, ...).
    Expert ids ``E <= e < E + Z`` (LongCat's zero experts) are consumed and dropped.
    Unknown names raise ``KeyError``; wrong shapes raise ``ValueError`` naming the key and both shapes.
    """
    mapping = getattr(layer, "expert_mapping", None) or default_expert_mapping(layer)
    by_weight: dict[str, list[tuple[str, int, str]]] = {}
    for param, weight_name, expert_id, shard in mapping:
        by_weight.setdefault(weight_name, []).append((param, expert_id, shard))
    own = dict(layer.named_parameters())
    own.update({n: b for n, b in layer.named_buffers() if b is not None})
    loaded = getattr(layer, "_loaded", None)
    if loaded is None:
        loaded = layer._loaded = set()
    consumed = set()
    for name, tensor in weights:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint entry {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        _load_one(layer, name, tensor, by_weight, own, loaded)
        consumed.add(name)
    return consumed


def _load_one(layer, name, tensor, by_weight, own, loaded) -> None:
    c = layer.moe_config
    m = _EXPERT_RE.search(name)
    if m is not None:
        weight_name, eid, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        entries = by_weight.get(weight_name)
        if entries is None:
            if c.num_experts <= eid < c.num_experts + c.num_zero_experts and proj in SHARD_OF_PROJ:
                return  # a zero (identity) expert: LongCat stores unused gate/up rows for it
            raise KeyError(
                f"checkpoint key {name!r}: no expert mapping entry matches {weight_name!r} "
                f"(layer has {c.num_experts} experts; known projections: gate_proj/up_proj/down_proj, w1/w3/w2)"
            )
        placement = layer.routed_experts.placement
        done = set()
        for param, physical, shard in entries:
            logical = placement.physical_to_logical[physical] if physical < placement.num_physical else None
            if logical is None or (logical, shard) in done:
                continue
            done.add((logical, shard))
            _check_expert_shape(layer, name, shard, kind == "bias", tensor)
            layer.routed_experts.load_expert_shard(
                logical, shard, tensor.to(layer.routed_experts.w13_weight.dtype), bias=kind == "bias"
            )
            loaded.add((logical, shard, kind == "bias"))
        return
    m = _FUSED_RE.search(name)
    if m is not None:
        _load_fused(layer, name, tensor, m.group(1), m.group(2) is not None, loaded)
        return
    target, pname = _find_own(name, own)
    if target is None:
        raise KeyError(
            f"checkpoint key {name!r} does not belong to this MoE layer: not an expert weight "
            f"(experts.<e>.<proj>.weight, experts.gate_up_proj, experts.down_proj) and not one of its "
            f"parameters/buffers {sorted(own)}"
        )
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint key {name!r} has shape {list(tensor.shape)}, expected {list(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))
    loaded.add(pname)
    if pname.startswith("routed_experts."):  # a moekit state_dict entry: the whole local stack at once
        kind = pname.split(".", 1)[1]
        shards = {"w13_weight": ("w1", "w3"), "w13_bias": ("w1", "w3"), "w2_weight": ("w2",), "w2_bias": ("w2",)}
        for e in layer.routed_experts.placement.local_logical_ids():
            for s in shards.get(kind, ()):
                loaded.add((e, s, kind.endswith("bias")))


def _find_own(name: str, own: dict):
    parts = name.split(".")
    for i in range(len(parts)):
        cand = ".".join(parts[i:])
        if cand in own:
            return own[cand], cand
    return None, None


def _check_expert_shape(layer, name, shard, bias, tensor) -> None:
    c = layer.moe_config
    h, inter = c.hidden_size, c.intermediate_size
    if bias:
        expected = (h,) if shard == "w2" else (inter,)
    else:
        expected = (h, inter) if shard == "w2" else (inter, h)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"checkpoint key {name!r} has shape {list(tensor.shape)}, expected {list(expected)}")


def _load_fused(layer, name, tensor, which, bias, loaded) -> None:
    """Fused stacks: gate_up [E(+Z), 2I, H] (or transposed / interleaved), down [E, H, I] (or [E, I, H])."""
    c = layer.moe_config
    layout = getattr(layer, "fused_layout", None) or "rows"
    if layout not in FUSED_LAYOUTS:
        raise ValueError(f"layer.fused_layout must be one of {list(FUSED_LAYOUTS)}, got {layout!r}")
    transposed, interleaved = FUSED_LAYOUTS[layout]["transposed"], FUSED_LAYOUTS[layout]["interleaved"]
    e, z, h, inter = c.num_experts, c.num_zero_experts, c.hidden_size, c.intermediate_size
    rows = c.w13_rows(inter)
    if which == "gate_up_proj":
        if bias:
            expected_tail = (rows,)
        else:
            expected_tail = (h, rows) if transposed else (rows, h)
    else:
        expected_tail = (h,) if bias else ((inter, h) if transposed else (h, inter))
    n = tensor.shape[0] if tensor.dim() == len(expected_tail) + 1 else -1
    allowed = (e, e + z) if which == "gate_up_proj" else (e,)
    if n not in allowed or tuple(tensor.shape[1:]) != expected_tail:
        exp = [e if z == 0 or which != "gate_up_proj" else f"{e} or {e + z}", *expected_tail]
        raise ValueError(f"checkpoint key {name!r} has shape {list(tensor.shape)}, expected {exp}")
    re_ = layer.routed_experts
    dtype = re_.w13_weight.dtype
    for expert in range(e):  # zero experts' rows (LongCat, e >= E) are dropped
        t = tensor[expert]
        if which == "down_proj":
            if transposed and not bias:
                t = t.t()
            re_.load_expert_shard(expert, "w2", t.to(dtype), bias=bias)
            loaded.add((expert, "w2", bias))
            continue
        if transposed and not bias:
            t = t.t()  # -> [2I, H]
        if not c.gated:
            re_.load_expert_shard(expert, "w1", t.to(dtype), bias=bias)
            loaded.add((expert, "w1", bias))
            continue
        gate, up = (t[0::2], t[1::2]) if interleaved else (t[:inter], t[inter:])
        re_.load_expert_shard(expert, "w1", gate.to(dtype), bias=bias)
        re_.load_expert_shard(expert, "w3", up.to(dtype), bias=bias)
        loaded.update({(expert, "w1", bias), (expert, "w3", bias)})


def missing_pieces(layer) -> list[str]:
    """What a complete load still lacks: ``"expert 3 w2"``, ``"expert 0 w1 bias"``, ``"gate.weight"``..."""
    c = layer.moe_config
    loaded = getattr(layer, "_loaded", set())
    shards = ("w1", "w3", "w2") if c.gated else ("w1", "w2")
    out = []
    for e in sorted(set(layer.routed_experts.placement.local_logical_ids())):
        for s in shards:
            for bias in (False, True) if c.has_bias else (False,):
                if (e, s, bias) not in loaded:
                    out.append(f"expert {e} {s}{' bias' if bias else ''}")
    for pname, _ in layer.named_parameters():
        if not pname.startswith("routed_experts.") and pname not in loaded:
            out.append(pname)
    return out
