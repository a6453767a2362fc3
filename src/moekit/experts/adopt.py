"""What :meth:`~moekit.experts.routed.RoutedExperts.adopt_weights` is given, checked before the first tensor is adopted
(round 69: a tensor past the first wrong one was refused after those before it were adopted, a bias given to a layer
without biases after all of them).

The tensors are the layer's own (no copy, no conversion): each must have the shape and dtype of the parameter it
replaces. Nothing is converted, so no value can overflow on the way in: a float16 layer's float16 weights and biases
hold float16 values (an inf given is the caller's, as :func:`~.params.check_range` leaves it). What can still pass
float16's range is what the GEMM computes from them: a float16 weight-only 4-bit layer's (mxfp4, int4) codes times
its scales (SPEC §8: ``W = dequantise(codes, scales)`` rounded to ``params_dtype``), checked here slot by slot as
every other load checks them (:func:`~.range16.check_named`; round 69: an adopted pair of 2^14 scales made every
token of the expert NaN)."""

from __future__ import annotations

import torch

from .range16 import check_named


def adoptable(experts, given: dict) -> dict:
    """``given`` (parameter name -> tensor or None: the scales by name, and ``w13_weight`` / ``w2_weight`` /
    ``w13_bias`` / ``w2_bias``) -> the tensors to adopt, by the layer's parameter names; ``ValueError`` / ``TypeError``
    naming the argument first."""
    unknown = sorted(set(given) - set(experts.specs) - {"w13_bias", "w2_bias"})
    if unknown:
        raise ValueError(f"adopt_weights: {unknown} are not tensors of this layer ({sorted(experts.specs)})")
    c = experts.moe_config
    for name in experts.specs:
        t, old = given.get(name), getattr(experts, name)
        if t is None:
            raise ValueError(f"{name}: the layer holds it (has_bias={c.has_bias}, quant={experts.quant}), got no "
                             "tensor")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(old.shape):
            raise ValueError(f"{name} must have shape {list(old.shape)}, got {list(t.shape)}")
        if t.dtype != old.dtype:
            raise TypeError(f"{name} must have dtype {old.dtype}, got {t.dtype}")
    for name in ("w13_bias", "w2_bias"):
        if name not in experts.specs and given.get(name) is not None:
            raise ValueError(f"{name}: the layer has has_bias=False, got a tensor")
    who = f" of layer {experts.layer_name!r}" if experts.layer_name else ""
    check_named(experts, given, what=f"adopt_weights{who}: ", ids=experts.placement.local_logical_ids())
    return {name: given[name] for name in experts.specs}
