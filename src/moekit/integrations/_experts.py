"""transformers' experts switch on moekit (``experts_implementation="moekit"``, see
:func:`moekit.integrations.transformers.register`): the experts forward and what it reads from a
transformers experts module (its gate function as a moekit activation, its stacks in moekit's layout)."""

from __future__ import annotations

import importlib
import weakref

import torch
from torch.nn.utils import parametrize

from ..experts.layout import FusedLayout
from ..ops.activation import (SOFTCAP_GATE, SOFTCAP_UP, SWIGLUOAI_ALPHA, activation_from_hf, gated_activation_from_hf,
                              is_gated)
from ._blocks import convert_stacks


def _alpha_checked(m) -> tuple[str, float]:
    alpha = float(getattr(m, "alpha", getattr(m, "swiglu_alpha", SWIGLUOAI_ALPHA)))
    if abs(alpha - SWIGLUOAI_ALPHA) > 1e-9:
        raise NotImplementedError(f"{type(m).__name__} with swiglu alpha={alpha}: moekit's swigluoai uses 1.702")
    return "swigluoai", float(m.limit)


def _softcapped(m) -> tuple[str, None]:
    caps = (float(m.act_fn.gate_softcap.softcap), float(m.act_fn.up_softcap.softcap))
    if caps != (SOFTCAP_GATE, SOFTCAP_UP):
        raise NotImplementedError(f"{type(m).__name__} with softcaps {caps}: moekit's softcap_swiglu uses "
                                  f"({SOFTCAP_GATE}, {SOFTCAP_UP})")
    return "softcap_swiglu", None


def _hf_act(m) -> tuple[str, None]:
    """The gate function transformers runs: the module's ``act_fn`` (round 66: ``config.hidden_act`` was read, which
    LFM2-MoE's experts ignore (SiLU always), Gemma 4's read as ``hidden_activation``, DeepSeek-V4's followed), else
    the config's name."""
    fn = getattr(m, "act_fn", None)
    if fn is not None:
        return gated_activation_from_hf(_act_fn_name(fn, type(m).__name__)), None
    cfg = m.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu"  # Gemma: the latter
    return gated_activation_from_hf(name), None  # (gated experts: a relu2 refused, round 65)


def _act_fn_name(fn, owner: str) -> str:
    """transformers' activation name of an ``act_fn`` (an ``ACT2FN`` module, ``torch.nn.GELU`` / ``SiLU`` or
    ``F.silu`` / ``F.gelu``); ``NotImplementedError`` naming it otherwise."""
    from transformers import activations

    if fn is torch.nn.functional.silu:
        return "silu"
    if fn is torch.nn.functional.gelu:
        return "gelu"
    if type(fn) is torch.nn.GELU:
        return "gelu_pytorch_tanh" if fn.approximate == "tanh" else "gelu"
    for name, cls in activations.ACT2CLS.items():  # plain classes only: (class, kwargs) entries repeat one of them
        if not isinstance(cls, tuple) and type(fn) is cls:
            return name
    raise NotImplementedError(f"experts_implementation='moekit': {owner}.act_fn is {fn!r}, which moekit does not "
                              "know as one of its activations")


def _post_clamp(m) -> tuple[str, float | None]:
    """Bailing-hybrid: ``min(act(g), L) * clamp(u, -L, L)`` with the layer's limit ``m.limit`` (None: none)."""
    name, _ = _hf_act(m)
    if getattr(m, "limit", None) is None:
        return name, None
    if name != "silu":
        raise NotImplementedError(f"{type(m).__name__} with a SwiGLU limit after {name!r}: moekit's "
                                  "silu_post_clamp clamps silu(g) only")
    return "silu_post_clamp", float(m.limit)


#: experts classes with their own gate function -> (moekit activation, swiglu_limit) of a module
_GATE_FUNCTIONS = {
    **dict.fromkeys(("GptOssExperts", "OpenAIPrivacyFilterExperts", "MiniMaxM3VLExperts"), _alpha_checked),
    "DeepseekV4Experts": lambda m: (_hf_act(m)[0], float(m.limit)),  # (round 66: silu whatever act_fn was)
    **dict.fromkeys(("Glm5NextTextExperts", "HYV4Experts", "HYV4VLExperts"), lambda m: ("silu", float(m.swiglu_limit))),
    "BeamExperts": _hf_act,  # silu in fp32: what moekit's epilogue does anyway
    "AriaExperts": lambda m: ("silu", None),  # SiLU whatever config.hidden_act says
    # per-layer limits after SiLU (both decorated for the switch from transformers 5.25)
    **dict.fromkeys(("BailingHybridExperts", "Step3p7Experts"), _post_clamp),
    **dict.fromkeys(("Inkling2Experts", "Inkling2LoopExperts"), _softcapped),
}


def experts_activation(module) -> tuple[str, float | None]:
    """(moekit activation, swiglu_limit) equal to the experts module's gate function."""
    from transformers.integrations import moe as hf_moe

    cls = parametrize.type_before_parametrizations(module)  # (round 69: PEFT's LoRA on the stacks parametrizes
    name = cls.__name__  # them, renaming the class "Parametrized...": gpt-oss's gate function was not found)
    if name in _GATE_FUNCTIONS:
        return _GATE_FUNCTIONS[name](module)
    if not getattr(module, "has_gate", True):  # non-gated (Nemotron-H): act(up x)
        hidden_act = getattr(module.config, "mlp_hidden_act", "relu2")
        activation = activation_from_hf(hidden_act)
        if is_gated(activation):  # silu / gelu would read gate rows the non-gated stack does not have
            raise NotImplementedError(f"{name} with mlp_hidden_act={hidden_act!r}: its experts compute act(up x), not "
                                      "gated; moekit's only non-gated activation is relu2")
        return activation, None
    if getattr(cls, "_apply_gate", None) is not getattr(hf_moe, "_default_apply_gate", None):
        raise NotImplementedError(f"experts_implementation='moekit' does not know the gate function of {name}")
    return _hf_act(module)


def _input_stack(module):
    """The input-side expert stack: ``gate_up_proj`` (gated) or ``up_proj`` (non-gated, Nemotron-H)."""
    return module.gate_up_proj if hasattr(module, "gate_up_proj") else module.up_proj


def experts_weights(module):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) for ``fused_experts``: the
    module's own stacks in moekit's layout, else converted copies, cached on the module (:class:`_Converted`, in
    ``_moekit_converted``) for as long as the tensors they were converted from are alive and unchanged."""
    b13, b2 = (module.gate_up_proj_bias, module.down_proj_bias) if module.has_bias else (None, None)
    w13 = _input_stack(module)
    if not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True):
        return w13, module.down_proj, b13, b2
    layout = FusedLayout(transposed=bool(module.is_transposed), interleaved=not module.is_concatenated)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (w13, module.down_proj, b13, b2))):
        # autograd through the conversion to the block's own stacks (round 58: cached detached copies gave gpt-oss's
        # stacks no gradient, silently); converted per call while training, and while compiling (round 68: the
        # cache's key, an attribute write and is_inference() broke fullgraph and recompiled every call: views and
        # a cat the compiled graph holds)
        return convert_stacks(w13, module.down_proj, b13, b2, w13.shape[0], layout)
    sources = (w13, module.down_proj, b13, b2)
    cache = module.__dict__.get(_CACHE)
    if not isinstance(cache, _Converted) or not cache.made_from(sources):  # (a tuple: a round-68 pickle's cache)
        stacks = convert_stacks(w13, module.down_proj, b13, b2, w13.shape[0], layout)
        cache = _Converted(module, sources, tuple(t.detach() if t is not None else None for t in stacks))
        module.__dict__[_CACHE] = cache
    return cache.stacks


#: attribute (in an experts module's ``__dict__``) holding its :class:`_Converted` stacks
_CACHE = "_moekit_converted"


class _Converted:
    """The converted stacks of an experts module and what they were made from, which they never keep alive.

    The key holds each source tensor by weak reference (round 69: it held them strongly): the cache is dropped from
    its module as soon as one of them is freed. That is the whole rule for offloading: accelerate's offload hooks
    (``device_map`` with ``"disk"`` / ``"cpu"`` offload, ``cpu_offload``, ``disk_offload``) put new parameter objects
    in the module for each forward and meta ones after it, so the tensors a forward's copies were made from are freed
    when the forward ends, and the copies with them: nothing stays in memory between calls (before, every offloaded
    layer's sources and copies stayed). Beside each source: its version counter (in-place edits; round 49: the biases
    and a replaced ``down_proj`` were not in the key, so edits to them kept the stale copies), and its memory, dtype,
    device and shape (round 61: ``p.data = new`` and ``model.to(dtype / device)`` keep the parameter object and its
    version, and the stale copies were used: wrong logits, or a dtype error). Not seen: in-place edits through
    ``p.data`` (they bypass the version counter: edit under ``torch.no_grad()`` instead) and of inference tensors (no
    version counter). Copies and pickles of the module do not carry it (it is made again at the next call)."""

    __slots__ = ("key", "stacks", "__weakref__")

    def __init__(self, module, sources, stacks):
        owner, me = weakref.ref(module), weakref.ref(self)

        def drop(_ref) -> None:  # a source was freed: the module forgets these copies (if they are still its own)
            m, c = owner(), me()
            if m is not None and c is not None and m.__dict__.get(_CACHE) is c:
                del m.__dict__[_CACHE]

        self.key = tuple(None if t is None else (weakref.ref(t, drop), *_state(t)) for t in sources)
        self.stacks = stacks

    def made_from(self, sources) -> bool:
        """Whether ``sources`` are the tensors (same objects, unchanged) the stacks were converted from."""
        return all((k is None) == (t is None) and (t is None or (k[0]() is t and k[1:] == _state(t)))
                   for k, t in zip(self.key, sources))

    def __reduce__(self):  # (a pickled module gets no cache: the weak references cannot be pickled)
        return _no_cache, ()

    def __deepcopy__(self, memo):  # (nor a copy: it would key the copies on the original's tensors)
        return None


def _no_cache() -> None:
    return None


def _state(t: torch.Tensor) -> tuple:
    return None if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape)


def moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts forward on moekit: hidden_states [T, H], top_k_index [T, K] int,
    top_k_weights [T, K] float -> [T, H] (dtype of hidden_states)."""
    from ..ops.api import fused_experts

    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError(f"experts_implementation='moekit': post-expert norm ({type(self).__name__})")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='moekit' with transformers' expert parallelism")
    activation, limit = experts_activation(self)
    w13, w2, b13, b2 = experts_weights(self)
    return fused_experts(hidden_states, w13, w2, top_k_weights.float(), top_k_index, activation=activation,
                         w1_bias=b13, w2_bias=b2, swiglu_limit=limit)


def quantised_experts_refused(self, *args, **kwargs):
    """The switch's forward registered on the experts interfaces of quantised experts classes (transformers 5.25:
    ``FP8Experts``, which dispatch through their own interface): they hold fp8 stacks and scales for transformers' own
    kernels, which :func:`moekit_experts_forward` does not read (round 66: transformers raised "`moekit` is not a valid
    experts implementation registered in the `ExpertsInterface`" after ``register()``)."""
    raise NotImplementedError(
        f"experts_implementation={getattr(self.config, '_experts_implementation', None)!r} (moekit's switch) does not "
        f"run {type(self).__name__}: its experts are quantised for transformers' own kernels; use "
        "moekit.integrations.transformers.patch(model), which runs them in moekit in their format")


def quantised_interfaces() -> list:
    """transformers' experts interfaces with their own name -> forward mapping (those of quantised experts classes),
    imported where this transformers has them."""
    from transformers.integrations.moe import ExpertsInterface

    try:
        importlib.import_module("transformers.integrations.finegrained_fp8")  # (defines FP8ExpertsInterface)
    except ImportError:
        pass
    return [c for c in ExpertsInterface.__subclasses__() if "_global_mapping" in c.__dict__]
