"""THE activation registry: ``act([g | u]) -> [*, I]`` for gated activations, ``act(h) -> [*, I]`` otherwise.

With ``h = w13 · x + b13`` and, for gated ones, ``[g | u] = h`` (gate rows first, then up rows):

- ``silu``       : ``silu(g) * u``
- ``gelu``       : ``gelu(g) * u`` (exact erf gelu)
- ``gelu_tanh``  : ``gelu_tanh(g) * u``
- ``swigluoai``  : ``(u + 1) * g * sigmoid(1.702 * g)``
- ``relu2``      : ``relu(h) ** 2`` (non-gated; ``w13`` has ``I`` rows)
- ``silu_post_clamp`` : ``min(silu(g), L) * clamp(u, -L, L)`` (Step-3.x ``swiglu_limits``: the gate is
  clamped *after* SiLU); without a limit it is ``silu``
- ``softcap_swiglu``  : ``c_g·tanh(g/c_g) · sigmoid(g) · c_u·tanh(u/c_u)`` (Inkling-2), with the registry
  constants ``c_g = SOFTCAP_GATE = 4``, ``c_u = SOFTCAP_UP = 25`` (like swigluoai's alpha: a checkpoint with
  other caps is refused by its loader spec); takes no ``swiglu_limit``

A clamp limit ``L`` first sets ``g = min(g, L)``, ``u = clamp(u, -L, L)``: ``L = swiglu_limit`` when
given (DeepSeek-V4), and 7.0 by default for swigluoai (gpt-oss). ``silu_post_clamp`` clamps ``u`` the same
way but ``silu(g)`` after the activation (``Activation.clamp_gate_after``).

Each activation is one :class:`Activation` record: its name, the code the Triton epilogue
(:mod:`moekit.ops._triton.epilogue`) switches on, the torch function, gated or not, its aliases
and the transformers/checkpoint ``hidden_act`` names that map to it. Adding an activation means adding
a record here and its branch in the Triton epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import check_real

SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_DEFAULT_LIMIT = 7.0
SOFTCAP_GATE = 4.0
SOFTCAP_UP = 25.0


def _softcap_swiglu(g, u):
    return SOFTCAP_GATE * torch.tanh(g / SOFTCAP_GATE) * torch.sigmoid(g) * (SOFTCAP_UP * torch.tanh(u / SOFTCAP_UP))


@dataclass(frozen=True)
class Activation:
    """One expert activation.

    torch_fn(g, u) -> act: gated ones take the gate half ``g`` and the up half ``u`` (clamped
    already); a non-gated one takes ``h`` as ``g`` and ``u=None``. Any float dtype in, same dtype out.
    """

    name: str
    code: int  # the ACT constexpr of the Triton w13 epilogue
    torch_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    gated: bool
    aliases: tuple[str, ...] = ()
    hf_names: tuple[str, ...] = ()  # transformers / checkpoint ``hidden_act`` values
    default_limit: float | None = None  # clamp limit when swiglu_limit is None
    takes_limit: bool = True  # accepts swiglu_limit (gated ones only)
    clamp_gate_after: bool = False  # the limit clamps act(g) instead of g (silu_post_clamp)

    def __reduce__(self):
        """Pickled by name (its ``torch_fn`` may be a lambda): a module holding one (``SharedMLP``) saves with
        ``torch.save`` / pickle and unpickles to the registry's own record (round 55: it raised PicklingError)."""
        return _registered, (self.name,)


_REGISTRY = (
    Activation("silu", 0, lambda g, u: F.silu(g) * u, True, aliases=("swiglu",), hf_names=("silu", "swish")),
    Activation("gelu", 1, lambda g, u: F.gelu(g) * u, True, hf_names=("gelu",)),
    Activation("gelu_tanh", 2, lambda g, u: F.gelu(g, approximate="tanh") * u, True,
               aliases=("gelu_pytorch_tanh",), hf_names=("gelu_pytorch_tanh", "gelu_new")),
    Activation("swigluoai", 3, lambda g, u: (u + 1.0) * (g * torch.sigmoid(SWIGLUOAI_ALPHA * g)), True,
               default_limit=SWIGLUOAI_DEFAULT_LIMIT),
    Activation("relu2", 4, lambda h, u: torch.relu(h).square(), False, aliases=("relu2_no_mul",),
               hf_names=("relu2",)),
    Activation("silu_post_clamp", 5, lambda g, u: F.silu(g) * u, True, clamp_gate_after=True),
    Activation("softcap_swiglu", 6, _softcap_swiglu, True, takes_limit=False),
)

#: The activation names ``FusedMoE(activation=...)`` and ``fused_experts`` accept, in registry order:
#: gated ``"silu"`` (alias ``"swiglu"``), ``"gelu"`` (erf), ``"gelu_tanh"`` (alias ``"gelu_pytorch_tanh"``),
#: ``"swigluoai"`` (gpt-oss, clamped), non-gated ``"relu2"`` (alias ``"relu2_no_mul"``), and gated
#: ``"silu_post_clamp"`` (Step-3.x) and ``"softcap_swiglu"`` (Inkling-2).
ACTIVATIONS = tuple(a.name for a in _REGISTRY)
_BY_NAME = {n: a for a in _REGISTRY for n in (a.name, *a.aliases)}


def _registered(name: str) -> Activation:
    """The registry's record of ``name`` (how an :class:`Activation` unpickles)."""
    return _BY_NAME[name]

_BY_HF_NAME = {n: a for a in _REGISTRY for n in a.hf_names}


def get_activation(name) -> Activation:
    """The record of an activation name or alias; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    act = _BY_NAME.get(name)
    if act is None:
        raise ValueError(f"activation must be one of {list(_BY_NAME)}, got {name!r}")
    return act


def canonical_activation(name) -> str:
    """The canonical name of an activation name or alias."""
    return get_activation(name).name


def is_gated(name) -> bool:
    """True when ``w13`` holds gate and up rows (``2I``), False when it holds ``I`` rows."""
    return get_activation(name).gated


def activation_from_hf(hidden_act) -> str:
    """moekit activation name of a transformers / checkpoint ``hidden_act`` (``"swish"`` -> ``"silu"``).

    An act moekit's experts cannot compute raises ``NotImplementedError`` naming it and the supported ones.
    """
    act = _BY_HF_NAME.get(hidden_act) if isinstance(hidden_act, str) else None
    if act is None:
        raise NotImplementedError(
            f"hidden_act={hidden_act!r} is not supported for experts; supported: {list(_BY_HF_NAME)}"
        )
    return act.name


def gated_activation_from_hf(hidden_act) -> str:
    """:func:`activation_from_hf` of the ``hidden_act`` of gated experts (``act(gate) * up``); one whose moekit
    activation is non-gated (``"relu2"``: moekit's reads I rows, act(up x)) raises ``NotImplementedError`` (round 65:
    a gated family's relu2 loaded as the non-gated one, its gate rows overwritten by the up rows)."""
    act = _BY_HF_NAME.get(hidden_act) if isinstance(hidden_act, str) else None
    if act is None:  # (round 65: the list offered relu2, which gated experts refuse)
        raise NotImplementedError(f"hidden_act={hidden_act!r} is not supported for gated experts; supported: "
                                  f"{[n for n, a in _BY_HF_NAME.items() if a.gated]}")
    name = act.name
    if not is_gated(name):
        raise NotImplementedError(f"hidden_act={hidden_act!r} on gated experts (act(gate) * up, as transformers runs "
                                  f"ACT2FN[{hidden_act!r}] here): moekit's {name!r} is non-gated (act(up x)), and a "
                                  f"gated {name} is not supported")
    return name


def check_swiglu_limit(activation: str, swiglu_limit) -> None:
    """A limit must be a positive number, and only gated activations take one (``ValueError``)."""
    if swiglu_limit is None:
        return
    if isinstance(swiglu_limit, bool) or not isinstance(swiglu_limit, (int, float)) or not swiglu_limit > 0:
        raise ValueError(f"swiglu_limit must be a positive float or None, got {swiglu_limit!r}")
    if swiglu_limit != math.inf:  # float32's range (inf: no clamp; round 62: 1e40 failed inside torch at the forward)
        check_real("swiglu_limit", swiglu_limit, positive=True, float32=True)
    act = get_activation(activation)
    if not act.gated or not act.takes_limit:
        raise ValueError(f"swiglu_limit does not apply to activation={activation!r}")


def effective_limit(activation: str, swiglu_limit: float | None) -> float | None:
    """The clamp limit the activation uses: ``swiglu_limit``, else the activation's default (or None).
    Does not validate (see :func:`check_swiglu_limit`)."""
    if swiglu_limit is not None:
        return float(swiglu_limit)
    return get_activation(activation).default_limit


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch twins compute in: float32, float64 for float64 inputs (the reference dtype; round 63: it
    was computed in float32, 1e-7 apart from a float64 loop)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation_torch(h: torch.Tensor, activation: str, swiglu_limit: float | None = None) -> torch.Tensor:
    """Torch twin of the fused activation epilogue (clamp, then the registry's torch function).

    h: [N, 2I] (gated) or [N, I] (non-gated), any float dtype; computed in its float32 upcast (float64 in float64)
    returns: [N, I] float32 (float64 for float64 ``h``)
    """
    act = get_activation(activation)
    check_swiglu_limit(act.name, swiglu_limit)
    h = h.to(acc_dtype(h.dtype))
    if not act.gated:
        return act.torch_fn(h, None)
    inter = h.shape[-1] // 2
    return gated_activation(act, h[..., :inter], h[..., inter:], effective_limit(act.name, swiglu_limit))


def gated_activation(act: Activation, g: torch.Tensor, u: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``act(g, u)`` with the clamp semantics of the module docs, in the dtype of ``g``/``u`` (no checks)."""
    if limit is None:
        return act.torch_fn(g, u)
    u = u.clamp(min=-limit, max=limit)
    if act.clamp_gate_after:  # min(act(g), L) * u
        return act.torch_fn(g, torch.ones_like(g)).clamp(max=limit) * u
    return act.torch_fn(g.clamp(max=limit), u)
