"""Checkpoint names -> expert parameters (SPEC §6), and loading one layer from ``(name, tensor)`` pairs.

A mapping entry ``(param_name, weight_name, expert_id, shard_id)`` says: a checkpoint tensor whose name
contains ``weight_name`` (e.g. ``"experts.3.gate_proj."``) is shard ``shard_id`` of physical expert
``expert_id`` and lands in ``param_name`` (``"routed_experts.w13_"`` for gate/up, ``"routed_experts.w2_"``
for down; ``+ "weight"`` or ``+ "bias"`` completes the parameter name). Shards (:mod:`.layout`): ``w1``
gate, ``w3`` up, ``w2`` down. Physical ids ``>= E`` are redundant replicas; their ``weight_name`` names
the logical expert they copy (``logical = physical % E`` before any EPLB rebalance).

:func:`load_layer_weights` consumes ``(name, tensor)`` pairs for one layer (a
:class:`~moekit.runner.MoERunner`): per-expert names through the mapping, fused stacks
(``experts.gate_up_proj`` / ``experts.down_proj`` and their biases, in the layout the caller names),
and any other parameter or buffer of the layer by its name. The experts record what they received;
the names of the other parameters written are added to the caller's ``loaded`` set.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from .layout import DOWN, GATE, PROJ_NAMES, SHARD_OF_PROJ, UP, FusedLayout, down_rows, gate_up_rows, get_fused_layout

_EXPERT_RE = re.compile(r"(?:^|\.)(experts\.(\d+)\.([A-Za-z0-9_]+)\.)(weight|bias)$")
_FUSED_RE = re.compile(r"(?:^|\.)experts\.(gate_up_proj|down_proj)(_bias)?$")


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
    ckpt = {GATE: ckpt_gate_proj_name, DOWN: ckpt_down_proj_name, UP: ckpt_up_proj_name}
    for arg, shard in (("ckpt_gate_proj_name", GATE), ("ckpt_down_proj_name", DOWN), ("ckpt_up_proj_name", UP)):
        if not isinstance(ckpt[shard], str) or not ckpt[shard]:
            raise ValueError(f"{arg} must be a non-empty str, got {ckpt[shard]!r}")
    physical = num_experts + num_redundant_experts
    p2l = _physical_to_logical(model, num_experts, physical)
    mapping = []
    for expert_id in range(physical):
        for shard_id in (GATE, DOWN, UP):
            param = f"{routed_experts_prefix}.w2_" if shard_id == DOWN else f"{routed_experts_prefix}.w13_"
            mapping.append((param, f"experts.{p2l[expert_id]}.{ckpt[shard_id]}.", expert_id, shard_id))
    return mapping


def _physical_to_logical(model, num_experts: int, physical: int) -> list[int]:
    experts = getattr(model, "routed_experts", model)
    table = getattr(getattr(experts, "placement", None), "physical_to_logical", None)
    if table is not None and len(table) == physical:
        return [int(x) for x in table]
    return [p if p < num_experts else (p - num_experts) % num_experts for p in range(physical)]


def default_expert_mapping(layer) -> list[tuple[str, str, int, str]]:
    """Both common per-expert conventions: ``{gate,up,down}_proj`` and Mixtral's ``w1/w3/w2``."""
    e = layer.moe_config.num_experts
    redundant = layer.routed_experts.placement.num_physical - e
    return [
        entry
        for style in (0, 1)
        for entry in fused_moe_make_expert_params_mapping(
            layer, PROJ_NAMES[GATE][style], PROJ_NAMES[DOWN][style], PROJ_NAMES[UP][style], e, redundant
        )
    ]


# ------------------------------------------------------------------------------------------------
def load_layer_weights(
    layer, weights: Iterable[tuple[str, torch.Tensor]], *, fused_layout: str = "rows", loaded: set | None = None
) -> set[str]:
    """Load checkpoint ``(name, tensor)`` pairs into one MoE layer; return the names consumed.

    Names are relative to the MoE block (a leading module path is tolerated):
    ``experts.{e}.{gate_proj|up_proj|down_proj|w1|w3|w2}.{weight|bias}`` (via ``layer.expert_mapping``
    or the default mapping), fused ``experts.gate_up_proj``, ``experts.down_proj`` (+ ``_bias``) in
    ``fused_layout`` (see :mod:`moekit.experts.layout`), or the name of any parameter/buffer of the
    layer (``gate.weight``, ``shared_experts.up_proj.weight``, ``router.e_score_correction_bias``, ...),
    whose name is then added to ``loaded``. Expert ids ``E <= e < E + Z`` (LongCat's zero experts) are
    consumed and dropped. Unknown names raise ``KeyError``; wrong shapes raise ``ValueError`` naming
    the key and both shapes.
    """
    layout = get_fused_layout(fused_layout)
    mapping = layer.expert_mapping or default_expert_mapping(layer)
    by_weight: dict[str, list[tuple[int, str]]] = {}
    for _param, weight_name, expert_id, shard in mapping:
        by_weight.setdefault(weight_name, []).append((expert_id, shard))
    own = dict(layer.named_parameters())
    own.update({n: b for n, b in layer.named_buffers() if b is not None})
    loaded = set() if loaded is None else loaded
    consumed = set()
    for name, tensor in weights:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint entry {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        m = _EXPERT_RE.search(name)
        f = _FUSED_RE.search(name) if m is None else None
        if m is not None:
            _load_expert(layer, name, tensor, m, by_weight)
        elif f is not None:
            _load_fused(layer.routed_experts, name, tensor, f.group(1), f.group(2) is not None, layout)
        elif (pname := _load_own(layer, name, tensor, own)) is not None:
            loaded.add(pname)
        consumed.add(name)
    return consumed


def _load_expert(layer, name, tensor, m, by_weight) -> None:
    c, experts = layer.moe_config, layer.routed_experts
    weight_name, eid, proj, bias = m.group(1), int(m.group(2)), m.group(3), m.group(4) == "bias"
    entries = by_weight.get(weight_name)
    if entries is None:
        if c.num_experts <= eid < c.num_experts + c.num_zero_experts and proj in SHARD_OF_PROJ:
            return  # a zero (identity) expert: LongCat stores unused gate/up rows for it
        raise KeyError(
            f"checkpoint key {name!r}: no expert mapping entry matches {weight_name!r} "
            f"(layer has {c.num_experts} experts; known projections: gate_proj/up_proj/down_proj, w1/w3/w2)"
        )
    placement = experts.placement
    done = set()
    for physical, shard in entries:
        logical = placement.physical_to_logical[physical] if physical < placement.num_physical else None
        if logical is None or (logical, shard) in done:
            continue
        done.add((logical, shard))
        expected = experts.shard_shape(shard, bias)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"checkpoint key {name!r} has shape {list(tensor.shape)}, expected {list(expected)}")
        experts.load_expert_shard(logical, shard, tensor.to(experts.w13_weight.dtype), bias=bias)


def _load_own(layer, name, tensor, own) -> str | None:
    """A parameter or buffer of the layer by its (suffix) name; returns that name (None for the
    experts' own parameters: the experts record those)."""
    parts = name.split(".")
    pname = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in own), None)
    if pname is None:
        raise KeyError(
            f"checkpoint key {name!r} does not belong to this MoE layer: not an expert weight "
            f"(experts.<e>.<proj>.weight, experts.gate_up_proj, experts.down_proj) and not one of its "
            f"parameters/buffers {sorted(own)}"
        )
    target = own[pname]
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint key {name!r} has shape {list(tensor.shape)}, expected {list(target.shape)}")
    if pname.startswith("routed_experts."):  # a moekit state_dict entry: the experts record it themselves
        layer.routed_experts.load_state_dict({pname.split(".", 1)[1]: tensor}, strict=False)
        return None
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))
    return pname


def _load_fused(experts, name, tensor, which, bias, layout) -> None:
    """Fused stacks: gate_up [E(+Z), 2I, H] (or transposed / interleaved), down [E, H, I] (or [E, I, H]).
    A non-interleaved stack whose shape only fits the other orientation is read in that one (the
    layout named decides only when both fit, i.e. a square tail)."""
    c = experts.moe_config
    e, z, h, inter = c.num_experts, c.num_zero_experts, c.hidden_size, c.intermediate_size
    rows = c.w13_rows(inter)
    if which == "gate_up_proj":
        tail = (rows,) if bias else ((h, rows) if layout.transposed else (rows, h))
    else:
        tail = (h,) if bias else ((inter, h) if layout.transposed else (h, inter))
    if not bias and not layout.interleaved and tail[0] != tail[1] and tuple(tensor.shape[1:]) == tail[::-1]:
        # the other orientation (checkpoints of one model ship both, e.g. Qwen3-VL-MoE): unambiguous here
        layout, tail = FusedLayout(transposed=not layout.transposed, interleaved=False), tail[::-1]
    n = tensor.shape[0] if tensor.dim() == len(tail) + 1 else -1
    allowed = (e, e + z) if which == "gate_up_proj" else (e,)
    if n not in allowed or tuple(tensor.shape[1:]) != tail:
        exp = [e if z == 0 or which != "gate_up_proj" else f"{e} or {e + z}", *tail]
        raise ValueError(f"checkpoint key {name!r} has shape {list(tensor.shape)}, expected {exp}")
    dtype = experts.w13_weight.dtype
    for expert in range(e):  # zero experts' rows (LongCat, e >= E) are dropped
        if which == "down_proj":
            experts.load_expert_shard(expert, DOWN, down_rows(tensor[expert], layout, bias=bias).to(dtype), bias=bias)
            continue
        t = gate_up_rows(tensor[expert], layout, bias=bias)  # [2I, H] / [2I] (or [I, ...] for relu2)
        if not c.gated:
            experts.load_expert_shard(expert, GATE, t.to(dtype), bias=bias)
            continue
        experts.load_expert_shard(expert, GATE, t[:inter].to(dtype), bias=bias)
        experts.load_expert_shard(expert, UP, t[inter:].to(dtype), bias=bias)
