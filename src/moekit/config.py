"""Frozen configuration of one MoE layer; every check raises ``ValueError``/``TypeError`` at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import FLOAT_DTYPES, check_int
from .ops.activation import Activation, get_activation


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and expert math of a layer (global sizes; the placement says what one rank keeps).

    num_experts: E real routed experts; num_zero_experts: Z identity experts;
    intermediate_size: I of a whole expert (before a tensor-parallel split).
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    has_bias: bool = False
    swiglu_limit: float | None = None
    apply_router_weight_on_input: bool = False
    num_zero_experts: int = 0
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("hidden_size", self.hidden_size, minimum=1)
        check_int("intermediate_size", self.intermediate_size, minimum=1)
        check_int("num_zero_experts", self.num_zero_experts, minimum=0)
        check_int("top_k", self.top_k, minimum=1, maximum=self.num_experts + self.num_zero_experts)
        object.__setattr__(self, "activation", get_activation(self.activation).name)
        if self.params_dtype not in FLOAT_DTYPES:
            raise TypeError(f"params_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {self.params_dtype}")
        if self.swiglu_limit is not None:
            if isinstance(self.swiglu_limit, bool) or not isinstance(self.swiglu_limit, (int, float)):
                raise TypeError(f"swiglu_limit must be a float or None, got {self.swiglu_limit!r}")
            if not self.swiglu_limit > 0:
                raise ValueError(f"swiglu_limit must be > 0, got {self.swiglu_limit}")
            if not (self.gated and self.act.takes_limit):
                raise ValueError(f"swiglu_limit does not apply to activation={self.activation!r}")
        if self.apply_router_weight_on_input and self.top_k != 1:
            raise ValueError(f"apply_router_weight_on_input=True requires top_k == 1, got top_k={self.top_k}")

    @property
    def act(self) -> Activation:
        """The activation's record in the registry (:mod:`moekit.ops.activation`)."""
        return get_activation(self.activation)

    @property
    def gated(self) -> bool:
        return self.act.gated

    def w13_rows(self, inter: int | None = None) -> int:
        """Rows of ``w13`` for an intermediate size (``2I`` gated, ``I`` for relu2)."""
        inter = self.intermediate_size if inter is None else inter
        return 2 * inter if self.gated else inter
