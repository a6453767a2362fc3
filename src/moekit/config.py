"""Frozen configuration of one MoE layer; every check raises ``ValueError``/``TypeError`` at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import FLOAT_DTYPES, check_bool, check_int, check_real
from .ops.activation import Activation, check_swiglu_limit, get_activation
from .ops.formats import WeightFormat
from .ops.quant_config import parse_quant_config


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and expert math of a layer (global sizes; the placement says what one rank keeps).

    Built by :func:`moekit.FusedMoE`; frozen, and every field is checked at construction.

    num_experts: ``E`` real routed experts (>= 1).
    top_k: ``K`` experts per token, ``1 <= K <= E + Z``.
    hidden_size: ``H``.
    intermediate_size: ``I`` of a whole expert (before a tensor-parallel split).
    activation: a name of ``moekit.ACTIVATIONS`` (or an alias); stored as the canonical name.
    has_bias: the experts have ``w13``/``w2`` biases.
    swiglu_limit: clamp limit of gated activations (None: no clamp; swigluoai's default 7.0).
    apply_router_weight_on_input: the routing weight scales the expert input (needs ``K == 1``).
    num_zero_experts: ``Z`` identity experts (LongCat-Flash).
    params_dtype: dtype of the expert weights.
    quant_config: None (weights in ``params_dtype``), an HF ``quantization_config`` dict or a format
    object; stored as the parsed format object (:mod:`moekit.ops.formats`) and checked against the
    global sizes here (a tensor-parallel slice is checked by the experts).
    routed_scaling_factor: finite float > 0 (round 51: a negative or zero factor flipped or erased the routed output
    silently); applied once, on the routing weights (the router's) or, with
    ``apply_routed_scale_to_output=True``, on the routed output (the runner reads it from here: this
    config is the one store of the output-side factor, see :attr:`output_scale`).
    Booleans must be real ``bool`` values (``"no"`` raises ``TypeError`` instead of meaning True).
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
    quant_config: WeightFormat | None = None
    routed_scaling_factor: float = 1.0
    apply_routed_scale_to_output: bool = False

    def __post_init__(self):
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("hidden_size", self.hidden_size, minimum=1)
        check_int("intermediate_size", self.intermediate_size, minimum=1)
        check_int("num_zero_experts", self.num_zero_experts, minimum=0)
        check_int("top_k", self.top_k, minimum=1, maximum=self.num_experts + self.num_zero_experts)
        for name in ("has_bias", "apply_router_weight_on_input", "apply_routed_scale_to_output"):
            check_bool(name, getattr(self, name))
        # the one check (as TopKSpec's)
        scale = check_real("routed_scaling_factor", self.routed_scaling_factor, positive=True, float32=True)
        object.__setattr__(self, "routed_scaling_factor", scale)
        object.__setattr__(self, "activation", get_activation(self.activation).name)
        if self.params_dtype not in FLOAT_DTYPES:
            raise TypeError(f"params_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {self.params_dtype}")
        if self.swiglu_limit is not None:
            if isinstance(self.swiglu_limit, bool) or not isinstance(self.swiglu_limit, (int, float)):
                raise TypeError(f"swiglu_limit must be a float or None, got {self.swiglu_limit!r}")
            check_swiglu_limit(self.activation, self.swiglu_limit)  # (> 0, float32's range, a gated activation)
        if self.apply_router_weight_on_input and self.top_k != 1:
            raise ValueError(f"apply_router_weight_on_input=True requires top_k == 1, got top_k={self.top_k}")
        fmt = parse_quant_config(self.quant_config)
        object.__setattr__(self, "quant_config", fmt)
        if fmt is not None:
            fmt.validate(self.num_experts, self.intermediate_size, self.hidden_size, self.gated)

    @property
    def output_scale(self) -> float:
        """The factor the runner multiplies the routed output by (1.0 when the router applies it)."""
        return self.routed_scaling_factor if self.apply_routed_scale_to_output else 1.0

    @property
    def router_scale(self) -> float:
        """The factor the router multiplies the weights by (1.0 when it is applied to the output)."""
        return 1.0 if self.apply_routed_scale_to_output else self.routed_scaling_factor

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
