"""The public fronts of the ops: validate once, resolve the backend once, call its kernel table.

    fused_experts(x, w1, w2, w, ids, ..., backend)      -> kernels.experts
    route(logits, spec, bias, indices_type, backend)      -> kernels.route
    fused_topk / fused_topk_bias / grouped_topk (seed)    -> kernels.route (kernels.hash_route)

``backend`` is "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton"; see
:func:`moekit.ops.kernels.resolve_backend`. The table's function runs with the input's CUDA device current
(:mod:`.device_guard`: Triton launches on the current device). Layers resolve their table once at construction and
call it directly; these fronts serve direct callers of the ops.
"""

from __future__ import annotations

import torch

from .._checks import KERNEL_DTYPES, NARROW_INT_DTYPES, check_float_dtype, check_same_device, check_tensor
from .device_guard import call_on_device
from .experts import check_experts_inputs
from .experts_quant import check_quant_experts_inputs
from .quant_config import parse_quant_config
from .kernels import Kernels, resolve_kernels
from .routing import (
    TopKSpec,
    check_bias,
    check_gating,
    check_hash_table,
    check_indices_type,
    check_input_ids,
    grouped_spec,
)


def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    global_num_experts: int = -1,
    swiglu_limit: float | None = None,
    backend: str = "auto",
    quant_config=None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w1_input_scale: torch.Tensor | None = None,
    w2_input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts: ``out[t] = Σ_j w[t, j] · expert_{ids[t, j]}(x[t])`` (see :mod:`.experts`).

    hidden_states: [T, H] fp32/bf16/fp16 (fp64 on the torch backend); w1: [E_local, 2I, H]
    ([E_local, I, H] for a non-gated activation); w2: [E_local, H, I]; topk_weights: [T, K] float;
    topk_ids: [T, K] int32/int64 in [0, E), K >= 1 (an id outside: the torch backend raises, the Triton
    backend reads it as a dead slot that adds 0, with no host sync); w1_bias: [E_local, 2I]; w2_bias: [E_local, H];
    expert_map: [E] int32 (-1: expert held elsewhere). returns: [T, H] dtype of hidden_states.
    activation: one of ``moekit.ACTIVATIONS`` (default ``"silu"``).
    apply_router_weight_on_input: multiply the expert input by the weight instead of its output (K == 1).
    global_num_experts: ``E``, the length of ``expert_map`` when it is given (-1: ``len(expert_map)``, else
        ``w1.shape[0]``).
    swiglu_limit: clamp limit of gated activations (None: none; swigluoai: 7.0).
    backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    quant_config, w1_scale, w2_scale, w1_input_scale, w2_input_scale: quantised experts (SPEC §8):
        ``quant_config`` (an HF dict or a format object) with w1 / w2 in the format's storage
        (``fmt.w13_shape`` / ``fmt.w2_shape``, as :func:`moekit.quantize_experts` makes them), their
        scales and, for static fp8 inputs, the input scales ``[E_local]``; the math is
        :mod:`.experts_quant`'s. A format the backend cannot run raises ``NotImplementedError``.
    """
    check_tensor("hidden_states", hidden_states)  # before reading .device: a non-tensor raises TypeError
    kernels = resolve_kernels(backend, hidden_states.device, quiet=True)
    topk_ids, expert_map = _widened(topk_ids), _widened(expert_map)
    fmt = parse_quant_config(quant_config)
    scales = dict(w13_scale=w1_scale, w2_scale=w2_scale, w13_input_scale=w1_input_scale,
                  w2_input_scale=w2_input_scale)
    if fmt is not None:
        kernels.check_supports(fmt)
        check_quant_experts_inputs(
            hidden_states, w1, w2, topk_weights, topk_ids, fmt=fmt, **scales, activation=activation,
            apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
            expert_map=expert_map, global_num_experts=global_num_experts, swiglu_limit=swiglu_limit,
            names=("w1", "w2"),
        )
        if kernels.name == "triton":
            check_float_dtype("hidden_states", hidden_states, KERNEL_DTYPES)
        return call_on_device(  # (Triton launches on the current device: round 69, .device_guard)
            hidden_states, kernels.experts_quant, hidden_states, w1, w2, topk_weights, topk_ids, fmt=fmt, **scales,
            activation=activation,
            apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
            expert_map=expert_map, swiglu_limit=swiglu_limit, global_num_experts=global_num_experts,
        )
    given = [n for n, t in (("w1_scale", w1_scale), ("w2_scale", w2_scale), ("w1_input_scale", w1_input_scale),
                            ("w2_input_scale", w2_input_scale)) if t is not None]
    if given:
        raise ValueError(f"{given} given without quant_config; pass the weights' format (quant_config=...)")
    p = check_experts_inputs(
        hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
        apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
        expert_map=expert_map, global_num_experts=global_num_experts, swiglu_limit=swiglu_limit,
    )
    if kernels.name == "triton":
        check_float_dtype("hidden_states", hidden_states, KERNEL_DTYPES)
    return call_on_device(
        hidden_states, kernels.experts, hidden_states, w1, w2, topk_weights, topk_ids, activation=p.activation,
        apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
        expert_map=expert_map, swiglu_limit=swiglu_limit,
    )


def _widened(t):
    """int16 / int8 / uint8 ids or maps as int32 (the kernels read int32 / int64; round 64: uint8 ids failed to
    compile in the Triton align kernel); anything else unchanged, for the checks to judge."""
    return t.to(torch.int32) if isinstance(t, torch.Tensor) and t.dtype in NARROW_INT_DTYPES else t


def route(
    gating_output: torch.Tensor,
    spec: TopKSpec,
    bias: torch.Tensor | None = None,
    indices_type: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every score-based router (math in :mod:`.routing`), validated, on ``backend``.

    gating_output: [T, E] any float dtype; bias: [E] float or None
    returns topk_weights [T, K] float32, topk_ids [T, K] ``indices_type`` (default int32)
    """
    check_gating(gating_output, name="gating_output")
    if not isinstance(spec, TopKSpec):
        raise TypeError(f"spec must be a moekit.TopKSpec, got {spec!r} ({type(spec).__name__})")
    return _route(gating_output, spec, bias, indices_type, backend, top_k_name="spec.top_k")


def fused_topk(
    hidden_states: torch.Tensor | None,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    indices_type: torch.dtype | None = None,
    scoring_func: str = "softmax",
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids = topk(scores)``, ``w = scores[ids]``, optionally renormalised.

    hidden_states: [T, H] (only its token count is checked) or None; gating_output: [T, E] logits;
    topk: K; renormalize: divide the weights by their sum; indices_type: dtype of the ids (int32
    default, or int64); scoring_func: "softmax", "sigmoid" or "sqrtsoftplus"; backend: as
    :func:`fused_experts`.
    returns topk_weights [T, K] float32, topk_ids [T, K] int32, token_expert_indices [T, K] int32
    where ``token_expert_indices[t, k] = k * T + t`` (the seed's source-row index).
    """
    _check_logits(hidden_states, gating_output)
    spec = TopKSpec(top_k=topk, scoring_func=scoring_func, renormalize=renormalize)
    w, ids = _route(gating_output, spec, None, indices_type, backend)
    t = gating_output.shape[0]
    src = torch.arange(topk, device=ids.device, dtype=torch.int32).unsqueeze(0) * t
    src = src + torch.arange(t, device=ids.device, dtype=torch.int32).unsqueeze(1)
    return w, ids, src


def fused_topk_bias(
    hidden_states: torch.Tensor | None,
    gating_output: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    topk: int,
    renormalize: bool,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
    input_tokens: torch.Tensor | None = None,
    hash_indices_table: torch.Tensor | None = None,
    indices_type: torch.dtype | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected top-k (bias picks, unbiased scores weigh), or hash routing.

    hidden_states: [T, H] (only its token count is checked) or None; gating_output: [T, E] logits;
    e_score_correction_bias: [E] selection bias (picks the experts; the unbiased scores weigh them);
    topk: K; renormalize: divide the weights by their sum; scoring_func: "softmax", "sigmoid" or
    "sqrtsoftplus"; routed_scaling_factor: multiplies the weights last; indices_type: dtype of the ids;
    backend: as :func:`fused_experts`.
    With ``hash_indices_table [vocab, K]`` the ids are ``hash_indices_table[input_tokens]`` (``input_tokens
    [T]`` token ids, required then) and the bias is not used. Returns topk_weights [T, K] float32,
    topk_ids [T, K] int32.
    """
    _check_logits(hidden_states, gating_output)
    spec = TopKSpec(top_k=topk, scoring_func=scoring_func, renormalize=renormalize,
                    routed_scaling_factor=routed_scaling_factor)
    if hash_indices_table is None:
        if input_tokens is not None:
            raise ValueError("input_tokens was given but hash_indices_table is None: token ids are only used by hash "
                             "routing (pass the table, or leave input_tokens out)")
        return _route(gating_output, spec, e_score_correction_bias, indices_type, backend)
    t, e = gating_output.shape
    spec.validate(e, top_k_name="topk")
    check_indices_type(indices_type)
    kernels = _kernels(backend, gating_output)
    check_hash_table(hash_indices_table, e, topk, check_range=kernels.checks_values, top_k_name="topk")
    check_same_device("hash_indices_table", hash_indices_table, "gating_output", gating_output)
    input_ids = check_input_ids(input_tokens, hash_indices_table, t, name="input_tokens")
    return call_on_device(gating_output, kernels.hash_route, gating_output, hash_indices_table, input_ids, spec,
                          indices_type, ids_name="input_tokens", logits_name="gating_output")


def grouped_topk(
    hidden_states: torch.Tensor | None, gating_output: torch.Tensor, topk: int, renormalize: bool,
    num_expert_group: int = 0, topk_group: int = 0, scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None,
    *, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2/V3 grouped top-k (see :mod:`.routing`). Invalid grouping raises ``ValueError``.

    hidden_states: [T, H] (only its token count is checked) or None; gating_output: [T, E] logits;
    topk: K; renormalize: divide the weights by their sum; num_expert_group: G (E % G == 0);
    topk_group: groups kept per token; scoring_func: "softmax", "sigmoid" or "sqrtsoftplus";
    routed_scaling_factor: multiplies the weights last; e_score_correction_bias: [E] selection bias
    (group scores are then the sum of each group's top-2); backend: as :func:`fused_experts`.
    Returns topk_weights [T, K] float32, topk_ids [T, K] int32.
    """
    _check_logits(hidden_states, gating_output)
    spec = grouped_spec(topk, renormalize, num_expert_group, topk_group, scoring_func, routed_scaling_factor)
    return _route(gating_output, spec, e_score_correction_bias, None, backend)


def _kernels(backend: str, t: torch.Tensor) -> Kernels:
    return resolve_kernels(backend, t.device, quiet=True)


def _check_logits(hidden_states, gating_output) -> None:
    check_gating(gating_output, name="gating_output")
    if hidden_states is None:
        return
    check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must have shape [T, H] (or be None), got {list(hidden_states.shape)}")
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(
            f"hidden_states has {hidden_states.shape[0]} tokens but gating_output has {gating_output.shape[0]} rows"
        )


def _route(gating_output, spec: TopKSpec, bias, indices_type, backend: str, *, top_k_name: str = "topk"):
    """Validate spec, bias and indices_type against checked logits [T, E]; run the backend's route. Errors
    name the arguments as these functions' callers pass them (SPEC §7): ``gating_output``, ``topk``
    (``top_k_name``), never the routers' ``router_logits`` / ``top_k``."""
    e = gating_output.shape[1]
    spec.validate(e, top_k_name=top_k_name)
    if bias is not None:
        check_bias(bias, e)
        check_same_device("e_score_correction_bias", bias, "gating_output", gating_output)
    check_indices_type(indices_type)
    kernels = _kernels(backend, gating_output)
    kernels.check_route(e, spec.top_k, top_k_name=top_k_name)
    return call_on_device(gating_output, kernels.route, gating_output, spec, bias, indices_type,
                          logits_name="gating_output")
