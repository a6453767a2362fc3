"""Small modules the checkpoint loaders attach to a MoE layer, and :func:`build_layer`.

- :class:`RouterLinear`: ``logits = x · Wᵀ (+ b)``, an ``nn.Linear`` that can run in float32 whatever
  the weight dtype (DeepSeek-V2/V3, GLM-4.5 and LongCat compute router logits in fp32).
- :class:`SharedMLP`: ``scale · down(act(gate(x)) * up(x))``, optionally clamped like DeepSeek-V4
  (``gate <= L``, ``|up| <= L``).
- :class:`OutputBias`: ``x + bias`` (JetMoE adds one ``[H]`` bias to the routed sum).
- named custom routings (Llama 4, PhiMoE, DBRX): :mod:`moekit.loading.routings`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layer import FusedMoE
from ..ops.activation import get_activation
from ..runner import MoERunner
from .plan import LayerPlan
from .routings import llama4_routing, routing_function

__all__ = ["RouterLinear", "SharedMLP", "OutputBias", "build_layer", "llama4_routing"]

class RouterLinear(torch.nn.Linear):
    """Router gate: x [T, H] -> logits [T, E + Z]; with ``fp32=True`` computed in float32."""

    def __init__(self, in_features, out_features, bias=False, *, fp32=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp32 = bool(fp32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            b = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), b)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp32={self.fp32}"


class SharedMLP(torch.nn.Module):
    """Shared expert: out [T, H] = scale · down(act(min(gate x, L)) * clamp(up x, -L, L)); L only when set."""

    def __init__(self, hidden, inter, activation="silu", swiglu_limit=None, *, scale=1.0, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden, inter, **kw)
        self.up_proj = torch.nn.Linear(hidden, inter, **kw)
        self.down_proj = torch.nn.Linear(inter, hidden, **kw)
        self.act = get_activation(activation)
        if not self.act.gated:
            raise ValueError(f"shared expert activation must be a gated one, got {activation!r}")
        self.activation = self.act.name
        self.limit = swiglu_limit
        self.scale = float(scale)

    @classmethod
    def around(cls, mlp: torch.nn.Module, activation="silu", *, scale=1.0) -> "SharedMLP":
        """A SharedMLP using ``mlp``'s own ``gate_proj``/``up_proj``/``down_proj`` modules (no copy)."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act = get_activation(activation)
        self.activation, self.limit, self.scale = self.act.name, None, float(scale)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None:
            g = g.clamp(max=self.limit)
            u = u.clamp(min=-self.limit, max=self.limit)
        out = self.down_proj(self.act.torch_fn(g, u))
        return out * self.scale if self.scale != 1.0 else out


class OutputBias(torch.nn.Module):
    """``x [T, H] + bias [H]`` (a routed output transform)."""

    def __init__(self, hidden, *, device=None, dtype=None):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.to(x.dtype)


def build_layer(
    plan: LayerPlan,
    *,
    device=None,
    dtype=None,
    backend: str = "auto",
    tensors=None,
    routed_experts_cls=None,
    gate: torch.nn.Module | None = None,
    shared_experts: torch.nn.Module | None = None,
    shared_expert_gate: torch.nn.Module | None = None,
    output_bias: torch.nn.Module | None = None,
) -> MoERunner:
    """A moekit layer for ``plan``; ``tensors`` holds the construction-time router tensors
    (``router.e_score_correction_bias`` [E + Z] float, ``router.hash_indices_table`` [vocab, K] int).
    ``gate``, ``shared_experts``, ``shared_expert_gate`` and ``output_bias`` replace the modules built here
    (a model's own).

    Weights are allocated but not loaded (see :func:`moekit.experts.mapping.load_layer_weights`, with
    ``fused_layout=plan.fused_layout``); the layer carries nothing of the plan.
    """
    tensors = tensors or {}
    dtype = dtype or torch.get_default_dtype()
    bias = tensors.get("router.e_score_correction_bias")
    if plan.has_score_bias and bias is None:
        raise ValueError(f"{plan.name}: router.e_score_correction_bias is needed to build the layer")
    if bias is not None:
        bias = bias.to(device=device, dtype=torch.float32)
    table = tensors.get("router.hash_indices_table")
    if plan.hash_routing:
        if table is None:
            raise ValueError(f"{plan.name}: router.hash_indices_table (tid2eid) is needed for hash routing")
        table = table.to(device=device, dtype=torch.int64)
    e_all = plan.num_experts + plan.num_zero_experts
    if gate is None:
        gate = RouterLinear(plan.hidden_size, e_all, bias=plan.router_bias, fp32=plan.router_fp32, device=device,
                            dtype=dtype)
    if shared_experts is None and plan.shared_intermediate_size:
        shared_experts = SharedMLP(
            plan.hidden_size,
            plan.shared_intermediate_size,
            plan.shared_activation,
            plan.shared_swiglu_limit,
            scale=plan.shared_scale,
            device=device,
            dtype=dtype,
        )
    if output_bias is None and plan.output_bias:
        output_bias = OutputBias(plan.hidden_size, device=device, dtype=dtype)
    if shared_expert_gate is None and plan.shared_expert_gate:
        shared_expert_gate = torch.nn.Linear(plan.hidden_size, 1, bias=False, device=device, dtype=dtype)
    return FusedMoE(
        plan.num_experts,
        plan.top_k,
        plan.hidden_size,
        plan.intermediate_size,
        params_dtype=dtype,
        renormalize=plan.renormalize,
        use_grouped_topk=plan.num_expert_group is not None,
        num_expert_group=plan.num_expert_group,
        topk_group=plan.topk_group,
        prefix=plan.name,
        custom_routing_function=routing_function(plan),
        scoring_func=plan.scoring_func,
        routed_scaling_factor=plan.routed_scaling_factor,
        swiglu_limit=plan.swiglu_limit,
        e_score_correction_bias=bias,
        apply_router_weight_on_input=plan.apply_router_weight_on_input,
        activation=plan.activation,
        has_bias=plan.has_bias,
        gate=gate,
        shared_experts=shared_experts,
        shared_expert_gate=shared_expert_gate,
        routed_output_transform=output_bias if plan.output_bias else None,
        zero_expert_type="identity" if plan.num_zero_experts else None,
        hash_indices_table=table,
        device=device,
        backend=backend,
        routed_experts_cls=routed_experts_cls,
    )
