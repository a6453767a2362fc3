"""What the runner checks (shapes, dtypes, devices only: no host synchronisation), so nothing is silently
broadcast: a forward's inputs (the router logits it routes with included), a module's returned tensor (or
vLLM-style ``(output, bias)`` pair), and a gate ``nn.Linear``'s sizes at construction. See :mod:`moekit.runner` for
the shapes each module must return."""

from __future__ import annotations

import re

import torch

from ._checks import FLOAT_DTYPES, check_callable, check_float_dtype, check_tensor
from .experts.placement_state import PLACEMENT_KEY
from .ops.device_guard import call_on_device

#: what the gate reads: the routed input (SPEC §1) or the layer's input
GATE_INPUTS = ("routed", "block")


def check_runner_args(moe_config, router, enable_dbo: bool, gate_input: str, routed_scaling_factor,
                      modules: dict) -> None:
    """A :class:`~moekit.MoERunner`'s constructor arguments: ``gate_input``, no dual-batch overlap, callable user
    ``modules`` (by name), a shared gate only with shared experts, a gate ``nn.Linear``'s sizes, and an output-side
    ``routed_scaling_factor`` that agrees with ``moe_config``."""
    if gate_input not in GATE_INPUTS:
        raise ValueError(f"gate_input must be one of {list(GATE_INPUTS)}, got {gate_input!r}")
    if enable_dbo:
        raise NotImplementedError("enable_dbo=True (dual-batch overlap) is not supported")
    for name, module in modules.items():
        check_callable(name, module)
    if modules["shared_expert_gate"] is not None and modules["shared_experts"] is None:
        raise ValueError("shared_expert_gate is set but shared_experts is None; the gate needs shared experts")
    if gate_input == "routed":  # a gate on the block input has the block's (unknown) width
        check_gate_linear(modules["gate"], moe_config.hidden_size,
                          router.num_logit_columns or router.global_num_experts)
    if routed_scaling_factor is not None and routed_scaling_factor != moe_config.output_scale:
        raise ValueError(
            f"routed_scaling_factor={routed_scaling_factor!r} disagrees with moe_config (output-side factor "
            f"{moe_config.output_scale}); build the MoEConfig with routed_scaling_factor= and "
            "apply_routed_scale_to_output=True instead (the config is the one store)"
        )


def guard_placement(runner, router, experts) -> None:
    """Without EPLB routing (the router's ``eplb_state``), logical expert ``e`` runs in physical slot ``e``: a
    placement whose first ``E`` slots hold other experts would run the wrong weights (round 61: a permuted
    hand-built placement was accepted), so it raises ``ValueError``, now and (a load-state-dict pre-hook on
    ``runner``, :func:`_placement_pre_hook`) when a state dict would bring one (a rebalanced layer's, loaded into one
    without EPLB)."""
    if getattr(router, "eplb_state", None) is not None:
        return
    _routable(experts.placement.physical_to_logical, experts.placement.num_logical, "the experts' placement has")
    runner.register_load_state_dict_pre_hook(_placement_pre_hook)


def _placement_pre_hook(runner, state_dict, prefix, *args) -> None:
    """(a module-level function: a layer holding it still pickles and deep-copies)"""
    saved = state_dict.get(prefix + "routed_experts." + PLACEMENT_KEY)
    if isinstance(saved, torch.Tensor) and not saved.is_meta and getattr(runner.router, "eplb_state", None) is None:
        _routable(saved.flatten().tolist(), runner.routed_experts.placement.num_logical,
                  f"state dict {prefix}routed_experts.{PLACEMENT_KEY} has")


def _routable(p2l, num_logical: int, what: str) -> None:
    if [int(e) for e in p2l[:num_logical]] != list(range(num_logical)):
        raise ValueError(
            f"{what} physical_to_logical {[int(e) for e in p2l]}, but without EPLB routing (router.eplb_state is None) "
            f"logical expert e runs in physical slot e: slots 0..{num_logical - 1} must hold experts 0..E-1 (build the "
            "layer with enable_eplb=True to route to a rebalanced placement)")


def check_hidden(layer, hidden_states, router_logits=None, input_ids=None) -> None:
    """A :class:`~moekit.MoERunner` forward's ``hidden_states`` [..., H_in]: a float tensor, not a scalar, of
    width ``hidden_size`` unless a ``routed_input_transform`` maps it.
    ``router_logits`` [T, E + Z] and ``input_ids`` [T] are flat (size-1 dims aside), or have the leading dims of
    ``hidden_states`` (``[B, S, E + Z]`` / ``[B, S]`` for ``[B, S, H]``): other leading dims of as many tokens
    ([S, B, ...]) would route the wrong tokens, so they raise."""
    check_tensor("hidden_states", hidden_states)
    check_float_dtype("hidden_states", hidden_states, FLOAT_DTYPES)
    if hidden_states.dim() < 1:
        raise ValueError("hidden_states must have shape [..., H], got a scalar")
    hidden = layer.moe_config.hidden_size
    if layer.routed_input_transform is None and hidden_states.shape[-1] != hidden:
        raise ValueError(f"hidden_states must have shape [..., {hidden}], got {list(hidden_states.shape)}")
    lead = tuple(hidden_states.shape[:-1])
    for name, t, flat in (("router_logits", router_logits, 2), ("input_ids", input_ids, 1)):
        if not isinstance(t, torch.Tensor):
            continue
        theirs = [d for d in t.shape[: t.dim() + 1 - flat] if d != 1]  # size-1 dims order nothing: [1, T] is flat
        if len(theirs) > 1 and theirs != [d for d in lead if d != 1]:
            want = f"[{', '.join(map(str, lead))}{', E + Z' if flat == 2 else ''}]"
            raise ValueError(f"{name} must be flat ([T{', E + Z' if flat == 2 else ''}]) or have the leading dims of "
                             f"hidden_states {list(hidden_states.shape)}, i.e. {want}; got {list(t.shape)}")


def check_routed_input(layer, x: torch.Tensor) -> None:
    """The routed input x [T, hidden_size] matches the routed experts: width, ``params_dtype``, device. Its errors
    name ``routed_input_transform``'s output where the layer has one (round 62: they blamed ``hidden_states``)."""
    w = layer.routed_experts.w13_weight
    dtype = layer.routed_experts.params_dtype
    hidden = layer.moe_config.hidden_size
    if x.shape[-1] != hidden:
        raise ValueError(f"the routed input must have width hidden_size={hidden}, got {x.shape[-1]}")
    made = getattr(layer, "routed_input_transform", None) is not None
    what = "routed_input_transform's output" if made else "hidden_states"
    if x.dtype != dtype:
        fix = f"make the transform return {dtype}" if made else "cast the input"
        raise TypeError(f"{what} has dtype {x.dtype} but the layer's params_dtype is {dtype}; {fix} or build the "
                        "layer with params_dtype matching it")
    if x.device != w.device and not w.is_meta:  # (on meta: offloaded, and an accelerate hook on the routed experts
        raise ValueError(f"{what} is on {x.device} but the expert weights are on {w.device}")  # brings them: round 69)


def router_logits_for(layer, x: torch.Tensor, router_logits: torch.Tensor | None) -> torch.Tensor:
    """The logits a :class:`~moekit.MoERunner` routes with: ``router_logits`` [T, E + Z] (any leading dims flattened)
    or, when None, ``layer.gate(x)`` checked to be a float ``[T, E + Z]``; cast to ``router_logits_dtype`` if set.

    x: [T, H] what the gate reads; router_logits: [..., E + Z] float or None."""
    if router_logits is None:
        if layer.gate is None:
            raise ValueError("router_logits is None and the layer has no gate; pass one or the other")
        router_logits = ran("gate", layer.gate, x, x.shape[0], (_columns(layer),))
        if not router_logits.is_floating_point():
            raise TypeError(f"gate returned router_logits of dtype {router_logits.dtype}; expected a float tensor")
    else:
        check_tensor("router_logits", router_logits)
        if router_logits.dim() == 0:
            raise ValueError(f"router_logits must have shape [T, E + Z] = [{x.shape[0]}, {_columns(layer)}], got []")
        if router_logits.dim() != 2:
            given, router_logits = list(router_logits.shape), router_logits.reshape(-1, router_logits.shape[-1])
            if router_logits.shape[0] != x.shape[0]:  # (round 62: the error quoted the reshaped rows, "got 1")
                raise ValueError(f"router_logits must have shape [T, E + Z] = [{x.shape[0]}, {_columns(layer)}] "
                                 f"(or hidden_states' leading dims, then E + Z), got {given}")
    if layer.router_logits_dtype is not None:
        router_logits = router_logits.to(layer.router_logits_dtype)
    return router_logits


def compute_router_logits(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """``router_logits [T, E + Z]``: the logits a forward without them routes ``hidden_states`` with,
    ``gate(routed_input_transform(h))`` (``gate(h)`` with ``gate_input="block"``) cast to ``router_logits_dtype``,
    differentiable (e.g. for a load-balancing loss; pass them on: ``layer(hidden_states, logits)`` routes as
    ``layer(hidden_states)`` does).

    hidden_states: [..., H_in] fp32/bf16/fp16 (leading dims flattened). A layer without a gate raises ValueError.
    Runs on the CUDA device of ``hidden_states`` (made current where another one is: round 69)."""
    return call_on_device(hidden_states, _router_logits_of, layer, hidden_states)


def _router_logits_of(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    check_hidden(layer, hidden_states)
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    return layer._logits(h if layer.gate_input == "block" else layer._routed_input(h), None)


def _columns(layer) -> int:
    """E + Z, the router's logit columns (looked up only where needed: ``layer.router`` is a module attribute, ~0.7 µs
    a read, on the eager forward's path)."""
    return layer.router.num_logit_columns or layer.router.global_num_experts


def first_output(out, name: str = "a module"):
    """Modules such as vLLM's linear layers return ``(output, output_bias)``, the bias being None unless
    the layer skipped adding it (``skip_bias_add``): then it is added here, never dropped. ``name``: the module's, for
    the error."""
    if not isinstance(out, (tuple, list)):
        return out
    if len(out) != 2 or (out[1] is not None and not isinstance(out[1], torch.Tensor)):
        raise TypeError(f"{name} returned a {type(out).__name__} of {len(out)}; expected a tensor or (tensor, bias)")
    if out[1] is None:
        return out[0]
    b, o = tuple(out[1].shape), tuple(out[0].shape) if isinstance(out[0], torch.Tensor) else None
    if o is not None and b != o and not (0 < len(b) <= len(o) and b[-1] == o[-1] and all(d == 1 for d in b[:-1])):
        # (round 66: a [T, 1] or [1] bias was broadcast silently, a [H + 1] one failed with torch's message)
        raise ValueError(f"{name} returned (output {list(o)}, bias {list(b)}); expected a bias of [{o[-1]}] "
                         "(skip_bias_add's [out_features], or [1, ..., 1, H]) or of the output's shape")
    return out[0] + out[1]


#: torch's messages for a matmul whose operands do not fit (shapes, dtypes): the errors :func:`called` rewords
_MATMUL_MISMATCH = re.compile(r"mat1 and mat2|m1 and m2|same dtype|expected scalar type|cannot be multiplied")


def first_linear(module):
    """The first ``nn.Linear`` of a module (itself, or the first of its submodules), or None."""
    mods = module.modules() if isinstance(module, torch.nn.Module) else ()
    return next((m for m in mods if isinstance(m, torch.nn.Linear)), None)


def input_width(transform, hidden_size: int) -> int:
    """The input width of a layer whose routed input transform is ``transform`` (None: ``hidden_size``)."""
    lin = first_linear(transform)
    return hidden_size if lin is None else lin.in_features


def called(name: str, module, x: torch.Tensor):
    """``module(x)`` for a user module of the layer (gate, shared experts, transforms); a ``RuntimeError`` it raises
    because its first ``nn.Linear`` does not fit ``x`` (width, or weights of another dtype without a float32 gate)
    becomes a ``ValueError`` / ``TypeError`` naming the module and the fix (round 55: torch's "mat1 and mat2 shapes
    cannot be multiplied" reached users). Nothing is checked on the good path."""
    try:
        return module(x)
    except RuntimeError as err:
        lin = first_linear(module)  # (only torch's matmul mismatches: an out-of-memory error stays one, review)
        if lin is None or lin.weight.is_meta or isinstance(err, torch.OutOfMemoryError) or \
                _MATMUL_MISMATCH.search(str(err)) is None:
            raise
        if lin.in_features != x.shape[-1]:
            raise ValueError(f"{name} takes inputs of width {lin.in_features} (its nn.Linear's in_features), got "
                             f"{list(x.shape)}: hidden_states must have the width the layer's modules read "
                             "(layer.input_size)") from err
        if lin.weight.dtype != x.dtype and not getattr(lin, "fp32", False):
            raise TypeError(f"{name} has {lin.weight.dtype} weights but gets {x.dtype} inputs: build it in the "
                            f"layer's params_dtype or cast the whole layer (layer.to({x.dtype}))") from err
        raise


def ran(name: str, module, x: torch.Tensor, num_tokens: int, widths: tuple[int, ...]) -> torch.Tensor:
    """``module(x)`` (:func:`called`), its output checked (:func:`returned`)."""
    return returned(name, called(name, module, x), num_tokens, widths, x.device)


def returned(name: str, out, num_tokens: int, widths: tuple[int, ...], device=None) -> torch.Tensor:
    """The tensor a user module returned, checked to be ``[num_tokens, w]`` for a ``w`` in ``widths``
    (``ValueError`` naming the module, the shape got and the shape expected) and on ``device``, its input's
    (round 64: a transform's output on another device became the layer's)."""
    out = first_output(out, name)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} returned a {type(out).__name__}; expected a torch.Tensor")
    # ``any(==)``, not ``in``: under torch.compile a symbolic width ``in`` a tuple is False where ``==`` is True
    if out.dim() != 2 or out.shape[0] != num_tokens or not any(out.shape[1] == w for w in widths):
        expected = " or ".join(f"[{num_tokens}, {w}]" for w in widths)
        raise ValueError(f"{name} returned shape {list(out.shape)}; expected {expected} (T = {num_tokens} tokens)")
    if device is not None and out.device != device:
        raise ValueError(f"{name} returned a tensor on {out.device}; its input is on {device}, and so must it be")
    return out


def check_gate_linear(gate, hidden_size: int, columns: int) -> None:
    """A ``gate`` that is an ``nn.Linear`` reads the routed input (``hidden_size`` wide) and writes one
    logit per routed column (``E + Z``); checked at construction."""
    if not isinstance(gate, torch.nn.Linear):
        return
    if gate.in_features != hidden_size or gate.out_features != columns:
        raise ValueError(
            f"gate is an nn.Linear({gate.in_features}, {gate.out_features}); expected in_features = hidden_size "
            f"({hidden_size}) and out_features = E + Z ({columns})"
        )
