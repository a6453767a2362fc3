"""Autograd through any kernel table: the forward's values are the table's own bits, the gradients torch's.

:func:`with_autograd` wraps a :class:`~moekit.ops.kernels.Kernels` table's functions. A call that autograd would
not track (grad disabled, or no input requiring grad) goes straight to the table's function; otherwise:

- ``route`` / ``hash_route``: the table picks the ids (not differentiable; a selection bias gets no gradient, as
  DeepSeek-V3 trains it by its own rule) and its weights are the forward's value; their gradient is that of the
  torch twin's weights on the same ids, ``w = finish(scores(logits)[ids])`` (renormalised, scaled), so
  ``d logits`` flows through the scoring function (softmax / sigmoid / sqrtsoftplus).
- ``zero_slots`` / ``zero_combine``: the table's values, the torch twins' gradients.
- ``experts`` / ``experts_quant``: the table's forward; the backward recomputes every expert in float32
  (:func:`moekit.ops.experts_grad.experts_backward`): ``d hidden_states``, ``d topk_weights`` and, for
  unquantised weights and any biases that require grad, the weight gradients.

The "value of one, gradient of the other" step is :class:`_Straight`: identical forward bits with or without
autograd, so training and inference run the same kernels.
"""

from __future__ import annotations

import dataclasses

import torch

from .experts import DEFAULT_WORKSPACE_BYTES
from ._eager import autocast_off
from .experts_grad import experts_backward
from .quantize import dequantize_experts
from .routing import compute_scores, finish_weights
from .w4_layout import unrelay_rega
from .zero_experts import zero_combine_torch, zero_slots_torch


def wants_grad(*tensors) -> bool:
    """Autograd would track a call on these tensors (None entries ignored). A plain loop: this runs on every eager
    call of a table function (about 0.2 µs under no_grad, 0.5 with grad enabled on a slow CPU host)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


class _Straight(torch.autograd.Function):
    """``value`` forward, ``twin``'s gradient backward (same shape): twin [*] (grad), box = (value [*],) (no grad).
    ``value`` rides in a tuple, not as an input: an input returned as is would be a view, and an in-place op on the
    layer's output (``out.add_(residual)``) would then raise."""

    @staticmethod
    def forward(ctx, twin, box):
        return box[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _straight(value: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_exporting():  # export traces the twin itself (round 66: non-strict export inlined _Straight's
        return twin  # forward, the detached value, and strict export ran it without grad: the gradient was lost)
    return _Straight.apply(twin, (value,))


def _twin_weights(logits: torch.Tensor, ids: torch.Tensor, spec) -> torch.Tensor:
    """The torch twin's weights on given ids: ``finish(scores(logits)[ids])`` [T, K] float32 (differentiable). For
    sqrtsoftplus the branch ``torch.where`` discards is evaluated on a clamped input: ``exp(x)`` of a logit past ~88
    is inf there, and its gradient 0 · inf gave NaN (round 58's review); the values are compute_scores'."""
    if spec.scoring_func == "sqrtsoftplus":
        x = logits.float()
        scores = torch.where(x > 20.0, x, torch.log1p(torch.exp(x.clamp(max=20.0)))).sqrt()
    else:
        scores = compute_scores(logits, spec.scoring_func)
    return finish_weights(scores.gather(1, ids.long()), spec.renormalize, spec.routed_scaling_factor)


class _Wrapped:
    """A table function with autograd around ``base`` (the backend's own function): an object, not a closure, so
    that tables (and the layers holding them) pickle and deep-copy; equal when the bases are."""

    def __init__(self, base):
        self.base = base

    def __eq__(self, other):
        return type(other) is type(self) and other.base == self.base

    def __hash__(self):
        return hash((type(self), self.base))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.base, '__name__', self.base)})"


class _Route(_Wrapped):
    def __call__(self, logits, spec, bias, indices_type, **kw):
        if not wants_grad(logits):
            return self.base(logits, spec, bias, indices_type, **kw)
        w, ids = self.base(logits.detach(), spec, bias, indices_type, **kw)
        return _straight(w, _twin_weights(logits, ids, spec)), ids


class _HashRoute(_Wrapped):
    def __call__(self, logits, table, input_ids, spec, indices_type, **kw):
        if not wants_grad(logits):
            return self.base(logits, table, input_ids, spec, indices_type, **kw)
        w, ids = self.base(logits.detach(), table, input_ids, spec, indices_type, **kw)
        return _straight(w, _twin_weights(logits, ids, spec)), ids


class _ZeroSlots(_Wrapped):
    def __call__(self, topk_weights, topk_ids, num_experts):
        if not wants_grad(topk_weights):
            return self.base(topk_weights, topk_ids, num_experts)
        w, ids, s = self.base(topk_weights.detach(), topk_ids, num_experts)
        tw, _, ts = zero_slots_torch(topk_weights, topk_ids, num_experts)
        return _straight(w, tw), ids, _straight(s, ts)


class _ZeroCombine(_Wrapped):
    def __call__(self, routed, x, zero_scale, scale):
        if not wants_grad(routed, x if zero_scale is not None else None, zero_scale):
            return self.base(routed, x, zero_scale, scale)
        out = self.base(routed.detach(), None if x is None else x.detach(),
                        None if zero_scale is None else zero_scale.detach(), scale)
        return _straight(out, zero_combine_torch(routed, x, zero_scale, scale))


@dataclasses.dataclass
class _ExpertsCall:
    """What one experts call's backward needs besides the tensors autograd saves."""

    forward: object  # (x, topk_weights) -> [T, H]: the table's experts with everything else bound
    stacks_of: object  # (e0, e1, dtype) -> (W13, W2) of local experts e0 .. e1 - 1 (experts_grad.StacksOf)
    num_local: int  # E_local
    shapes: tuple | None  # (E_local, w13 rows, H, I); None: quantised, read off one dequantised expert at backward
    kw: dict  # the call's keywords: activation, swiglu_limit, apply_router_weight_on_input, expert_map

    def layout(self, dtype: torch.dtype) -> tuple:
        """(shapes, experts per stacks_of call on the grouped path: all, or for quantised weights as many as half
        the workspace holds dequantised)."""
        if self.shapes is not None:
            return self.shapes, None
        d13, d2 = self.stacks_of(0, 1, dtype)
        per_expert = (d13.numel() + d2.numel()) * d13.element_size()
        chunk = max(1, DEFAULT_WORKSPACE_BYTES // 2 // per_expert)
        return (self.num_local, d13.shape[1], d2.shape[1], d2.shape[2]), chunk


_experts_backward = autocast_off(experts_backward)  # (in the layer's dtype under autocast too: round 68)


class _ExpertsFn(torch.autograd.Function):
    """forward(call, x, topk_weights, topk_ids, w13, w2, b13, b2, *scales) -> [T, H]; backward:
    :func:`experts_backward`. Quantised calls (``call.shapes`` None) pass their quantised weights and ``scales``
    (:data:`_FROZEN`) too: they get no gradient, and a backward that would need one raises naming them."""

    @staticmethod
    def forward(ctx, call, x, topk_weights, topk_ids, w13, w2, b13, b2, *scales):
        ctx.call = call
        ctx.save_for_backward(x, topk_weights, topk_ids, w13, w2, b13, b2)
        return call.forward(x, topk_weights)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not differentiable
            raise NotImplementedError(
                "double backward (create_graph=True, e.g. a gradient penalty or a Hessian-vector product) through "
                "moekit's routed experts is not implemented: their backward is not itself differentiable")
        x, topk_weights, topk_ids, w13, w2, b13, b2 = ctx.saved_tensors
        c, kw, wanted = ctx.call, ctx.call.kw, ctx.needs_input_grad
        quant = c.shapes is None
        if quant and any(wanted[4:6] + wanted[8:]):
            names = [n for n, w in zip(("w13", "w2", *_FROZEN), wanted[4:6] + wanted[8:]) if w]
            raise NotImplementedError(
                f"quantised expert weights and scales get no gradient ({', '.join(names)} require grad): train "
                "through their inputs (the biases, the router, the other layers) with them frozen "
                "(requires_grad_(False)), or dequantise the layer to train them")
        need = (wanted[1], wanted[2], wanted[4] and not quant, wanted[5] and not quant, wanted[6], wanted[7])
        shapes, chunk = c.layout(x.dtype)
        grads = _experts_backward(
            dy, x, topk_weights, topk_ids, stacks_of=c.stacks_of, shapes=shapes,
            activation=kw.get("activation", "silu"), swiglu_limit=kw.get("swiglu_limit"),
            on_input=kw.get("apply_router_weight_on_input", False), w1_bias=b13, w2_bias=b2,
            expert_map=kw.get("expert_map"), need=need, expert_chunk=chunk)
        params = [g.to(p.dtype) if g is not None else None for g, p in zip(grads[2:], (w13, w2, b13, b2))]
        return None, grads[0], grads[1], None, *params, *(None,) * (len(wanted) - 8)


class _Experts(_Wrapped):
    def __call__(self, x, w1, w2, topk_weights, topk_ids, **kw):
        b1, b2 = kw.get("w1_bias"), kw.get("w2_bias")
        if not wants_grad(x, topk_weights, w1, w2, b1, b2):
            return self.base(x, w1, w2, topk_weights, topk_ids, **kw)
        base = self.base
        call = _ExpertsCall(lambda xx, ww: base(xx, w1, w2, ww, topk_ids, **kw),
                            lambda e0, e1, dtype: (w1[e0:e1].detach().to(dtype), w2[e0:e1].detach().to(dtype)),
                            w2.shape[0], (w2.shape[0], w1.shape[1], w2.shape[1], w2.shape[2]), kw)
        return _ExpertsFn.apply(call, x, topk_weights, topk_ids, w1, w2, b1, b2)


def _quant_stacks_of(w13, w2, kw):
    """(e0, e1, dtype) -> (W13, W2): :func:`~moekit.ops.quantize.dequantize_experts` of those experts of the
    quantised call's tensors (4-bit words re-laid for the register-operand GEMMs laid back first)."""
    relaid = kw.get("packed_layout", "spec") != "spec"

    def stacks_of(e0: int, e1: int, dtype):
        q13, q2 = w13[e0:e1], w2[e0:e1]
        if relaid:
            q13, q2 = unrelay_rega(q13), unrelay_rega(q2)
        return dequantize_experts(q13, q2, kw["w13_scale"][e0:e1], kw["w2_scale"][e0:e1], kw["fmt"], dtype=dtype)
    return stacks_of


_FROZEN = ("w13_scale", "w2_scale", "w13_input_scale", "w2_input_scale")


class _ExpertsQuant(_Wrapped):
    def __call__(self, x, w13, w2, topk_weights, topk_ids, **kw):
        b1, b2 = kw.get("w1_bias"), kw.get("w2_bias")
        scales = tuple(kw.get(n) for n in _FROZEN)
        if not wants_grad(x, topk_weights, b1, b2, w13, w2, *scales):
            return self.base(x, w13, w2, topk_weights, topk_ids, **kw)
        base = self.base
        call = _ExpertsCall(lambda xx, ww: base(xx, w13, w2, ww, topk_ids, **kw), _quant_stacks_of(w13, w2, kw),
                            w13.shape[0], None, kw)
        return _ExpertsFn.apply(call, x, topk_weights, topk_ids, w13, w2, b1, b2, *scales)


def with_autograd(table):
    """``table`` (a :class:`~moekit.ops.kernels.Kernels`) with every function differentiable (module docstring)."""
    quant = table.experts_quant
    return dataclasses.replace(
        table, route=_Route(table.route), hash_route=_HashRoute(table.hash_route), experts=_Experts(table.experts),
        experts_quant=_ExpertsQuant(quant) if quant is not None else None,
        zero_slots=_ZeroSlots(table.zero_slots), zero_combine=_ZeroCombine(table.zero_combine))
