"""``FusedMoE``: the seed's factory keywords -> checks -> MoEConfig -> kernel table -> placement and EPLB
state -> router -> routed experts -> executor -> :class:`~moekit.runner.MoERunner`, each part built
once with everything it needs (see :func:`FusedMoE`).

    layer = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, ...)   # -> MoERunner
    layer.load_expert_weights(w13 [E, 2I, H], w2 [E, H, I])
    out = layer(hidden_states [T, H], router_logits [T, E + Z] | None, *, input_ids=None)   # [T, H]
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .config import MoEConfig
from .experts.executor import LocalExecutor
from .experts.placement import PLACEMENT_STRATEGIES
from .experts.routed import RoutedExperts
from .ops.kernels import resolve_kernels
from .parallel.executor import ParallelExecutor
from .parallel.setup import build_placement
from .routing.base import BaseRouter
from .routing.factory import create_fused_moe_router
from .runner import MoERunner

log = logging.getLogger("moekit")


def _unsupported(name: str, value, why: str) -> NotImplementedError:
    return NotImplementedError(f"{name}={value!r} is not supported by this build: {why}")


def FusedMoE(
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    params_dtype: torch.dtype | None = None,
    renormalize: bool = True,
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    quant_config: Any = None,
    tp_size: int | None = None,
    dp_size: int | None = None,
    pcp_size: int | None = None,
    prefix: str = "",
    custom_routing_function: Callable | None = None,
    router: BaseRouter | None = None,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
    swiglu_limit: float | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    activation: str = "silu",
    enable_eplb: bool = False,
    num_redundant_experts: int = 0,
    has_bias: bool = False,
    is_sequence_parallel: bool = False,
    expert_mapping: list[tuple[str, str, int, str]] | None = None,
    n_shared_experts: int | None = None,
    router_logits_dtype: torch.dtype | None = None,
    gate: torch.nn.Module | None = None,
    shared_experts: torch.nn.Module | None = None,
    shared_expert_gate: torch.nn.Module | None = None,
    routed_input_transform: torch.nn.Module | None = None,
    routed_output_transform: torch.nn.Module | None = None,
    apply_routed_scale_to_output: bool = False,
    zero_expert_type: str | None = None,
    hash_indices_table: torch.Tensor | None = None,
    runner_cls: type[MoERunner] | None = None,
    runner_args: dict[str, Any] | None = None,
    routed_experts_cls: type[RoutedExperts] | None = None,
    routed_experts_args: dict[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
    ep_group=None,
    tp_group=None,
    expert_placement_strategy: str = "linear",
    backend: str = "auto",
    gate_input: str = "routed",
    final_output_transform: torch.nn.Module | None = None,
    routed_shared_experts: int = 0,
    expert_output_norm: torch.nn.Module | None = None,
) -> MoERunner:
    """Build a complete MoE layer, bottom-up; nothing is installed on a part after it is built:

        kernels = resolve_kernels(backend, device)                    # once, for router and experts
        placement, eplb_state = build_placement(...)                  # parallel layers; else single, None
        router = create_fused_moe_router(..., eplb_state=, kernels=)  # or the given ``router``
        experts = RoutedExperts(prefix, dtype, config, placement=, kernels=)
        executor = ParallelExecutor(experts, ep_group, tp_group, eplb_state) | LocalExecutor(experts)
        return MoERunner(prefix, config, router, experts, ..., expert_executor=executor)

    Every keyword has the seed's meaning and default; see SPEC §1. Extra keywords: ``device`` (where
    the weights live), ``ep_group``/``tp_group`` (``torch.distributed`` groups),
    ``expert_placement_strategy`` ("linear" or "round_robin") and ``backend`` ("auto", "torch",
    "triton"; "auto" resolves once, here, and the choice is on ``layer.backend``).

    Extensions for transformers architectures beyond the seed (issue #13):

    - ``gate_input="block"``: the gate reads the layer's input instead of ``x_routed`` (see
      :class:`~moekit.runner.MoERunner`); ``final_output_transform``: a module applied to ``routed + shared``.
    - ``routed_shared_experts=S`` (Inkling): the last ``S`` of the ``num_experts`` experts (and logit
      columns) are shared experts that every token selects, with their router scores normalised jointly
      with the ``top_k`` routed ones: ``w_j = s_j / (Σ_{top-k} s + Σ_shared s) · routed_scaling_factor``.
      The router returns ``top_k + S`` slots (the routed ``top_k``, then the ``S`` shared experts);
      ``e_score_correction_bias``, when given, has ``num_experts - S`` entries (routed experts only).
    - ``expert_output_norm``: a module applied to every expert's output rows ``[N, H]`` (after ``b2``,
      before the routing weight; Muse Spark's post-expert RMSNorm). Torch backend only: the Triton
      experts raise ``NotImplementedError`` at construction (it is not in the w2 epilogue).
    The expert weights start unloaded: load them (``layer.load_expert_weights`` / ``load_weights``)
    before the first forward.
    """
    _check_unsupported(quant_config, is_sequence_parallel, pcp_size, dp_size, tp_size, tp_group,
                       n_shared_experts, shared_experts)
    # routed_scaling_factor applies once: in the router, or (apply_routed_scale_to_output) on the output
    router_scale, output_scale = (1.0, routed_scaling_factor) if apply_routed_scale_to_output else (
        routed_scaling_factor, 1.0
    )
    routing = dict(  # the router's keywords: checked here, then the factory's (or a given router's)
        renormalize=renormalize, scoring_func=scoring_func, e_score_correction_bias=e_score_correction_bias,
        routed_scaling_factor=router_scale, zero_expert_type=zero_expert_type, use_grouped_topk=use_grouped_topk,
        custom_routing_function=custom_routing_function, hash_indices_table=hash_indices_table,
        num_expert_group=num_expert_group, topk_group=topk_group,
    )
    _check_routing_combination(routing, apply_router_weight_on_input)
    if router is not None:
        _check_router_instance(router, routing, top_k=top_k, num_experts=num_experts, enable_eplb=enable_eplb)
    device = torch.device(device) if device is not None else _default_device()
    if routed_shared_experts:
        top_k, routing["e_score_correction_bias"] = _with_shared_slots(
            routed_shared_experts, num_experts, top_k, routing, device
        )
    config = MoEConfig(
        num_experts, top_k, hidden_size, intermediate_size, activation=activation, has_bias=has_bias,
        swiglu_limit=swiglu_limit, apply_router_weight_on_input=apply_router_weight_on_input,
        num_zero_experts=_num_zero_experts(zero_expert_type, e_score_correction_bias, num_experts),
        params_dtype=params_dtype or torch.get_default_dtype(),
    )
    kernels = resolve_kernels(backend, device, quiet=True)
    if backend == "auto":
        log.info("moekit layer %r: backend %r on %s", prefix, kernels.name, device)

    parallel = enable_eplb or ep_group is not None or tp_group is not None
    placement, eplb_state = _parallel_pieces(
        parallel, num_experts, num_redundant_experts, enable_eplb, ep_group, tp_group, tp_size,
        expert_placement_strategy, num_expert_group if use_grouped_topk else None, device,
    )
    if router is None:
        router = create_fused_moe_router(
            top_k, num_experts, eplb_state=eplb_state, enable_eplb=enable_eplb, num_logical_experts=num_experts,
            kernels=kernels, **routing,
        )
    router.to(device)
    experts = (routed_experts_cls or RoutedExperts)(
        prefix, config.params_dtype, config, quant_config, placement=placement, kernels=kernels, device=device,
        **(dict(expert_output_norm=expert_output_norm) if expert_output_norm is not None else {}),
        **(routed_experts_args or {}),
    )
    executor = ParallelExecutor(experts, ep_group, tp_group, eplb_state) if parallel else LocalExecutor(experts)
    return (runner_cls or MoERunner)(
        layer_name=prefix,
        moe_config=config,
        router=router,
        routed_experts=experts,
        gate=gate,
        shared_expert_gate=shared_expert_gate,
        shared_experts=shared_experts,
        routed_input_transform=routed_input_transform,
        routed_output_transform=routed_output_transform,
        routed_scaling_factor=output_scale,
        router_logits_dtype=router_logits_dtype,
        expert_executor=executor,
        n_shared_experts=n_shared_experts,
        expert_mapping=expert_mapping,
        gate_input=gate_input,
        final_output_transform=final_output_transform,
        **(runner_args or {}),
    )


#: selection bias of the shared slots of ``routed_shared_experts``: above any score + bias of a routed expert
_SHARED_SELECTION_BIAS = 1e9


def _with_shared_slots(num_shared, num_experts, top_k, routing, device):
    """(router top_k = top_k + S, selection bias [E] with the shared experts always selected)."""
    if isinstance(num_shared, bool) or not isinstance(num_shared, int) or not 0 < num_shared < num_experts:
        raise ValueError(f"routed_shared_experts must be an int in [0, num_experts={num_experts}), got {num_shared!r}")
    for name in ("zero_expert_type", "custom_routing_function", "hash_indices_table"):
        if routing[name] is not None:
            raise ValueError(f"routed_shared_experts cannot be combined with {name}")
    if routing["use_grouped_topk"]:
        raise ValueError("routed_shared_experts cannot be combined with use_grouped_topk")
    bias = routing["e_score_correction_bias"]
    n_routed = num_experts - num_shared
    if bias is None:
        bias = torch.zeros(n_routed, device=device)
    if bias.dim() != 1 or bias.shape[0] != n_routed:
        raise ValueError(
            f"with routed_shared_experts={num_shared}, e_score_correction_bias must have shape "
            f"[{n_routed}] (routed experts only), got {list(bias.shape)}"
        )
    shared = torch.full((num_shared,), _SHARED_SELECTION_BIAS, dtype=torch.float32, device=bias.device)
    return top_k + num_shared, torch.cat([bias.float(), shared])


def _parallel_pieces(parallel, num_experts, num_redundant, enable_eplb, ep_group, tp_group, tp_size, strategy,
                     num_expert_group, device):
    """(placement, EPLB state) of a parallel layer; (None, None) without parallelism (one placement
    holding every expert, made by the experts)."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"expert_placement_strategy must be one of {list(PLACEMENT_STRATEGIES)}, got {strategy!r}")
    if num_redundant and not enable_eplb:
        raise ValueError(f"num_redundant_experts={num_redundant} requires enable_eplb=True")
    if not parallel:
        return None, None
    return build_placement(
        num_experts=num_experts, num_redundant_experts=num_redundant, ep_group=ep_group, tp_group=tp_group,
        tp_size=tp_size, strategy=strategy, enable_eplb=enable_eplb, num_expert_group=num_expert_group,
        device=device,
    )


def _check_unsupported(quant_config, is_sequence_parallel, pcp_size, dp_size, tp_size, tp_group,
                       n_shared_experts, shared_experts) -> None:
    """Arguments this build cannot honour raise ``NotImplementedError`` naming them (SPEC §1)."""
    if quant_config is not None:
        raise _unsupported("quant_config", quant_config, "quantised experts (fp8, mxfp4) are not implemented yet")
    if is_sequence_parallel:
        raise _unsupported("is_sequence_parallel", True, "sequence-parallel MoE is not implemented")
    if pcp_size not in (None, 1):
        raise _unsupported("pcp_size", pcp_size, "pipeline context parallelism is not implemented")
    if dp_size not in (None, 1):
        raise _unsupported("dp_size", dp_size, "data parallelism is the caller's; pass ep_group for expert parallelism")
    if tp_size not in (None, 1) and tp_group is None:
        raise _unsupported("tp_size", tp_size, "tensor parallelism needs tp_group (a torch.distributed group)")
    if n_shared_experts and shared_experts is None:
        raise NotImplementedError(
            f"n_shared_experts={n_shared_experts} without shared_experts: moekit does not build shared experts "
            "itself (fused shared experts are ROCm-aiter only in the seed); pass shared_experts=<module>"
        )


def _num_zero_experts(zero_expert_type, bias, num_experts: int) -> int:
    """Z = len(e_score_correction_bias) - E for zero-expert layers (SPEC §2), else 0."""
    if zero_expert_type is None:
        return 0
    if bias is None or bias.dim() != 1:
        raise ValueError("zero_expert_type needs e_score_correction_bias of shape [E + Z]")
    if bias.shape[0] < num_experts:
        raise ValueError(
            f"e_score_correction_bias must have length E + Z >= num_experts ({num_experts}), got {bias.shape[0]}"
        )
    return bias.shape[0] - num_experts


def _check_routing_combination(routing: dict, apply_router_weight_on_input: bool) -> None:
    """Refuse routing arguments that the router priority order would otherwise drop silently."""
    zero_expert_type, use_grouped_topk = routing["zero_expert_type"], routing["use_grouped_topk"]
    custom_fn, hash_table = routing["custom_routing_function"], routing["hash_indices_table"]
    num_expert_group, topk_group = routing["num_expert_group"], routing["topk_group"]
    scoring_func, e_score_correction_bias = routing["scoring_func"], routing["e_score_correction_bias"]
    given = {
        "zero_expert_type": zero_expert_type is not None,
        "use_grouped_topk": bool(use_grouped_topk),
        "custom_routing_function": custom_fn is not None,
        "hash_indices_table": hash_table is not None,
    }
    chosen = [name for name, on in given.items() if on]
    if len(chosen) > 1:
        raise ValueError(
            f"routing arguments {chosen} cannot be combined: each selects a different router "
            "(zero experts, grouped top-k, custom function, hash routing); pass one of them"
        )
    if custom_fn is not None and scoring_func != "softmax":
        raise ValueError(
            f"scoring_func={scoring_func!r} has no effect with custom_routing_function (the function computes "
            "the weights itself); leave scoring_func at its default"
        )
    if e_score_correction_bias is not None and (custom_fn is not None or hash_table is not None):
        picker = "custom_routing_function" if custom_fn is not None else "hash_indices_table"
        raise ValueError(f"e_score_correction_bias has no effect with {picker} (it picks the experts); pass one")
    if not use_grouped_topk and num_expert_group not in (None, 0, 1):
        raise ValueError(
            f"num_expert_group={num_expert_group} (topk_group={topk_group}) needs use_grouped_topk=True; "
            "without it the grouping would be ignored"
        )
    if zero_expert_type is not None and apply_router_weight_on_input:
        raise ValueError(
            "zero_expert_type cannot be combined with apply_router_weight_on_input=True: a masked zero-expert slot "
            "(id 0, weight 0) would still run expert 0 on 0·x and add its biases"
        )


#: the routing keywords a given ``router=`` replaces, with their FusedMoE defaults
_ROUTER_DEFAULTS = {
    "renormalize": True,
    "scoring_func": "softmax",
    "e_score_correction_bias": None,
    "routed_scaling_factor": 1.0,
    "zero_expert_type": None,
    "use_grouped_topk": False,
    "custom_routing_function": None,
    "hash_indices_table": None,
}


def _check_router_instance(router, routing: dict, *, top_k: int, num_experts: int, enable_eplb: bool) -> None:
    """A given ``router=`` decides the routing: routing keywords that differ from their defaults would be
    ignored, so they raise; so does EPLB (whose state the layer would have to hand the router)."""
    if not isinstance(router, BaseRouter):
        raise TypeError(f"router must be a moekit router (BaseRouter), got {type(router).__name__}")
    if router.top_k != top_k or router.global_num_experts != num_experts:
        raise ValueError(
            f"router has top_k={router.top_k}, global_num_experts={router.global_num_experts} but the layer was "
            f"given top_k={top_k}, num_experts={num_experts}; they must match"
        )
    ignored = [
        name for name, default in _ROUTER_DEFAULTS.items()
        if routing[name] is not default and routing[name] != default
    ]
    if ignored:
        raise ValueError(f"router= is given, so {ignored} would be ignored; configure the router instead")
    if enable_eplb:
        raise ValueError(
            "router= cannot be combined with enable_eplb=True: the layer builds the EPLB routing state and "
            "hands it to the router it creates; leave router= unset"
        )


def _default_device() -> torch.device:
    d = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
    return torch.device(d)
