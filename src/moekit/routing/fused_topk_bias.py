"""FusedTopKBiasRouter: the bias picks, the unbiased scores weigh; or hash routing (DeepSeek-V4)."""

from __future__ import annotations

import torch

from ..ops.kernels import Kernels
from ..ops.routing import check_hash_table, check_input_ids
from ..types import RoutingResult
from .base import IndicesTypeGetter, ScoredRouter, check_not_meta


class FusedTopKBiasRouter(ScoredRouter):
    """``s = scores(logits [T, E])``; ``ids = topk(s + bias, K)`` (ties -> lower id); ``w = s[ids]``
    (unbiased); ``w /= Σw`` if ``renormalize``; ``w *= routed_scaling_factor``. Hash routing (with
    ``hash_indices_table``): ``ids = hash_indices_table[input_ids]``, weights as above, bias unused.

    top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels: see :class:`BaseRouter`.
    e_score_correction_bias: [E] float, finite; the selection bias.
    scoring_func: "softmax" | "sigmoid" | "sqrtsoftplus". renormalize: bool (default True).
    routed_scaling_factor: finite float > 0, applied after renormalisation.
    hash_indices_table: [vocab, K] int, ids in ``[0, E)``; ``select_experts`` then needs ``input_ids [T]``.
    One of ``e_score_correction_bias`` and ``hash_indices_table`` is required.
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None,
                 e_score_correction_bias: torch.Tensor | None = None, scoring_func: str = "softmax",
                 renormalize: bool = True, routed_scaling_factor: float = 1.0, enable_eplb: bool = False,
                 indices_type_getter: IndicesTypeGetter | None = None,
                 hash_indices_table: torch.Tensor | None = None, *, kernels: Kernels | None = None):
        if e_score_correction_bias is None and hash_indices_table is None:
            raise ValueError("FusedTopKBiasRouter needs e_score_correction_bias or hash_indices_table, got neither")
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels,
                         scoring_func=scoring_func, renormalize=renormalize,
                         routed_scaling_factor=routed_scaling_factor, e_score_correction_bias=e_score_correction_bias)
        if hash_indices_table is not None:
            check_hash_table(hash_indices_table, global_num_experts, top_k)
        self.register_buffer("hash_indices_table", hash_indices_table)  # in state_dict (round 48)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # a state dict's hash table is checked as the constructor's (round 53: ids out of range loaded silently, then
        # raised torch's IndexError on the reference path and added nothing on the Triton one); other shapes: torch's
        table = state_dict.get(prefix + "hash_indices_table")
        mine = self.hash_indices_table
        if isinstance(table, torch.Tensor) and mine is not None and table.shape == mine.shape:
            check_hash_table(table, self.global_num_experts, self.top_k)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def capturable(self) -> bool:
        """Hash routing checks ``input_ids`` on the host (eagerly): never captured by the layer."""
        return self.hash_indices_table is None and super().capturable

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        if self.hash_indices_table is None:
            return super()._compute_routing(hidden_states, router_logits, indices_type, input_ids)
        if self.hash_indices_table.is_meta and not router_logits.is_meta:  # (never loaded: round 69)
            check_not_meta(self)
        ids = check_input_ids(input_ids, self.hash_indices_table, router_logits.shape[0])  # the range: the table's
        return RoutingResult(*self.kernels.hash_route(router_logits, self.hash_indices_table, ids, self.spec,
                                                      indices_type))
