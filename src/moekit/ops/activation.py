"""Expert activations: ``act([g | u]) -> [*, I]`` for gated ones, ``act(h) -> [*, I]`` for relu2.

With ``h = w13 · x + b13``:

- ``silu``       : ``silu(g) * u``
- ``gelu``       : ``gelu(g) * u`` (exact erf gelu)
- ``gelu_tanh``  : ``gelu_tanh(g) * u``
- ``swigluoai``  : ``(u + 1) * g * sigmoid(1.702 * g)`` with ``g = min(g, L)``, ``u = clamp(u, -L, L)``,
  ``L = swiglu_limit`` (default 7.0)
- ``relu2``      : ``relu(h) ** 2`` (non-gated; ``w13`` has ``I`` rows)

For the gated ones other than swigluoai a ``swiglu_limit`` clamps the same way before the activation
(DeepSeek-V4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")
NON_GATED_ACTIVATIONS = ("relu2",)
ACTIVATIONS = GATED_ACTIVATIONS + NON_GATED_ACTIVATIONS
ACTIVATION_ALIASES = {"relu2_no_mul": "relu2", "swiglu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_DEFAULT_LIMIT = 7.0


def canonical_activation(name) -> str:
    """Return the canonical activation name, or raise ``ValueError`` listing the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        valid = list(ACTIVATIONS) + list(ACTIVATION_ALIASES)
        raise ValueError(f"activation must be one of {valid}, got {name!r}")
    return name


def is_gated(activation: str) -> bool:
    return canonical_activation(activation) in GATED_ACTIVATIONS


def effective_limit(activation: str, swiglu_limit: float | None) -> float | None:
    """The clamp limit the activation uses (swigluoai defaults to 7.0; others clamp only when set).

    A limit must be a positive number, and only gated activations take one (``ValueError`` otherwise)."""
    if swiglu_limit is not None:
        if isinstance(swiglu_limit, bool) or not isinstance(swiglu_limit, (int, float)) or not swiglu_limit > 0:
            raise ValueError(f"swiglu_limit must be a positive float or None, got {swiglu_limit!r}")
        if not is_gated(activation):
            raise ValueError(f"swiglu_limit applies to gated activations, not activation={activation!r}")
    if canonical_activation(activation) == "swigluoai":
        return SWIGLUOAI_DEFAULT_LIMIT if swiglu_limit is None else float(swiglu_limit)
    return None if swiglu_limit is None else float(swiglu_limit)


def apply_activation_torch(h: torch.Tensor, activation: str, swiglu_limit: float | None = None) -> torch.Tensor:
    """Torch twin of every fused activation epilogue.

    h: [N, 2I] (gated) or [N, I] (relu2), any float dtype; computed in that dtype's float32 upcast
    returns: [N, I] float32
    """
    act = canonical_activation(activation)
    limit = effective_limit(act, swiglu_limit)  # validates swiglu_limit for every activation
    h = h.float()
    if act == "relu2":
        return torch.relu(h).square()
    inter = h.shape[-1] // 2
    g, u = h[..., :inter], h[..., inter:]
    if limit is not None:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    if act == "silu":
        return F.silu(g) * u
    if act == "gelu":
        return F.gelu(g) * u
    if act == "gelu_tanh":
        return F.gelu(g, approximate="tanh") * u
    # swigluoai
    return (u + 1.0) * g * torch.sigmoid(SWIGLUOAI_ALPHA * g)
