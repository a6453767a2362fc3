"""What the runner checks of the modules it calls (shapes only: no host synchronisation), so nothing is
silently broadcast: a module's returned tensor (or vLLM-style ``(output, bias)`` pair), and a gate
``nn.Linear``'s sizes at construction. See :mod:`moekit.runner` for the shapes each module must return."""

from __future__ import annotations

import torch


def first_output(out):
    """Modules such as vLLM's linear layers return ``(output, output_bias)``, the bias being None unless
    the layer skipped adding it (``skip_bias_add``): then it is added here, never dropped."""
    if not isinstance(out, (tuple, list)):
        return out
    if len(out) != 2 or (out[1] is not None and not isinstance(out[1], torch.Tensor)):
        raise TypeError(f"a module returned a {type(out).__name__} of {len(out)}; expected a tensor or (tensor, bias)")
    return out[0] if out[1] is None else out[0] + out[1]


def returned(name: str, out, num_tokens: int, widths: tuple[int, ...]) -> torch.Tensor:
    """The tensor a user module returned, checked to be ``[num_tokens, w]`` for a ``w`` in ``widths``
    (shapes only): ``ValueError`` naming the module, the shape got and the shape expected."""
    out = first_output(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} returned a {type(out).__name__}; expected a torch.Tensor")
    if out.dim() != 2 or out.shape[0] != num_tokens or out.shape[1] not in widths:
        expected = " or ".join(f"[{num_tokens}, {w}]" for w in widths)
        raise ValueError(f"{name} returned shape {list(out.shape)}; expected {expected} (T = {num_tokens} tokens)")
    return out


def check_gate_linear(gate, hidden_size: int, columns: int) -> None:
    """A ``gate`` that is an ``nn.Linear`` reads the routed input (``hidden_size`` wide) and writes one
    logit per routed column (``E + Z``); checked at construction."""
    if not isinstance(gate, torch.nn.Linear):
        return
    if gate.in_features != hidden_size or gate.out_features != columns:
        raise ValueError(
            f"gate is an nn.Linear({gate.in_features}, {gate.out_features}); expected in_features = hidden_size "
            f"({hidden_size}) and out_features = E + Z ({columns})"
        )
