"""ZeroExpertRouter (LongCat-Flash): bias-corrected top-k over ``E + Z`` experts, ``Z`` of them identity."""

from __future__ import annotations


import torch

from .._checks import check_choice, check_int
from ..ops.kernels import Kernels
from ..ops.zero_experts import ZERO_EXPERT_TYPES
from ..types import RoutingResult
from .base import IndicesTypeGetter, ScoredRouter
from .zero_output import swap_zero_output, swap_zero_output_eagerly


class ZeroExpertRouter(ScoredRouter):
    """``ids = topk(s + bias, K)``, ``w = s[ids]`` over all ``E + Z`` columns (``s = scores(logits)``,
    renormalised if asked, scaled), then ``s[t] = Σ_{j: ids[t, j] >= E} w[t, j]`` (float32) and the zero slots
    rewritten to ``id 0, weight 0.0`` before any expert kernel sees them. ``s`` is returned in the
    :class:`~moekit.types.RoutingResult` (the contribution is ``x[t] · s[t]``, added by the runner's final rounding);
    ``zero_expert_output`` (read-and-clear, ``[T, H]``) keeps the seed's API.

    top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels: see :class:`BaseRouter`.
    e_score_correction_bias: [E + Z] float, finite, required; ``Z = len(bias) - num_logical_experts``.
    num_logical_experts: ``E``, the real experts (default ``global_num_experts``).
    zero_expert_type: "identity". scoring_func: "softmax" | "sigmoid" | "sqrtsoftplus".
    renormalize: bool (default False). routed_scaling_factor: finite float > 0, applied after renormalisation.
    ``router_logits`` must have ``E + Z`` columns.
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None,
                 e_score_correction_bias: torch.Tensor | None = None, num_logical_experts: int | None = None,
                 zero_expert_type: str = "identity", scoring_func: str = "softmax", renormalize: bool = False,
                 routed_scaling_factor: float = 1.0, enable_eplb: bool = False,
                 indices_type_getter: IndicesTypeGetter | None = None, *, kernels: Kernels | None = None):
        check_choice("zero_expert_type", zero_expert_type, ZERO_EXPERT_TYPES)
        check_int("global_num_experts", global_num_experts, minimum=1)
        real = global_num_experts if num_logical_experts is None else num_logical_experts
        check_int("num_logical_experts", real, minimum=1)
        if real > global_num_experts:  # (round 63: ids in [global, logical) came back as experts past E)
            raise ValueError(f"num_logical_experts={real} exceeds global_num_experts={global_num_experts}: the real "
                             f"experts are at most the layer's E")
        if not isinstance(e_score_correction_bias, torch.Tensor) or e_score_correction_bias.dim() != 1 or \
                e_score_correction_bias.shape[0] < real:
            shape = list(e_score_correction_bias.shape) if isinstance(e_score_correction_bias, torch.Tensor) else None
            raise ValueError(f"ZeroExpertRouter requires e_score_correction_bias of shape [E + Z] with E={real}, "
                             f"got {shape}")
        total = e_score_correction_bias.shape[0]
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels,
                         scoring_func=scoring_func, renormalize=renormalize,
                         routed_scaling_factor=routed_scaling_factor, e_score_correction_bias=e_score_correction_bias,
                         num_columns=total)
        self.num_logical_experts = real
        self.num_zero_experts = total - real
        self.num_logit_columns = total
        self.zero_expert_type = zero_expert_type

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        w, ids = self._scored_route(router_logits, indices_type)
        # only s [T] float32: the runner rounds routed + x·s once (SPEC §3: exact zero-expert output); one launch on
        # the Triton table (ops.triton_zero), the same bits as the torch twin
        w, ids, s = self.kernels.zero_slots(w, ids, self.num_logical_experts)
        return RoutingResult(w, ids, s)

    @property
    def zero_expert_output(self) -> torch.Tensor | None:
        """The zero-expert output [T, H] (dtype of ``hidden_states``) of this thread's last ``select_experts``
        call, then None: reading clears it (the seed's contract; per thread since round 49: two threads routing
        through one router read each other's). The layer's forward does not use or set it (its routing returns
        the zero slots' weight sum in the :class:`~moekit.types.RoutingResult`). Under ``torch.compile`` the set and
        the read each run eagerly (a graph break: ``fullgraph=True`` refuses them)."""
        return (swap_zero_output_eagerly if torch.compiler.is_compiling() else swap_zero_output)(self, None)
