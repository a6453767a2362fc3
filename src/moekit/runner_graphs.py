"""What a runner's internal CUDA graphs may hold at all (:func:`graph_safe`), and a module swapped on a runner
(:func:`before_swap`). The graphs themselves: :mod:`moekit.experts.graphed`, :mod:`moekit.experts.graphed_plan`."""

from __future__ import annotations

import torch

from ._checks import declared_graph_safe
from .experts.executor import LocalExecutor
from .experts.routed import RoutedExperts


def graph_safe(router, experts, executor) -> bool:
    """The routed path may be captured: Triton kernels (no host syncs), no collectives, a router
    that only enqueues device work (moekit's kernels or a routing function declared graph-safe; no hash
    input-id checks, no EPLB map), and no expert output norm or one declared graph-safe (moekit's norms)."""
    norm = experts.expert_output_norm
    return (experts.backend == "triton" and isinstance(executor, LocalExecutor) and router.capturable
            and router.eplb_state is None and (norm is None or declared_graph_safe(norm)))


def before_swap(layer, name: str, value) -> None:
    """``layer.routed_experts = value`` / ``layer.router = value``, before it is set: the executor runs the new experts
    (round 64: it kept running the replaced ones, outside ``parameters()`` and ``.to()``; a parallel executor's
    experts cannot be replaced: ``ValueError``), and the graphs are dropped, kept only where the new module may be
    graphed, and bucketed as the (new) router allows (round 64: a router swapped in kept the old one's buckets)."""
    ex = layer.__dict__.get("expert_executor")
    if ex is None or not isinstance(value, torch.nn.Module):  # (being built; or torch refuses the value itself)
        return
    if name == "routed_experts" and not isinstance(value, RoutedExperts) and not isinstance(getattr(
            value, "w13_weight", None), torch.Tensor):  # (a wrapper reading through to them, e.g. torch's
        raise TypeError(  # checkpoint_wrapper, runs; round 69: PEFT's ParamWrapper failed with an AttributeError)
            f"routed_experts must be a moekit RoutedExperts, got {type(value).__name__}: a wrapper around the expert "
            "stacks (e.g. PEFT's LoRA target_parameters) is not supported on moekit layers; for LoRA on expert "
            "stacks use transformers' experts switch (moekit.integrations.transformers.register() and "
            "experts_implementation='moekit'), where PEFT wraps transformers' own stacks")
    experts = value if name == "routed_experts" else layer.routed_experts
    router = value if name == "router" else layer.router
    if name == "routed_experts" and value is not ex.experts:
        if type(ex) is not LocalExecutor:
            raise ValueError(f"routed_experts of a layer with a {type(ex).__name__} cannot be replaced (its placement "
                             f"and collectives belong to the experts it was built with): build a new layer")
        ex.experts = value
    graphs = layer.__dict__.get("_graphs")
    if graphs is not None:  # kept (off while the modules may not be graphed): a swap back turns it on again
        graphs.clear()
        graphs.off = not graph_safe(router, experts, ex)
        graphs.buckets = bool(getattr(router, "batch_invariant", False))


def graph_state(layer) -> tuple:
    """What the layer's graphs read besides their inputs (a change drops them): the routing settings, the data
    pointers of the watched modules' tensors, and the public settings and hook counts of the router (and its
    children) and of the folded modules. When it changed and the plan is stale (a child of its modules swapped or a
    hook added / removed), the plan is made again first (round 64: a folded module's new child, or a hooked one, was
    kept in the plan made for the old ones)."""
    plan = layer._graph_plan or layer._make_graph_plan()
    state = (plan.router.indices_type, getattr(plan.router, "spec", None), layer.moe_config, plan.fingerprint(),
             plan.settings())
    graphs = layer._graphs
    if graphs is not None and state != graphs._state and plan.stale():
        layer._make_graph_plan()
        return graph_state(layer)
    return state
