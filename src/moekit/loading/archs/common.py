"""What every architecture spec uses: :class:`ArchSpec` and small readers of config.json dicts.

A family module (one file per family of transformers MoE blocks) defines plan functions
``plan(cfg: dict, spec: ArchSpec) -> list[LayerPlan]`` and a ``SPECS`` tuple; the registry in
:mod:`moekit.loading.architectures` lists the family modules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ...ops.activation import activation_from_hf, gated_activation_from_hf
from ..plan import LayerPlan


@dataclass(frozen=True)
class ArchSpec:
    """One architecture (or several model types sharing a block): where its MoE blocks live, what their
    tensors are called, how config.json plans them. Everything the loader and ``patch`` need to find a
    block and its tensors is data here (no per-model code paths).

    - ``block``: module attribute of the MoE block in a decoder layer ("mlp", "feed_forward", "mixer",
      "ffn"); ``""`` when the MoE is made of attributes of the decoder layer itself (Gemma 4): then
      ``ckpt_blocks`` names those attributes ("router", "experts", ...) and keys are relative to the layer.
    - ``ckpt_blocks``: names of the block in checkpoint keys (or the layer's MoE attributes, see ``block``).
    - ``renames``: block-relative name prefix renames, checkpoint key or transformers module name ->
      moekit layer name (first match wins). The loader reads checkpoints and
      :func:`moekit.integrations.transformers.patch` adopts a block's tensors through the same renames.
    - ``stack``: module path of the decoder-layer list in the model of ``model_types`` (``model.layers``;
      DBRX ``transformer.blocks``); block ``i`` is ``{stack}.{i}.{block}``. Checkpoint keys may use the
      path or any shorter tail of it (``layers.3.mlp.`` for a text tower saved alone), or
      ``ckpt_stacks`` (other on-disk roots: Nemotron-H's ``backbone.layers``).
    - ``towers``: ``(wrapper model_type, sub-config key, stack in the wrapper, other on-disk stacks)`` for
      multimodal wrappers whose text tower is this architecture (``("qwen3_vl_moe", "text_config",
      "model.language_model.layers", ())``; Llama 4's ``language_model.model.layers``); the on-disk stacks are
      roots of that wrapper's checkpoints beyond the stack's aliases (Kimi-K2.5's ``language_model.model.blocks``).
    - ``layer_members``: attributes of the decoder layer that checkpoints store the block's parts under
      (``layers.N.experts.*`` for ``layers.N.mlp.experts.*``: Mistral Large 4's consolidated format); the
      block-relative name then keeps the member (``experts.0.w1.weight``).
    - ``splits``: ``(block-relative name, projection, transposed)`` for flat expert stacks ``[E * I, H]``
      (DBRX): row block ``e`` is expert ``e``'s ``projection`` (``transposed``: the ``[I, H]`` rows are the
      transpose of the ``[H, I]`` weight).
    - ``appended_experts``: names of ``[S, ...]`` stacks (gate, up, down) of shared experts that the
      moekit layer runs as routed experts ``E - S .. E - 1`` (``routed_shared_experts``; Inkling).
    - ``fused_layout``: layout of fused expert stacks on disk; ``memory_layout`` the layout of the
      transformers module's stacks (``None``: the same).
    - ``transposed``: checkpoint key tails (a key ending in ``"." + name``; block-relative names before
      ``renames``) of 2-D weights stored as ``[in, out]`` (Ergo's ``gate_kernel`` and shared projections):
      the loader transposes them (full-precision only: a quantised one raises ``NotImplementedError``).
    """

    name: str
    model_types: tuple[str, ...]
    block: str
    ckpt_blocks: tuple[str, ...]
    renames: tuple[tuple[str, str], ...]
    plan: Callable[[dict, "ArchSpec"], list[LayerPlan]]
    experts_switch: bool = True  # transformers' experts_implementation switch exists for it
    fused_layout: str = "rows"
    memory_layout: str | None = None
    stack: str = "model.layers"
    ckpt_stacks: tuple[str, ...] = ()
    towers: tuple[tuple[str, str, str, tuple[str, ...]], ...] = ()
    layer_members: tuple[str, ...] = ()
    splits: tuple[tuple[str, str, bool], ...] = ()
    appended_experts: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()

    @property
    def layer_level(self) -> bool:
        return not self.block


#: where a multimodal wrapper (``XForConditionalGeneration``) keeps its text tower's decoder layers
LM_STACK = "model.language_model.layers"


def towers(*wrappers: str, key: str = "text_config", stack: str = LM_STACK,
           ckpt_stacks: tuple[str, ...] = ()) -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    """``ArchSpec.towers`` for wrapper model types sharing one sub-config key, stack and on-disk stacks."""
    return tuple((w, key, stack, tuple(ckpt_stacks)) for w in wrappers)


def get(cfg: dict, key: str, default):
    v = cfg.get(key)
    return default if v is None else v


def required(cfg: dict, key: str):
    """``cfg[key]``; missing or null raises ``KeyError(key)`` (:func:`plan_layers` names the field)."""
    v = cfg.get(key)
    if v is None:
        raise KeyError(key)
    return v


def period(cfg: dict, key: str, default: int = 1) -> int:
    """A layer period of config.json (``decoder_sparse_step``, ``expert_layer_period``...: a MoE block every
    ``period`` layers), a whole number >= 1; 0 or less raises ``ValueError`` naming the field (:func:`plan_layers`
    names the file), not a bare ``ZeroDivisionError`` from inside a plan (round 55)."""
    v = int(get(cfg, key, default))
    if v < 1:
        raise ValueError(f"{key} must be >= 1 (a MoE block every {key} layers), got {v}")
    return v


def act(cfg: dict, gated: bool = True) -> str:
    """The experts' activation of ``hidden_act`` (``gated``: the architecture's experts compute act(gate) * up)."""
    return (gated_activation_from_hf if gated else activation_from_hf)(get(cfg, "hidden_act", "silu"))


def first(cfg: dict, keys: tuple[str, ...], default):
    """The first of ``keys`` present (transformers' attribute maps save either name)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


E_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


#: the most decoder layers a config may declare (round 61: 1e7 planned for minutes, -1 planned "0 MoE blocks")
MAX_LAYERS = 100_000


def layers(cfg: dict) -> int:
    """``num_hidden_layers``: a whole number in [1, :data:`MAX_LAYERS`] (0 when absent), else ``ValueError``."""
    v = cfg.get("num_hidden_layers")
    if v is None:
        return 0
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_LAYERS:
        raise ValueError(f"config.json's num_hidden_layers must be a whole number in [1, {MAX_LAYERS}], got {v!r}")
    return v


def stack_aliases(stack: str) -> tuple[str, ...]:
    """Where checkpoints keep a layer stack: the path itself and its shorter tails
    (``model.language_model.layers`` -> also ``language_model.layers``, ``layers``), and for a text
    tower at ``….language_model.layers`` the older layout without ``language_model.``
    (``thinker.model.language_model.layers`` -> ``thinker.model.layers``) and, at ``model.language_model.layers``,
    the LLaVA-style ``language_model.model.layers`` (Kimi-K2.5's shards; transformers renames it on load)."""
    out: list[str] = []
    variants = [stack] + ([stack.replace(".language_model.", ".")] if ".language_model." in stack else [])
    if stack.startswith("model.language_model."):
        variants.append("language_model.model." + stack[len("model.language_model."):])
    for v in variants:
        parts = v.split(".")
        out += [t for t in (".".join(parts[j:]) for j in range(len(parts))) if t not in out]
    return tuple(out)


def prefixes(spec: ArchSpec, i: int, stack: str | None = None, ckpt_stacks: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Checkpoint key prefixes of block ``i`` (of the layer, for layer-level specs); ``ckpt_stacks``: a wrapper's
    other on-disk stacks (``ArchSpec.towers``)."""
    stacks = stack_aliases(stack or spec.stack) + spec.ckpt_stacks + ckpt_stacks
    if spec.layer_level:
        return tuple(f"{s}.{i}." for s in stacks)
    return tuple(f"{s}.{i}.{b}." for s in stacks for b in spec.ckpt_blocks)


def block_path(spec: ArchSpec, i: int, stack: str | None = None) -> str:
    """Module path of block ``i`` (of decoder layer ``i`` for layer-level specs)."""
    return f"{stack or spec.stack}.{i}" + (f".{spec.block}" if spec.block else "")


def mk(spec: ArchSpec, i: int, **kw) -> LayerPlan:
    """The :class:`LayerPlan` of block ``i``. A plan that names no ``shared_activation`` gets its routed
    ``activation``: transformers' shared MLPs run ``ACT2FN[hidden_act]`` as the experts do (round 46: the
    default was "silu" whatever ``hidden_act`` said, so gelu configs of 30 families ran a SiLU shared expert)."""
    kw.setdefault("fused_layout", spec.fused_layout)
    kw.setdefault("shared_activation", kw.get("activation", "silu"))
    return LayerPlan(name=block_path(spec, i), layer_idx=i, ckpt_prefixes=prefixes(spec, i), **kw)


def sparse_layers(cfg: dict, dense_key: str | None = None, default_dense: int = 0) -> list[int]:
    """The MoE layers: ``mlp_layer_types[i]`` is ``"sparse"`` / ``"moe"`` when the config lists them, else
    the layers from ``cfg[dense_key]`` on (``first_k_dense_replace`` / ``num_dense_layers``; all layers
    without ``dense_key``)."""
    types = cfg.get("mlp_layer_types")
    if types is not None:
        return [i for i, t in enumerate(types[: layers(cfg)]) if t in ("sparse", "moe")]
    return list(range(int(get(cfg, dense_key, default_dense)) if dense_key else 0, layers(cfg)))


def dense_head(dense_key: str):
    """A ``layer_fn`` for a class without ``mlp_layer_types`` (AFMoE, LFM2-MoE, GLM-4.5V): the layers from
    ``cfg[dense_key]`` on, whatever a stray ``mlp_layer_types`` says (the class never reads one)."""
    return lambda cfg: list(range(int(get(cfg, dense_key, 0)), layers(cfg)))


QWEN_RENAMES = (("shared_expert.", "shared_experts."),)
DS_RENAMES = (("gate.e_score_correction_bias", "router.e_score_correction_bias"),)


def post_clamp_limits(plans: list[LayerPlan], cfg: dict, routed_keys: tuple[str, ...],
                      shared_keys: tuple[str, ...]) -> list[LayerPlan]:
    """Per-layer SwiGLU limits clamping ``silu(g)`` after the activation (Step-3.x, Bailing-hybrid):
    ``cfg[routed_keys][i]`` / ``cfg[shared_keys][i]`` for layer ``i``; 0 or None leaves the layer's
    plain activation. A limit on a non-SiLU activation raises ``NotImplementedError``."""
    n = layers(cfg)
    routed = first(cfg, routed_keys, None) or [None] * n
    shared = first(cfg, shared_keys, None) or [None] * n
    out = []
    for p in plans:
        lim, slim = routed[p.layer_idx] or None, shared[p.layer_idx] or None
        for what, limit, activation in (("routed", lim, p.activation), ("shared", slim, p.shared_activation)):
            if limit and activation != "silu":
                raise NotImplementedError(f"a {what} SwiGLU limit after {activation!r}: moekit's silu_post_clamp "
                                          "clamps silu(g) only")
        out.append(replace(p, activation="silu_post_clamp" if lim else p.activation,
                           swiglu_limit=float(lim) if lim else None,
                           shared_activation="silu_post_clamp" if slim else p.shared_activation,
                           shared_swiglu_limit=float(slim) if slim else None))
    return out
