"""What every architecture spec uses: :class:`ArchSpec` and small readers of config.json dicts.

A family module (one file per family of transformers MoE blocks) defines plan functions
``plan(cfg: dict, spec: ArchSpec) -> list[LayerPlan]`` and a ``SPECS`` tuple; the registry in
:mod:`moekit.loading.architectures` lists the family modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...ops.activation import activation_from_hf
from ..plan import LayerPlan


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    block: str  # module attribute of the MoE block in a decoder layer ("mlp", "feed_forward")
    ckpt_blocks: tuple[str, ...]  # names of that block in checkpoint keys
    renames: tuple[tuple[str, str], ...]  # block-relative key prefix renames: checkpoint -> moekit layer
    plan: Callable[[dict, "ArchSpec"], list[LayerPlan]]
    experts_switch: bool = True  # transformers' experts_implementation switch exists for it
    fused_layout: str = "rows"


def get(cfg: dict, key: str, default):
    v = cfg.get(key)
    return default if v is None else v


def act(cfg: dict) -> str:
    return activation_from_hf(get(cfg, "hidden_act", "silu"))


def first(cfg: dict, keys: tuple[str, ...], default):
    """The first of ``keys`` present (transformers' attribute maps save either name)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


E_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def layers(cfg: dict) -> int:
    return int(get(cfg, "num_hidden_layers", 0))


def prefixes(spec: ArchSpec, i: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.{b}." for b in spec.ckpt_blocks) + tuple(
        f"layers.{i}.{b}." for b in spec.ckpt_blocks
    )


def mk(spec: ArchSpec, i: int, **kw) -> LayerPlan:
    kw.setdefault("fused_layout", spec.fused_layout)
    return LayerPlan(name=f"model.layers.{i}.{spec.block}", layer_idx=i, ckpt_prefixes=prefixes(spec, i), **kw)


QWEN_RENAMES = (("shared_expert.", "shared_experts."),)
DS_RENAMES = (("gate.e_score_correction_bias", "router.e_score_correction_bias"),)
