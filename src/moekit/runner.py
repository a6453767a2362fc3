"""MoERunner: the forward pass of one MoE layer, top to bottom (SPEC §1 "Forward order").

    x        = routed_input_transform(h)            if set, else h          [T, H]
    logits   = gate(x)  (gate(h) with gate_input="block")  if not given     [T, E + Z]
    routing  = router.route(x, logits)              weights [T, K] f32, ids [T, K] i32, zero [T, H]
    routed   = expert_executor(x, weights, ids) + zero      (local, or EP dispatch/combine + TP reduce)
    routed  *= routed_scaling_factor                (only when applied to the output)
    routed   = routed_output_transform(routed)      if set
    shared   = shared_experts(h) [* sigmoid(shared_expert_gate(h))]
    out      = routed + shared
    return final_output_transform(out)              if set (AXK1's post-MoE norm), else out

Everything the runner holds is a constructor argument (:func:`moekit.FusedMoE` builds them bottom-up).
"""

from __future__ import annotations

import math

import torch

from ._checks import FLOAT_DTYPES, check_float_dtype, check_tensor
from .config import MoEConfig
from .experts.executor import LocalExecutor
from .experts.mapping import load_layer_weights
from .experts.routed import RoutedExperts
from .parallel.rebalance import rebalance_layer
from .routing.base import BaseRouter

#: what the gate reads: the routed input (SPEC §1) or the layer's input
GATE_INPUTS = ("routed", "block")


def _first(out):
    """Modules such as vLLM's linear layers return ``(output, output_bias)``, the bias being None unless
    the layer skipped adding it (``skip_bias_add``): then it is added here, never dropped."""
    if not isinstance(out, (tuple, list)):
        return out
    if len(out) != 2 or (out[1] is not None and not isinstance(out[1], torch.Tensor)):
        raise TypeError(f"a module returned a {type(out).__name__} of {len(out)}; expected a tensor or (tensor, bias)")
    return out[0] if out[1] is None else out[0] + out[1]


class MoERunner(torch.nn.Module):
    """Owns ``router``, ``routed_experts`` and the ``expert_executor`` that runs them, and runs the layer.
    Build it with :func:`moekit.FusedMoE`.

    ``expert_executor``: an object with ``name``, ``experts`` and ``__call__(x, topk_weights,
    topk_ids) -> [T, H]`` (default :class:`~moekit.experts.executor.LocalExecutor` over
    ``routed_experts``; parallel layers get a :class:`~moekit.parallel.ParallelExecutor`).
    ``routed_scaling_factor`` is the output-side factor (1.0 when the router applies it).
    ``n_shared_experts`` is informational (shared experts run through ``shared_experts``);
    ``expert_mapping`` names the checkpoint entries :meth:`load_weights` accepts.
    ``gate_input``: what the gate reads when it computes the logits: ``"routed"`` (``x_routed``, SPEC §1)
    or ``"block"`` (the layer's input ``hidden_states``: Gemma 4, Muse Spark, Nemotron-H with a latent).
    ``final_output_transform``: applied to ``routed + shared`` (a module; None: nothing).
    """

    def __init__(
        self,
        layer_name: str,
        moe_config: MoEConfig,
        router: BaseRouter,
        routed_experts: RoutedExperts,
        enable_dbo: bool = False,
        gate: torch.nn.Module | None = None,
        shared_expert_gate: torch.nn.Module | None = None,
        shared_experts: torch.nn.Module | None = None,
        routed_input_transform: torch.nn.Module | None = None,
        routed_output_transform: torch.nn.Module | None = None,
        routed_scaling_factor: float = 1.0,
        router_logits_dtype: torch.dtype | None = None,
        *,
        expert_executor=None,
        n_shared_experts: int | None = None,
        expert_mapping: list[tuple[str, str, int, str]] | None = None,
        gate_input: str = "routed",
        final_output_transform: torch.nn.Module | None = None,
    ):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {list(GATE_INPUTS)}, got {gate_input!r}")
        if enable_dbo:
            raise NotImplementedError("enable_dbo=True (dual-batch overlap) is not supported")
        if shared_expert_gate is not None and shared_experts is None:
            raise ValueError("shared_expert_gate is set but shared_experts is None; the gate needs shared experts")
        self.layer_name, self.moe_config = layer_name, moe_config
        # the path of a forward, in order
        self.routed_input_transform = routed_input_transform
        self.gate = gate
        self.router = router
        self.routed_experts = routed_experts
        self.routed_output_transform = routed_output_transform
        self.shared_experts, self.shared_expert_gate = shared_experts, shared_expert_gate
        self.gate_input = gate_input
        self.final_output_transform = final_output_transform
        self.routed_scaling_factor = float(routed_scaling_factor)
        if not math.isfinite(self.routed_scaling_factor):
            raise ValueError(f"routed_scaling_factor must be finite, got {routed_scaling_factor!r}")
        self.router_logits_dtype = router_logits_dtype
        if expert_executor is None:
            expert_executor = LocalExecutor(routed_experts)
        elif expert_executor.experts is not routed_experts:
            raise ValueError("expert_executor must run this runner's routed_experts")
        self.expert_executor = expert_executor
        self.n_shared_experts = n_shared_experts
        self.expert_mapping = expert_mapping

    @property
    def backend(self) -> str:
        return self.routed_experts.backend

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [..., H_in] fp32/bf16/fp16; router_logits: [T, E + Z] any float or None;
        input_ids: [T] (hash routing). Returns [..., H_out] in the dtype of hidden_states."""
        self._check_hidden(hidden_states)
        lead = hidden_states.shape[:-1]
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        x = h if self.routed_input_transform is None else _first(self.routed_input_transform(h))
        self._check_routed_input(x)

        logits = self._logits(h if self.gate_input == "block" else x, router_logits)
        routing = self.router.route(x, logits, input_ids=input_ids)
        routed = self.expert_executor(x, routing.topk_weights, routing.topk_ids)
        if routing.zero_output is not None or self.routed_scaling_factor != 1.0:
            acc = routed.float()
            if routing.zero_output is not None:
                acc = acc + routing.zero_output.float()
            routed = (acc * self.routed_scaling_factor).to(routed.dtype)
        if self.routed_output_transform is not None:
            routed = _first(self.routed_output_transform(routed))

        if self.shared_experts is not None:
            shared = _first(self.shared_experts(h))
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(_first(self.shared_expert_gate(h))) * shared
            routed = routed + shared
        if self.final_output_transform is not None:
            routed = _first(self.final_output_transform(routed))
        # SPEC §1: the output has the dtype of hidden_states, whatever dtype user modules returned
        return routed.reshape(*lead, routed.shape[-1]).to(hidden_states.dtype)

    def _logits(self, x: torch.Tensor, router_logits: torch.Tensor | None) -> torch.Tensor:
        if router_logits is None:
            if self.gate is None:
                raise ValueError("router_logits is None and the layer has no gate; pass one or the other")
            router_logits = _first(self.gate(x))
        else:
            check_tensor("router_logits", router_logits)
            if router_logits.dim() != 2:
                router_logits = router_logits.reshape(-1, router_logits.shape[-1])
        if self.router_logits_dtype is not None:
            router_logits = router_logits.to(self.router_logits_dtype)
        return router_logits

    # -- checks -------------------------------------------------------------------------------
    def _check_hidden(self, hidden_states) -> None:
        check_tensor("hidden_states", hidden_states)
        check_float_dtype("hidden_states", hidden_states, FLOAT_DTYPES)
        if hidden_states.dim() < 1:
            raise ValueError("hidden_states must have shape [..., H], got a scalar")
        if self.routed_input_transform is None and hidden_states.shape[-1] != self.moe_config.hidden_size:
            raise ValueError(
                f"hidden_states must have shape [..., {self.moe_config.hidden_size}], got {list(hidden_states.shape)}"
            )

    def _check_routed_input(self, x: torch.Tensor) -> None:
        w = self.routed_experts.w13_weight
        if x.shape[-1] != self.moe_config.hidden_size:
            raise ValueError(
                f"the routed input must have width hidden_size={self.moe_config.hidden_size}, got {x.shape[-1]}"
            )
        if x.dtype != w.dtype:
            raise TypeError(
                f"hidden_states has dtype {x.dtype} but the expert weights are {w.dtype}; "
                "cast the input or build the layer with params_dtype matching it"
            )
        if x.device != w.device:
            raise ValueError(f"hidden_states is on {x.device} but the expert weights are on {w.device}")

    # -- weights ------------------------------------------------------------------------------
    def load_expert_weights(self, w13, w2, w13_bias=None, w2_bias=None) -> None:
        """Take the global ``[E, ...]`` tensors and keep this rank's share (see RoutedExperts)."""
        self.routed_experts.load_expert_weights(w13, w2, w13_bias, w2_bias)

    def load_weights(self, weights, *, fused_layout: str = "rows") -> set[str]:
        """Consume checkpoint ``(name, tensor)`` pairs through the expert-params mapping (SPEC §6);
        fused expert stacks are read in ``fused_layout`` (see :mod:`moekit.experts.layout`)."""
        return load_layer_weights(self, weights, fused_layout=fused_layout)

    def rebalance(self, **kwargs) -> dict:
        """EPLB: rebalance this layer's experts over its EP group (``enable_eplb=True`` layers; every
        rank calls it). Returns the imbalance before/after; see :func:`moekit.parallel.rebalance`."""
        return rebalance_layer(self, **kwargs)

    def extra_repr(self) -> str:
        c = self.moe_config
        return (
            f"layer_name={self.layer_name!r}, E={c.num_experts}, Z={c.num_zero_experts}, K={c.top_k}, "
            f"H={c.hidden_size}, I={c.intermediate_size}, activation={c.activation!r}, backend={self.backend!r}, "
            f"executor={self.expert_executor.name!r}"
        )
