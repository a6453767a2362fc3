"""Expert weight layouts: the one place for shard names and gate/up orders.

moekit's own layout (what :class:`~moekit.experts.routed.RoutedExperts` holds):

    w13 [E, 2I, H] = [gate rows (shard "w1") ; up rows (shard "w3")]     ([E, I, H], "w1" only, for relu2)
    w2  [E, H, I]  = down (shard "w2")

Checkpoints name the shards by projection (:data:`SHARD_OF_PROJ`). Fused stacks come in one of
:data:`FUSED_LAYOUTS`; :func:`gate_up_rows` / :func:`down_rows` bring them to moekit's layout:

    "rows"                    gate_up [E, 2I, H] gate rows then up rows;    down [E, H, I]  (most models)
    "transposed"              gate_up [E, H, 2I] gate columns then up;      down [E, I, H]  (Llama 4)
    "transposed_interleaved"  gate_up [E, H, 2I] columns g0 u0 g1 u1 ...;   down [E, I, H]  (gpt-oss)

Biases (gate_up [E, 2I], down [E, H]) are never transposed; an interleaved layout interleaves them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATE, UP, DOWN = "w1", "w3", "w2"
#: shard ids, in the order a checkpoint mapping lists them (the seed's order)
SHARD_IDS = (GATE, DOWN, UP)
#: checkpoint projection name -> shard id
SHARD_OF_PROJ = {"gate_proj": GATE, "up_proj": UP, "down_proj": DOWN, "w1": GATE, "w3": UP, "w2": DOWN}
#: shard id -> its projection names (``{gate,up,down}_proj`` style first, Mixtral style second)
PROJ_NAMES = {GATE: ("gate_proj", "w1"), UP: ("up_proj", "w3"), DOWN: ("down_proj", "w2")}


def shards(gated: bool) -> tuple[str, ...]:
    """The shards an expert has: gate, up, down (gated activations) or gate, down (relu2)."""
    return (GATE, UP, DOWN) if gated else (GATE, DOWN)


@dataclass(frozen=True)
class FusedLayout:
    """How a fused gate/up and down stack is stored (see the module docstring)."""

    transposed: bool  # the last two dims are swapped
    interleaved: bool  # gate and up alternate along the 2I dim


FUSED_LAYOUTS = {
    "rows": FusedLayout(transposed=False, interleaved=False),
    "transposed": FusedLayout(transposed=True, interleaved=False),
    "transposed_interleaved": FusedLayout(transposed=True, interleaved=True),
}


def get_fused_layout(name: str) -> FusedLayout:
    if name not in FUSED_LAYOUTS:
        raise ValueError(f"fused_layout must be one of {list(FUSED_LAYOUTS)}, got {name!r}")
    return FUSED_LAYOUTS[name]


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[g0 u0 g1 u1 ...] -> [g0 g1 ... ; u0 u1 ...]`` along ``dim`` (a copy)."""
    n = t.shape[dim]
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]).to(t.device)
    return t.index_select(dim, order)


def gate_up_rows(t: torch.Tensor, layout: FusedLayout, *, bias: bool = False) -> torch.Tensor:
    """A fused gate/up weight ``[..., H, 2I]`` / ``[..., 2I, H]`` (or bias ``[..., 2I]``) in ``layout``
    -> ``[..., 2I, H]`` (bias ``[..., 2I]``), gate rows then up rows. A view where no reorder is needed."""
    if layout.transposed and not bias:
        t = t.transpose(-1, -2)
    if layout.interleaved and t.dim():  # (a per-tensor scale: 0-d; a per-row one [2I]: along its one dim, round 62)
        t = deinterleave(t, -1 if bias or t.dim() == 1 else -2)
    return t


def down_rows(t: torch.Tensor, layout: FusedLayout, *, bias: bool = False) -> torch.Tensor:
    """A fused down weight ``[..., I, H]`` / ``[..., H, I]`` (or bias ``[..., H]``) -> ``[..., H, I]``."""
    return t.transpose(-1, -2) if layout.transposed and not bias else t
