"""The small modules of the transformers MoE blocks beyond router, experts and shared MLP (issue #13),
each equal to its transformers counterpart, and :func:`plan_modules` which builds a plan's set.

- :class:`RMSNorm`: ``norm(x) * (offset + w)`` in float32 (Llama / Gemma 4: offset 0; Muse Spark's
  centred norm: offset 1), or with ``scale_first`` ``norm((x * (offset + w)).to(dtype))`` (Muse Spark's
  input-scaled post-expert norm); ``with_scale=False``: no weight.
- :class:`ExpertRMSNorm`: Ergo's per-expert output norm, ``norm(x) * w[e]`` with a ``[E, H]`` weight.
- :class:`RMSNormGate`: Gemma 4's router logits, ``proj(norm(x) * scale * H^-0.5)``.
- :class:`OutputBias`: ``x + bias`` (JetMoE's routed output bias).
- :class:`Scale`: ``x * weight`` (Inkling's ``global_scale``).

Module kinds a :class:`~moekit.loading.plan.LayerPlan` names (``input_transform``, ``output_transform``,
``final_transform``, ``expert_output_norm``): ``"linear"`` (a latent projection; ``"linear_bias"`` with a bias,
Nemotron-H's ``mlp_bias=True``), ``"linear_centered_norm"``
(projection, then a centred RMSNorm), ``"rmsnorm"``, ``"scaled_rmsnorm"`` (input-scaled, offset 1),
``"expert_rmsnorm"`` (:class:`ExpertRMSNorm`, expert output norms only), ``"scale"``, ``"bias"``
(:class:`OutputBias`). The named routings with tensors (Gemma 4, Kolibri-1) live
in :mod:`moekit.loading.routings`.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """x [..., D] -> [..., D] dtype of x; see the module docs for the variants."""

    #: plain torch ops on its own weight: a layer's internal CUDA graphs may capture it
    _moekit_graph_safe = True

    def __init__(self, dim, eps=1e-6, *, offset=0.0, scale_first=False, with_scale=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.offset, self.scale_first = float(eps), float(offset), bool(scale_first)
        self.weight = torch.nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if with_scale else None

    def _norm(self, x):
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self._norm(x.float()).type_as(x)
        w = (self.offset + self.weight.float()) if self.offset else self.weight.float()
        if self.scale_first:
            return self._norm((x.float() * w).type_as(x).float()).type_as(x)
        return (self._norm(x.float()) * w).type_as(x)


class ExpertRMSNorm(RMSNorm):
    """Ergo's per-expert output norm: :class:`RMSNorm` with a weight row per expert, ``(norm(x) *
    weight[e]).to(dtype)`` in float32; rows [N, H], expert_ids [N] int64 (logical ids) -> [N, H] dtype of
    rows. The weight is float32 whatever the layer's dtype (transformers keeps Ergo's in float32)."""

    #: called as ``norm(rows, expert_ids)`` by :mod:`moekit.experts.output_norm`
    per_expert = True
    #: plain torch ops on its own weight: a layer's internal CUDA graphs may capture it
    _moekit_graph_safe = True

    def __init__(self, num_experts, dim, eps=1e-6, *, device=None, dtype=None):
        super().__init__(dim, eps, with_scale=False)
        self.weight = torch.nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return (self._norm(x.float()) * self.weight[expert_ids].float()).to(x.dtype)


class RMSNormGate(torch.nn.Module):
    """Gemma 4 router logits: x [T, H] -> [T, E] = proj(rmsnorm(x) * scale * H^-0.5)."""

    def __init__(self, hidden, num_experts, eps=1e-6, *, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.scale = torch.nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))
        self.proj = torch.nn.Linear(hidden, num_experts, bias=False, device=device, dtype=dtype)
        self.root = hidden**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x) * self.scale * self.root)


class OutputBias(torch.nn.Module):
    """``x [T, H] + bias [H]`` (JetMoE adds one bias to the routed sum)."""

    def __init__(self, hidden, *, device=None, dtype=None):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.empty(hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.to(x.dtype)


class Scale(torch.nn.Module):
    """x * weight (a learned scalar or vector)."""

    def __init__(self, shape=(1,), *, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

    def forward(self, x):
        return (x.float() * self.weight.float()).to(x.dtype)


def make_module(kind: str | None, d_in: int, d_out: int, eps: float, *, num_experts=None, device=None, dtype=None):
    """The module of a plan's transform kind (see the module docs); None for None."""
    kw = dict(device=device, dtype=dtype)
    if kind is None:
        return None
    if kind == "expert_rmsnorm":
        if num_experts is None:
            raise ValueError("the module kind 'expert_rmsnorm' is an expert output norm (it needs num_experts)")
        return ExpertRMSNorm(num_experts, d_out, eps, **kw)
    if kind in ("linear", "linear_bias"):
        return torch.nn.Linear(d_in, d_out, bias=kind == "linear_bias", **kw)
    if kind == "linear_centered_norm":
        return torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False, **kw), RMSNorm(d_out, eps, offset=1.0, **kw))
    if kind == "rmsnorm":
        return RMSNorm(d_out, eps, **kw)
    if kind == "scaled_rmsnorm":
        return RMSNorm(d_out, eps, offset=1.0, scale_first=True, **kw)
    if kind == "scale":
        return Scale(**kw)
    if kind == "bias":
        return OutputBias(d_out, **kw)
    raise ValueError(f"unknown module kind {kind!r}")


def plan_modules(plan, *, device=None, dtype=None) -> dict:
    """FusedMoE keywords for the plan's transforms and expert output norm."""
    h, hl, eps = plan.outer_hidden_size, plan.hidden_size, plan.norm_eps
    kw = dict(device=device, dtype=dtype)
    return dict(
        routed_input_transform=make_module(plan.input_transform, h, hl, eps, **kw),
        routed_output_transform=make_module(plan.output_transform, hl, h, eps, **kw),
        final_output_transform=make_module(plan.final_transform, h, h, eps, **kw),
        expert_output_norm=make_module(plan.expert_output_norm, hl, hl, plan.expert_norm_eps,
                                       num_experts=plan.num_experts, **kw),
    )

