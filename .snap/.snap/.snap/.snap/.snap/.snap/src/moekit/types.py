"""Shared types and the shape legend.

Shape legend used in every docstring of moekit:

- ``T``: tokens in the batch (leading dims of ``hidden_states`` flattened)
- ``H``: hidden size (the width the experts read and write)
- ``I``: expert intermediate size (per tensor-parallel shard)
- ``E``: real routed experts (global, logical); ``E_local`` those one rank holds
- ``Z``: zero (identity) experts of LongCat-Flash
- ``K``: experts per token (top-k)
- ``G``: expert groups of grouped top-k routing
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class RoutingMethodType(enum.IntEnum):
    """Routing families, as the seed names them (used by kernels to pick a fast path)."""

    Default = 0  # softmax -> top-k
    Renormalize = 1  # top-k -> softmax
    DeepSeekV3 = 2  # sigmoid -> bias -> grouped top-k
    Llama4 = 3  # top-1 -> sigmoid
    RenormalizeNaive = 4  # softmax -> top-k -> renormalise
    TopK = 5  # top-k only
    Custom = 6
    Simulated = 7
    Unspecified = 8


@dataclass(frozen=True)
class RoutingResult:
    """What a router hands the experts.

    topk_weights: [T, K] float32, already renormalised and scaled as configured.
    topk_ids: [T, K] int32 (or the router's ``indices_type``), ids of real experts only:
        zero-expert slots are rewritten to id 0 with weight 0.0.
    zero_scale: [T] float32, ``s[t] = Σ_{j: id_j >= E} w_j``, the zero slots' weight sum (slot order), or None when
        the router has no zero experts. The zero-expert contribution is ``x[t] · s[t]`` (:meth:`zero_contribution`);
        the runner adds it to the routed output inside its final rounding, never storing it as ``[T, H]``.
    """

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    zero_scale: torch.Tensor | None = None

    def __post_init__(self):
        s = self.zero_scale
        if s is not None and (not isinstance(s, torch.Tensor) or s.dim() != 1 or s.dtype != torch.float32):
            got = f"shape {list(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            old = ("; a [T, H] zero-expert output (zero_output, rounds <= 55) is no longer taken"
                   if isinstance(s, torch.Tensor) and s.dim() == 2 else "")
            raise ValueError(f"RoutingResult.zero_scale must be [T] float32 (the zero slots' weight sum), "
                             f"got {got}{old}")

    @property
    def zero_output(self):
        """Gone in round 56 (the ``[T, H]`` buffer): ``AttributeError`` naming what replaced it."""
        raise AttributeError("RoutingResult.zero_output (the [T, H] zero-expert output) was replaced in round 56 by "
                             "zero_scale ([T] float32) and zero_contribution(x) -> [T, H] float32")

    def zero_contribution(self, x: torch.Tensor) -> torch.Tensor | None:
        """The zero-expert contribution ``x[t] · s[t]``: [T, H] float32 (x: [T, H], the routed input), or None."""
        return None if self.zero_scale is None else x.float() * self.zero_scale.unsqueeze(-1)
