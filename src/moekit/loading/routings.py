"""Named custom routings (``LayerPlan.custom_routing``): transformers routers that no standard moekit
router reproduces, as ``custom_routing_function``s (SPEC §2, ``CustomRoutingRouter``).

Each is ``fn(hidden_states [T, H], gating_output [T, E], topk, renormalize) -> (weights [T, K] float32,
ids [T, K] int32)`` and mirrors the transformers code it names, in eval mode (training-time jitter and
sampling are not reproduced).

- ``"llama4"``: ``ids = topk(logits)``, ``w = sigmoid(logits[ids])`` (the weight scales the input).
- ``"phimoe"`` (arg: ``router_jitter_noise``): PhiMoE's sparsemixer, always top-2.
- ``"pnorm"`` (arg: ``p``): DBRX, ``softmax`` -> top-k -> ``w / ||w||_p``.
- ``"expert_scale"``: Gemma 4, softmax top-k (renormalised) times ``per_expert_scale[id]`` (a module
  holding that tensor, :class:`ExpertScaleRouting`).
- ``"logit_bias"``: Kolibri-1, ``ids = topk(logits + bias)``, ``w = sigmoid(logits[ids])``
  (:class:`LogitBiasRouting`, holding the bias).
- ``"sigmoid_bias_eps"`` / ``"sigmoid_eps"`` (arg: ``eps``): LFM2-MoE, ``s = sigmoid(logits)``, ``ids = topk(s
  (+ bias))``, ``w = s[ids] / (Σ s[ids] + eps)`` (:class:`SigmoidEpsRouting`; transformers adds 1e-6 to the sum,
  which moekit's standard routers, ``w / Σw`` as SPEC §2 says, do not).

All are graph-safe (``_moekit_graph_safe``: torch ops on the device only), so a Triton layer captures them
in its exact-``T`` internal CUDA graphs (eager calls of ``T <= 8``).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..ops.routing import compute_scores, topk_lowest_id
from ..routing.base import keep_bias_dtype
from .plan import LayerPlan


def _graph_safe(fn):
    """Mark a routing as graph-safe (device work only, tensors read by address: see
    :class:`moekit.routing.custom.CustomRoutingRouter`)."""
    fn._moekit_graph_safe = True
    return fn


@_graph_safe
def llama4_routing(hidden_states, gating_output, topk, renormalize):
    """Llama 4: ids [T, K] = topk(logits), weights [T, K] float32 = sigmoid(logits[ids]); no renormalisation."""
    vals, ids = torch.topk(gating_output.float(), topk, dim=-1)
    return torch.sigmoid(vals), ids.to(torch.int32)


def _sparsemixer_pick(scores: torch.Tensor, masked_scores: torch.Tensor, jitter_eps: float):
    """One sparsemixer step: the argmax of ``masked_scores`` and its weight, the softmax over the
    scores within ``2·jitter_eps`` (relative) of that maximum. Returns (weight [T, 1], id [T, 1])."""
    top, ids = masked_scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=top)
    far = ((top - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked_scores.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(-1, ids), ids


@_graph_safe
def phimoe_sparsemixer(hidden_states, gating_output, topk, renormalize, *, jitter_eps: float = 0.01):
    """PhiMoE (transformers ``sparsemixer``, eval): expert 1 = argmax(logits), weight = softmax of the
    logits masked to -inf where ``(max - s) / max(|s|, max) > 2·jitter_eps``, at that expert; expert 2 the
    same on the logits with expert 1 removed (the mask still measured on the original logits). Computed
    in the logits' dtype, as transformers does; always returns 2 experts (``topk`` must be 2)."""
    if topk != 2:
        raise ValueError(f"PhiMoE's sparsemixer routes exactly 2 experts per token, got topk={topk}")
    scores = gating_output
    w1, id1 = _sparsemixer_pick(scores, scores, jitter_eps)
    w2, id2 = _sparsemixer_pick(scores, torch.scatter(scores, -1, id1, float("-inf")), jitter_eps)
    return torch.cat((w1, w2), -1).float(), torch.cat((id1, id2), -1).to(torch.int32)


@_graph_safe
def pnorm_routing(hidden_states, gating_output, topk, renormalize, *, p: float | None = 1.0):
    """DBRX: ``s = softmax(logits)`` (in the logits' dtype), top-k, then ``w / ||w||_p`` (``p=None``: none)."""
    scores = torch.softmax(gating_output, dim=-1, dtype=gating_output.dtype)
    w, ids = torch.topk(scores, topk, dim=-1)
    if p is not None:
        w = w / torch.norm(w, p=p, dim=-1, keepdim=True)
    return w.float(), ids.to(torch.int32)


class ExpertScaleRouting(torch.nn.Module):
    """Gemma 4 (a ``custom_routing_function``): ``s = softmax(logits)``, ``ids = topk(s)``, ``w = s[ids]``
    renormalised (when ``renormalize``), then ``w *= per_expert_scale[ids]``."""

    _moekit_graph_safe = True

    def __init__(self, num_experts, *, device=None, dtype=None):
        super().__init__()
        self.per_expert_scale = torch.nn.Parameter(torch.empty(num_experts, device=device, dtype=dtype))

    def forward(self, hidden_states, gating_output, topk, renormalize):
        scores = torch.softmax(gating_output.float(), dim=-1)
        w, ids = torch.topk(scores, topk, dim=-1)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale.float()[ids], ids.to(torch.int32)


class LogitBiasRouting(torch.nn.Module):
    """Kolibri-1 (a ``custom_routing_function``): ``ids = topk(logits + bias)`` (the bias is added to the raw
    logits, not to the scores), ``w = sigmoid(logits[ids])``, renormalised when ``renormalize``."""

    _moekit_graph_safe = True
    _apply = keep_bias_dtype  # the selection bias stays float32 under .to(bf16)

    def __init__(self, num_experts, *, device=None):
        super().__init__()
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))

    def forward(self, hidden_states, gating_output, topk, renormalize):
        logits = gating_output.float()
        ids = torch.topk(logits + self.e_score_correction_bias.float(), topk, dim=-1)[1]
        w = torch.sigmoid(logits.gather(-1, ids))
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids.to(torch.int32)


class SigmoidEpsRouting(torch.nn.Module):
    """LFM2-MoE (a ``custom_routing_function``): ``s = sigmoid(logits)`` (float32), ``ids = topk(s + bias)`` (ties
    -> lower id; no bias: ``topk(s)``), ``w = s[ids]``, renormalised as transformers does when ``renormalize``:
    ``w / (Σw + eps)``. ``bias``: the module holds an ``e_score_correction_bias [E]`` buffer (the checkpoint's
    ``expert_bias``)."""

    _moekit_graph_safe = True
    _apply = keep_bias_dtype  # the selection bias stays float32 under .to(bf16)

    def __init__(self, num_experts, *, bias: bool, eps: float, device=None):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts, dtype=torch.float32, device=device) if bias else None)

    def forward(self, hidden_states, gating_output, topk, renormalize):
        # compute_scores, not torch.sigmoid: on CPU its vector loop and scalar tail differ by an ulp, so equal logits
        # got unequal scores by their memory position and a tie's winner depended on the batch (round 64)
        s = compute_scores(gating_output, "sigmoid")
        bias = self.e_score_correction_bias
        ids = topk_lowest_id(s if bias is None else s + bias.float(), topk)[1]
        w = s.gather(-1, ids)
        if renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + self.eps)
        return w, ids.to(torch.int32)


def routing_function(plan: LayerPlan, *, device=None, dtype=None) -> Callable | None:
    """The ``custom_routing_function`` of ``plan`` (None for the standard routers): a function, or a module
    holding its tensors (built on ``device``)."""
    name, arg = plan.custom_routing, plan.custom_routing_arg
    if name is None:
        return None
    if name == "llama4":
        return llama4_routing
    if name == "expert_scale":
        return ExpertScaleRouting(plan.num_experts, device=device, dtype=dtype)
    if name == "logit_bias":
        return LogitBiasRouting(plan.num_experts, device=device)
    if name == "phimoe":
        return partial(phimoe_sparsemixer, jitter_eps=0.01 if arg is None else float(arg))
    if name == "pnorm":
        return partial(pnorm_routing, p=arg)
    if name in ("sigmoid_bias_eps", "sigmoid_eps"):
        return SigmoidEpsRouting(plan.num_experts, bias=name == "sigmoid_bias_eps", eps=arg, device=device)
    raise NotImplementedError(f"{plan.name}: unknown custom routing {name!r} (known: llama4, phimoe, pnorm, "
                              f"expert_scale, logit_bias, sigmoid_bias_eps, sigmoid_eps)")
