"""Small modules the checkpoint loaders attach to a MoE layer, and :func:`build_layer`.

- :class:`RouterLinear`: ``logits = x · Wᵀ (+ b)``, an ``nn.Linear`` that can run in float32 whatever
  the weight dtype (DeepSeek-V2/V3, GLM-4.5 and LongCat compute router logits in fp32); :func:`plan_gate` keeps its
  weight float32 where transformers does (:mod:`.archs.gate_dtypes`).
- :class:`SharedMLP`: ``scale · down(act(gate(x)) * up(x))``, optionally clamped like DeepSeek-V4
  (``gate <= L``, ``|up| <= L``); fused gate_up or non-gated (relu2) variants; optionally an RMSNorm on
  its output (Ergo).
- :func:`plan_gate`: a plan's gate module. More modules (norms, transforms, JetMoE's output bias) live in
  :mod:`.blocks`; the named custom routings (Llama 4, PhiMoE, DBRX, Gemma 4, Kolibri-1) in :mod:`.routings`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_choice
from ..experts.graphed import MODEL_GRAPH_TOKENS
from ..layer import FusedMoE
from ..ops.activation import effective_limit, gated_activation, get_activation
from ..ops.kernels import triton_unavailable_reason
from ..runner import MoERunner
from .blocks import RMSNorm, RMSNormGate, plan_modules
from .plan import LayerPlan
from .routings import llama4_routing, routing_function

__all__ = ["RouterLinear", "SharedMLP", "build_layer", "llama4_routing", "plan_gate"]


#: RouterLinear's backends
GATE_BACKENDS = ("torch", "triton")


class RouterLinear(torch.nn.Linear):
    """Router gate: ``logits = x · Wᵀ (+ b)``, x [..., H] -> [..., E + Z]; with ``fp32=True`` in float32
    (products and sums in float32, whatever the weight dtype); then ``logits *= logit_scale`` (Muse Spark) and
    ``logits = c·tanh(logits / c)`` with ``c = logit_softcap`` (Laguna), in float32, when set.

    ``backend``: ``"torch"`` (default: ``nn.Linear``, or ``F.linear`` of the float32-upcast operands when
    ``fp32``) or ``"triton"`` (:func:`moekit.ops.triton_gate.router_gate_triton`: one kernel, float32 sums
    rounded once to the output dtype, and **batch invariant**: a row's logits do not depend on the other rows
    (SPEC §9), so a layer's bucket graphs may hold the gate). :func:`build_layer` sets it to the layer's
    backend. The two agree within float32 summation order (and one rounding to the output dtype)."""

    #: may be captured in the layer's internal CUDA graph (:mod:`moekit.experts.graphed_plan`)
    _moekit_graph_safe = True

    def __init__(self, in_features, out_features, bias=False, *, fp32=False, logit_scale=None, logit_softcap=None,
                 backend: str = "torch", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp32 = bool(fp32)
        self.logit_scale, self.logit_softcap = logit_scale, logit_softcap
        self.backend = check_choice("backend", backend, GATE_BACKENDS)

    @property
    def batch_invariant(self) -> bool:
        """A row's logits are the same bits whatever else is in the batch (the Triton gate)."""
        return self.backend == "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            out = _triton_gate(x, self.weight, self.bias, self.fp32)
        elif self.fp32:
            b = None if self.bias is None else self.bias.float()
            out = F.linear(x.float(), self.weight.float(), b)
        else:
            out = super().forward(x)
        if self.logit_scale is not None:
            out = out.float() * self.logit_scale
        if self.logit_softcap is not None:
            out = self.logit_softcap * torch.tanh(out.float() / self.logit_softcap)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp32={self.fp32}, backend={self.backend!r}"


def _triton_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32: bool) -> torch.Tensor:
    """RouterLinear's Triton path: checks, then the kernel over ``x`` flattened to [T, H]."""
    if not x.is_cuda and (reason := triton_unavailable_reason(x.device)) is not None:
        raise ValueError(f"RouterLinear(backend='triton') cannot run on this input: {reason}; use backend='torch'")
    if not fp32 and x.dtype != weight.dtype:
        raise TypeError(f"RouterLinear: x has dtype {x.dtype} but the weight {weight.dtype} (fp32=False keeps one "
                        "dtype); cast x or build the gate with fp32=True")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"RouterLinear: x has width {x.shape[-1]}, the gate expects in_features={weight.shape[1]}")
    from ..ops.triton_gate import router_gate_triton

    out = router_gate_triton(x.reshape(-1, x.shape[-1]), weight, bias, torch.float32 if fp32 else x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


class SharedMLP(torch.nn.Module):
    """Shared expert, x [T, H] -> [T, H]. Gated activations: ``down(act(gate x, up x))`` with the
    registry's clamp semantics for ``swiglu_limit`` (:func:`moekit.ops.activation.gated_activation`);
    ``fused=True`` holds one ``gate_up_proj`` [2I, H] (gate rows, then up). Non-gated (relu2):
    ``down(act(up x))``. With ``norm_eps`` the output goes through ``norm`` (an :class:`RMSNorm` [H] with a
    float32 weight, Ergo's shared expert). The output is multiplied by ``scale`` (Cohere2-MoE's "average": 0.5).
    ``bias=True``: every linear has a bias (``gate x + b_g`` ...; Aria / Nemotron-H with ``mlp_bias=True``)."""

    #: may be captured in the layer's internal CUDA graph (:mod:`moekit.experts.graphed_plan`)
    _moekit_graph_safe = True

    def __init__(self, hidden, inter, activation="silu", swiglu_limit=None, *, fused=False, scale=1.0, norm_eps=None,
                 bias=False, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=bool(bias), device=device, dtype=dtype)
        self.act = get_activation(activation)
        self.activation, self.fused = self.act.name, bool(fused) and self.act.gated
        if self.fused:
            self.gate_up_proj = torch.nn.Linear(hidden, 2 * inter, **kw)
        elif self.act.gated:
            self.gate_proj = torch.nn.Linear(hidden, inter, **kw)
        self.up_proj = None if self.fused else torch.nn.Linear(hidden, inter, **kw)
        self.down_proj = torch.nn.Linear(inter, hidden, **kw)
        self.limit = effective_limit(self.activation, swiglu_limit) if self.act.gated else None
        self.scale = float(scale)
        # float32 weight whatever the dtype (transformers keeps Ergo's shared norm in float32)
        self.norm = RMSNorm(hidden, norm_eps, device=device, dtype=torch.float32) if norm_eps is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act.gated:
            out = self.down_proj(self.act.torch_fn(self.up_proj(x), None))
        else:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
            out = self.down_proj(gated_activation(self.act, g, u, self.limit))
        if self.norm is not None:
            out = self.norm(out)
        return out * self.scale if self.scale != 1.0 else out


def plan_gate(plan, *, device=None, dtype=None) -> torch.nn.Module:
    """The router gate of a plan: x [T, H_block or H] -> logits [T, E + Z]. Where transformers keeps the gate's
    weight in float32 for the load dtype ``dtype`` (``plan.gate_fp32_dtypes``, DeepSeek-V3 in bfloat16...) the weight
    is float32; those plans compute the gate in float32 (``router_fp32``, set with the table)."""
    width = plan.outer_hidden_size if plan.gate_input == "block" else plan.hidden_size
    e_all = plan.num_experts + plan.num_zero_experts
    if plan.gate_kind == "rmsnorm":
        return RMSNormGate(width, e_all, plan.norm_eps, device=device, dtype=dtype)
    wdtype = plan.gate_dtype(dtype or torch.get_default_dtype())
    return RouterLinear(width, e_all, bias=plan.router_bias, fp32=plan.router_fp32, logit_scale=plan.logit_scale,
                        logit_softcap=plan.logit_softcap, device=device, dtype=wdtype)


def _is_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def build_layer(
    plan: LayerPlan,
    *,
    device=None,
    dtype=None,
    backend: str = "auto",
    tensors=None,
    routed_experts_cls=None,
    module_device=None,
    quant_config=None,
    graph_pool=None,
    eager_graph_tokens: int | None = None,
    parallel: dict | None = None,
) -> MoERunner:
    """A moekit layer for ``plan``; ``tensors`` holds the construction-time router tensors
    (``router.e_score_correction_bias`` [E + Z] float, ``router.hash_indices_table`` [vocab, K] int).
    The small modules (gate, shared experts, transforms, routing module) are built on ``module_device``
    (default ``device``; :func:`moekit.integrations.transformers.patch` builds them on "meta" and
    adopts a transformers block's own tensors). ``quant_config``: the routed experts' format (None: full
    precision in ``dtype``). A :class:`RouterLinear` gate gets the layer's backend. ``graph_pool``: the
    :class:`~moekit.experts.graphed.GraphPool` a model's layers share; with it (or an explicit
    ``eager_graph_tokens``) the layer's graph limit is ``eager_graph_tokens``, default
    :data:`~moekit.experts.graphed.MODEL_GRAPH_TOKENS` (2048). ``parallel``: :func:`moekit.FusedMoE`'s parallel
    keywords (``ep_group``, ``tp_group``, ``expert_placement_strategy``, ``enable_eplb``, ``num_redundant_experts``).

    Weights are allocated but not loaded (see :func:`moekit.experts.mapping.load_layer_weights`, with
    ``fused_layout=plan.fused_layout``); the layer carries nothing of the plan.
    """
    tensors = tensors or {}
    dtype = dtype or torch.get_default_dtype()
    # Built on meta, then given memory without an initialiser (round 67: the initialisers drew from the caller's
    # random stream, and cost ~0.5 s a DeepSeek-V3 shared expert on CPU): the loader refuses a layer any of whose
    # parameters the checkpoint did not give (``_LayerLoad.missing``)
    home = module_device if module_device is not None else device
    mkw = dict(device=home if _is_meta(home) else "meta", dtype=dtype)
    bias = tensors.get("router.e_score_correction_bias")
    if plan.has_score_bias and bias is None:
        raise ValueError(f"{plan.name}: router.e_score_correction_bias is needed to build the layer")
    if plan.zero_score_bias:
        bias = torch.zeros(plan.num_experts)
    if bias is not None:
        bias = bias.to(device=device, dtype=torch.float32)
    table = tensors.get("router.hash_indices_table")
    if plan.hash_routing:
        if table is None:
            raise ValueError(f"{plan.name}: router.hash_indices_table (tid2eid) is needed for hash routing")
        table = table.to(device=device, dtype=torch.int64)
    shared_experts = shared_expert_gate = None
    small = dict(gate=plan_gate(plan, **mkw), **plan_modules(plan, **mkw))
    if plan.shared_intermediate_size:
        shared_experts = SharedMLP(plan.outer_hidden_size, plan.shared_intermediate_size, plan.shared_activation,
                                   plan.shared_swiglu_limit, fused=plan.shared_fused, scale=plan.shared_scale,
                                   norm_eps=plan.norm_eps if plan.shared_output_norm else None,
                                   bias=plan.shared_bias, **mkw)
    if plan.shared_expert_gate:
        shared_expert_gate = torch.nn.Linear(plan.outer_hidden_size, 1, bias=False, **mkw)
    small.update(shared_experts=shared_experts, shared_expert_gate=shared_expert_gate)
    if not _is_meta(home):
        at = torch.empty(0, device=home).device  # (None: the default device)
        small = {k: m.to_empty(device=at) if m is not None else None for k, m in small.items()}
    layer = FusedMoE(
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
        custom_routing_function=routing_function(plan, device=device, dtype=dtype),  # tiny: never on meta
        scoring_func=plan.scoring_func,
        routed_scaling_factor=plan.routed_scaling_factor,
        swiglu_limit=plan.swiglu_limit,
        e_score_correction_bias=bias,
        apply_router_weight_on_input=plan.apply_router_weight_on_input,
        activation=plan.activation,
        has_bias=plan.has_bias,
        apply_routed_scale_to_output=plan.apply_routed_scale_to_output,
        zero_expert_type="identity" if plan.num_zero_experts else None,
        hash_indices_table=table,
        device=device,
        backend=backend,
        routed_experts_cls=routed_experts_cls,
        quant_config=quant_config,
        gate_input=plan.gate_input,
        routed_shared_experts=plan.routed_shared_experts,
        **small,
        **({"runner_args": {"graph_pool": graph_pool}} if graph_pool is not None else {}),
        **(parallel or {}),
    )
    if isinstance(layer.gate, RouterLinear):  # the gate runs on the layer's backend (Triton: batch invariant)
        layer.gate.backend = layer.backend
    if graph_pool is not None or eager_graph_tokens is not None:  # a model's layers: its buckets
        layer.eager_graph_tokens = MODEL_GRAPH_TOKENS if eager_graph_tokens is None else eager_graph_tokens
    return layer
