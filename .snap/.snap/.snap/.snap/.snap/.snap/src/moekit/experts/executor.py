"""The local expert executor: run this process's experts on the routed tokens, no communication.

    out [T, H] dtype = experts(x [T, H] dtype, topk_weights [T, K] f32, topk_ids [T, K] int32)

An executor is what :class:`~moekit.runner.MoERunner` calls between routing and the combine of the
shared experts. Every executor has this interface: ``name``, ``experts`` (the
:class:`~moekit.experts.routed.RoutedExperts` it runs) and ``__call__(x, topk_weights, topk_ids)``.
The other one is :class:`moekit.parallel.ParallelExecutor` (expert/tensor parallel dispatch and combine).
"""

from __future__ import annotations

import torch

from .routed import RoutedExperts


class LocalExecutor:
    """Runs every routed slot on the experts of this process (they hold every expert)."""

    name = "local"

    def __init__(self, experts: RoutedExperts):
        self.experts = experts

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.experts(x, topk_weights, topk_ids)

    def __repr__(self) -> str:
        return f"LocalExecutor({self.experts.layer_name!r})"
