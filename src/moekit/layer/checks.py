"""Argument checks of :func:`moekit.layer.build_fused_moe` (and the small helpers that build its
parallel pieces): each raises ``ValueError`` / ``TypeError`` / ``NotImplementedError`` naming the argument."""

from __future__ import annotations

import torch

from .._checks import check_int, check_tensor
from ..experts.placement import PLACEMENT_STRATEGIES
from ..parallel.setup import build_placement
from ..routing.base import BaseRouter
from ..routing.factory import check_router_selectors


def unsupported(name: str, value, why: str) -> NotImplementedError:
    return NotImplementedError(f"{name}={value!r} is not supported by this build: {why}")


def check_not_meta(device: torch.device, **tensors) -> None:
    """Routing tensors on the meta device hold no values: refused unless the layer itself is on meta."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta" and device.type != "meta":
            raise ValueError(
                f"{name} is on the meta device (it holds no values) but the layer is built on {device}; pass "
                f"{name} with its values (e.g. on {device}), or build the whole layer with device='meta'"
            )


#: selection bias of the shared slots of ``routed_shared_experts``: above any score + bias of a routed expert
_SHARED_SELECTION_BIAS = 1e9


def with_shared_slots(num_shared, num_experts, top_k, routing, device):
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


def parallel_pieces(parallel, num_experts, num_redundant, enable_eplb, ep_group, tp_group, tp_size, strategy,
                     num_expert_group, device, settings: tuple = ()):
    """(placement, EPLB state) of a parallel layer; (None, None) without parallelism (one placement
    holding every expert, made by the experts)."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"expert_placement_strategy must be one of {list(PLACEMENT_STRATEGIES)}, got {strategy!r}")
    check_int("num_redundant_experts", num_redundant, minimum=0)  # (round 51: -1 said "requires enable_eplb=True")
    if num_redundant and not enable_eplb:
        raise ValueError(f"num_redundant_experts={num_redundant} requires enable_eplb=True")
    if not parallel:
        return None, None
    return build_placement(
        num_experts=num_experts, num_redundant_experts=num_redundant, ep_group=ep_group, tp_group=tp_group,
        tp_size=tp_size, strategy=strategy, enable_eplb=enable_eplb, num_expert_group=num_expert_group,
        device=device, settings=settings,
    )


def check_unsupported(is_sequence_parallel, pcp_size, dp_size, tp_size, tp_group,
                       n_shared_experts, shared_experts) -> None:
    """Arguments this build cannot honour raise ``NotImplementedError`` naming them (SPEC §1)."""
    if is_sequence_parallel:
        raise unsupported("is_sequence_parallel", True, "sequence-parallel MoE is not implemented")
    if pcp_size not in (None, 1):
        raise unsupported("pcp_size", pcp_size, "pipeline context parallelism is not implemented")
    if dp_size not in (None, 1):
        raise unsupported("dp_size", dp_size, "data parallelism is the caller's; pass ep_group for expert parallelism")
    if tp_size not in (None, 1) and tp_group is None:
        raise unsupported("tp_size", tp_size, "tensor parallelism needs tp_group (a torch.distributed group)")
    if n_shared_experts and shared_experts is None:
        raise NotImplementedError(
            f"n_shared_experts={n_shared_experts} without shared_experts: moekit does not build shared experts "
            "itself (fused shared experts are ROCm-aiter only in the seed); pass shared_experts=<module>"
        )


def zero_expert_count(zero_expert_type, bias, num_experts: int, router=None) -> int:
    """Z = len(e_score_correction_bias) - E for zero-expert layers (SPEC §2), else 0; with a given ``router``, its
    own ``num_zero_experts`` (round 61: a ``ZeroExpertRouter`` passed as ``router=`` was taken as Z = 0, so its
    layer refused K > E and skipped the weight-on-input check)."""
    if router is not None:
        z = getattr(router, "num_zero_experts", 0)
        if isinstance(z, bool) or not isinstance(z, int) or z < 0:
            raise ValueError(f"router.num_zero_experts must be an int >= 0, got {z!r}")
        return z
    if zero_expert_type is None:
        return 0
    if bias is not None:
        check_tensor("e_score_correction_bias", bias)
    if bias is None or bias.dim() != 1:
        raise ValueError(
            "zero_expert_type needs e_score_correction_bias of shape [E + Z] (E = num_experts = "
            f"{num_experts}), got {None if bias is None else list(bias.shape)}"
        )
    if bias.shape[0] < num_experts:
        raise ValueError(
            f"e_score_correction_bias must have length E + Z >= num_experts ({num_experts}), got {bias.shape[0]}"
        )
    return bias.shape[0] - num_experts


class UnsupportedCombination(NotImplementedError, ValueError):
    """Arguments SPEC §1 defines but this build cannot honour together: ``NotImplementedError`` (SPEC §1), and a
    ``ValueError`` as before round 64 (code that caught that still does)."""


def check_routing_combination(routing: dict, apply_router_weight_on_input: bool, num_zero_experts: int = 0) -> None:
    """Refuse routing arguments that the router priority order would otherwise drop silently
    (:func:`moekit.routing.factory.check_router_selectors`), and zero experts (``zero_expert_type`` or a given
    router's ``num_zero_experts``) with the weight on the input."""
    check_router_selectors(**routing)
    if (routing["zero_expert_type"] is not None or num_zero_experts) and apply_router_weight_on_input:
        # SPEC §1 defines the result; this build cannot honour it: NotImplementedError (round 64; a ValueError too)
        raise UnsupportedCombination(
            "zero experts (zero_expert_type, or a router with num_zero_experts > 0) cannot be combined with "
            "apply_router_weight_on_input=True in this build: a masked zero-expert slot (id 0, weight 0) would still "
            "run expert 0 on 0·x and add its biases"
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


def check_router_instance(router, routing: dict, *, top_k: int, num_experts: int, enable_eplb: bool,
                          output_scale: float = 1.0) -> None:
    """A given ``router=`` decides the routing: routing keywords that differ from their defaults would be
    ignored, so they raise; so does EPLB (whose state the layer would have to hand the router). ``output_scale``:
    the factor the layer applies to the routed output (``apply_routed_scale_to_output``); a router that scales
    its weights too would apply ``routed_scaling_factor`` twice, so it raises."""
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
    router_scale = getattr(router, "routed_scaling_factor", 1.0)
    if output_scale != 1.0 and router_scale != 1.0:
        raise ValueError(
            f"apply_routed_scale_to_output=True scales the routed output by routed_scaling_factor={output_scale}, "
            f"and the given router scales its weights by routed_scaling_factor={router_scale}: the factor would apply "
            "twice; build the router with routed_scaling_factor=1.0 (SPEC §1: the router then uses 1.0)"
        )
    if enable_eplb:
        raise ValueError(
            "router= cannot be combined with enable_eplb=True: the layer builds the EPLB routing state and "
            "hands it to the router it creates; leave router= unset"
        )


def default_device() -> torch.device:
    d = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
    return torch.device(d)
