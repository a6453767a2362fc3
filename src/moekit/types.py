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
    zero_output: [T, H] float32, the zero-expert contribution (rounded once, with the routed output,
        by the runner), or None when the router has no zero experts.
    """

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    zero_output: torch.Tensor | None = None
