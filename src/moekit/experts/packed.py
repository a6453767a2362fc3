"""Packed 4-bit words a :class:`~moekit.experts.routed.RoutedExperts` stores re-laid (``packed_layout == "rega"``,
:mod:`moekit.ops.w4_layout`) against state dicts, which hold SPEC §8's packing both ways: a load re-lays what it
wrote, a save writes SPEC §8's packing (whatever the layer stores); and a quantised layer's storage under a float
cast (:func:`cast_params_dtype`, :func:`follow_params_dtype`: the activation dtype moves, the words stay), and what
any layer's loads convert to after one (:func:`follow_weight_dtype`)."""

from __future__ import annotations

import dataclasses

import torch

from .._checks import FLOAT_DTYPES, KERNEL_DTYPES
from ..ops.w4_layout import packed_layout_for, relay_rega, unrelay_rega
from .params import expert_tensors_spec

#: the parameters a re-laid layer stores re-laid
RELAID_WEIGHTS = ("w13_weight", "w2_weight")


def relay_loaded(experts: torch.nn.Module, names, state_dict, prefix: str, local_metadata: dict) -> None:
    """After ``_load_from_state_dict``: re-lay each of ``names`` the state dict held. With ``assign=True`` the
    parameter is the caller's tensor: replaced by a re-laid copy, the caller's left as given."""
    for name in names:
        if prefix + name not in state_dict:
            continue
        relaid = relay_rega(getattr(experts, name).detach())
        if local_metadata.get("assign_to_params_buffers"):
            setattr(experts, name, torch.nn.Parameter(relaid, requires_grad=False))
        else:
            with torch.no_grad():
                getattr(experts, name).copy_(relaid)


def spec_packed_saved(names, destination: dict, prefix: str) -> None:
    """After ``_save_to_state_dict``: each of ``names`` in SPEC §8's packing."""
    for name in names:
        if prefix + name in destination:
            destination[prefix + name] = unrelay_rega(destination[prefix + name].detach())


def cast_params_dtype(experts: torch.nn.Module, fn) -> torch.dtype:
    """The ``params_dtype`` a quantised layer's ``_apply(fn)`` gives it: what ``fn`` makes of a tensor of its current
    one (``.to(dtype)`` / ``.half()``: the new float dtype; a device move: the same), a non-float target ignored
    (``.to(float8)``). ``TypeError`` before anything moves when the Triton backend cannot run it (float64)."""
    old = experts._params_dtype
    new = fn(experts.w13_weight.new_empty(0, dtype=old)).dtype
    new = new if new in FLOAT_DTYPES else old
    if new != old and experts.kernels.name == "triton" and new not in KERNEL_DTYPES:
        raise TypeError(f"a quantised layer on the triton backend cannot take params_dtype {new}; expected one of "
                        f"{[str(d) for d in KERNEL_DTYPES]}")
    return new


def follow_params_dtype(experts: torch.nn.Module, new: torch.dtype) -> None:
    """A quantised layer's activation dtype becomes ``new``: the biases convert, the weights and scales keep their
    dtypes; re-laid 4-bit words go back to SPEC §8's packing where ``new`` cannot read them (float32), SPEC-packed
    ones stay so (valid for every dtype)."""
    c = experts.moe_config
    experts._params_dtype = new
    experts.specs = expert_tensors_spec(c.hidden_size, c.intermediate_size, c.gated, c.has_bias, new, experts.quant)
    for name in ("w13_bias", "w2_bias"):
        b = getattr(experts, name)
        if b is not None:  # in place, as torch's own cast: the same Parameter, its requires_grad and its gradient
            b.data = b.data.to(new)  # (round 63: a new frozen Parameter; an optimizer kept the old one)
            if b.grad is not None:
                b.grad = b.grad.to(new)
    if experts.packed_layout == "rega" and packed_layout_for(experts.kernels.packed_layouts, experts.quant, new,
                                                             c.hidden_size, experts.inter_local) != "rega":
        for name in RELAID_WEIGHTS:
            setattr(experts, name, torch.nn.Parameter(unrelay_rega(getattr(experts, name).detach()),
                                                      requires_grad=False))
        experts.packed_layout = "spec"


def follow_weight_dtype(experts: torch.nn.Module) -> None:
    """After a cast or an assigning state-dict load: ``moe_config.params_dtype`` and, unquantised, what loads convert
    to (``specs``) follow the layer's ``params_dtype`` (round 53: ``.float()`` on a bf16 layer kept bf16 specs, so later
    loads rounded float32 weights through bfloat16). A non-float dtype (``.to(float8)``) is not followed."""
    dtype, c = experts.params_dtype, experts.moe_config
    if dtype not in FLOAT_DTYPES:
        return
    if experts.quant is None and experts.specs["w13_weight"].dtype != dtype:
        experts.specs = expert_tensors_spec(c.hidden_size, c.intermediate_size, c.gated, c.has_bias, dtype, None)
    if dtype != c.params_dtype:
        experts.moe_config = dataclasses.replace(c, params_dtype=dtype)
