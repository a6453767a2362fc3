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
    """One architecture (or several model types sharing a block).

    block: module attribute of the MoE block in a decoder layer ("mlp", "feed_forward", "mixer"); ``""``
        when the MoE is made of attributes of the decoder layer itself (Gemma 4): then ``ckpt_blocks``
        names those attributes ("router", "experts", ...) and keys are relative to the layer.
    ckpt_blocks: names of the block in checkpoint keys (or the layer's MoE attributes, see ``block``).
    renames: block-relative name prefix renames, checkpoint / transformers module -> moekit layer (the
        first match wins); :func:`moekit.integrations.transformers.patch` adopts the block's tensors
        through the same renames.
    wrappers: model types of multimodal configs whose ``text_config`` is this architecture; their text
        tower's decoder layers live at ``wrapper_prefix + "layers.N"``.
    layer_members: attributes of the decoder layer that checkpoints store the block's parts under
        (``layers.N.experts.*`` for ``layers.N.mlp.experts.*``: Mistral Large 4's consolidated format).
    appended_experts: names of ``[S, ...]`` stacks (gate, up, down) of shared experts that the moekit
        layer runs as routed experts ``E .. E + S - 1`` (``routed_shared_experts``; Inkling).
    """

    name: str
    model_types: tuple[str, ...]
    block: str
    ckpt_blocks: tuple[str, ...]  # names of that block in checkpoint keys
    renames: tuple[tuple[str, str], ...]  # block-relative key prefix renames: checkpoint -> moekit layer
    plan: Callable[[dict, "ArchSpec"], list[LayerPlan]]
    experts_switch: bool = True  # transformers' experts_implementation switch exists for it
    fused_layout: str = "rows"
    wrappers: tuple[str, ...] = ()
    wrapper_prefix: str = "model.language_model."
    appended_experts: tuple[str, ...] = ()
    layer_members: tuple[str, ...] = ()  # on-disk MoE parts stored at the decoder layer (Mistral Large 4)

    @property
    def layer_level(self) -> bool:
        return not self.block


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
    if spec.layer_level:
        return tuple(f"{root}layers.{i}." for root in ROOTS)
    return tuple(f"{root}layers.{i}.{b}." for root in ROOTS for b in spec.ckpt_blocks)


#: where checkpoints keep the decoder stack: ``model.layers``, ``layers`` (a text tower saved alone),
#: ``backbone.layers`` (Nemotron-H)
ROOTS = ("model.", "", "backbone.")


def mk(spec: ArchSpec, i: int, **kw) -> LayerPlan:
    kw.setdefault("fused_layout", spec.fused_layout)
    name = f"model.layers.{i}.{spec.block}" if spec.block else f"model.layers.{i}"
    return LayerPlan(name=name, layer_idx=i, ckpt_prefixes=prefixes(spec, i), **kw)


def sparse_layers(cfg: dict, dense_key: str = "first_k_dense_replace", default_dense: int = 0) -> list[int]:
    """The MoE layers: ``mlp_layer_types[i] == "sparse"`` when the config lists them, else the layers from
    ``cfg[dense_key]`` on (``first_k_dense_replace`` / ``num_dense_layers``)."""
    types = cfg.get("mlp_layer_types")
    if types is not None:
        return [i for i, t in enumerate(types) if t in ("sparse", "moe")]
    return list(range(int(get(cfg, dense_key, default_dense)), layers(cfg)))


QWEN_RENAMES = (("shared_expert.", "shared_experts."),)
DS_RENAMES = (("gate.e_score_correction_bias", "router.e_score_correction_bias"),)
