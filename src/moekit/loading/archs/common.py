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
    """One architecture: where its MoE blocks live, what their tensors are called, how config.json plans them.

    Everything a loader or ``patch`` needs to find tensors is data here (no per-model code paths):

    - ``stack``: module path of the decoder-layer list in the model of ``model_types`` (``model.layers``;
      DBRX ``transformer.blocks``; a text tower saved alone ``layers``); block ``i`` is ``{stack}.{i}.{block}``.
    - ``towers``: ``(wrapper model_type, sub-config key, stack in the wrapper)`` for multimodal wrappers whose
      text tower is this architecture (``("qwen3_vl_moe", "text_config", "model.language_model.layers")``).
    - ``renames``: block-relative checkpoint key prefixes -> moekit layer names, first match wins.
    - ``splits``: ``(block-relative checkpoint name, projection, transposed)`` for flat expert stacks
      ``[E * I, H]`` (DBRX): row block ``e`` is expert ``e``'s ``projection`` (``transposed``: its ``[I, H]``
      rows are the transpose of the ``[H, I]`` weight).
    - ``fused_layout``: layout of fused expert stacks on disk; ``memory_layout`` the layout of the
      transformers module's stacks (``None``: the same).
    - ``router_path`` / ``score_bias_path`` / ``shared_path`` / ``experts_paths``: block-relative module or
      tensor paths in the transformers block (empty: the common names ``gate``/``router``,
      ``<router>.e_score_correction_bias``, ``shared_experts``/``shared_expert``, fused ``experts.*``).
      ``experts_paths`` is ``(gate_up, down)`` or, for flat stacks, ``(gate, up, down)``.
    """

    name: str
    model_types: tuple[str, ...]
    block: str  # module attribute of the MoE block in a decoder layer ("mlp", "feed_forward")
    ckpt_blocks: tuple[str, ...]  # names of that block in checkpoint keys
    renames: tuple[tuple[str, str], ...]  # block-relative key prefix renames: checkpoint -> moekit layer
    plan: Callable[[dict, "ArchSpec"], list[LayerPlan]]
    experts_switch: bool = True  # transformers' experts_implementation switch exists for it
    fused_layout: str = "rows"
    stack: str = "model.layers"
    towers: tuple[tuple[str, str, str], ...] = ()
    splits: tuple[tuple[str, str, bool], ...] = ()
    memory_layout: str | None = None
    router_path: str = ""
    score_bias_path: str = ""
    shared_path: str = ""
    experts_paths: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")


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


def stack_aliases(stack: str) -> tuple[str, ...]:
    """Where checkpoints keep a layer stack: the path itself and its shorter tails
    (``model.language_model.layers`` -> also ``language_model.layers``, ``layers``), and for a text
    tower at ``….language_model.layers`` the older layout without ``language_model.``
    (``thinker.model.language_model.layers`` -> ``thinker.model.layers``)."""
    out: list[str] = []
    variants = [stack] + ([stack.replace(".language_model.", ".")] if ".language_model." in stack else [])
    for v in variants:
        parts = v.split(".")
        out += [t for t in (".".join(parts[j:]) for j in range(len(parts))) if t not in out]
    return tuple(out)


def prefixes(spec: ArchSpec, i: int, stack: str | None = None) -> tuple[str, ...]:
    return tuple(f"{s}.{i}.{b}." for s in stack_aliases(stack or spec.stack) for b in spec.ckpt_blocks)


def mk(spec: ArchSpec, i: int, **kw) -> LayerPlan:
    kw.setdefault("fused_layout", spec.fused_layout)
    return LayerPlan(name=f"{spec.stack}.{i}.{spec.block}", layer_idx=i, ckpt_prefixes=prefixes(spec, i), **kw)


def sparse_layers(cfg: dict, default: bool = True) -> list[int]:
    """Layers whose MLP is a MoE block by ``mlp_layer_types`` (``"sparse"``), or all (``default``)."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return list(range(layers(cfg))) if default else []
    return [i for i, t in enumerate(types[: layers(cfg)]) if t == "sparse"]


QWEN_RENAMES = (("shared_expert.", "shared_experts."),)
DS_RENAMES = (("gate.e_score_correction_bias", "router.e_score_correction_bias"),)
