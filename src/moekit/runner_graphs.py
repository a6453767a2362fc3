"""What a runner's internal CUDA graphs may hold at all (:func:`graph_safe`), and a module swapped on a runner
(:func:`before_swap`). The graphs themselves: :mod:`moekit.experts.graphed`, :mod:`moekit.experts.graphed_plan`."""

from __future__ import annotations

from ._checks import declared_graph_safe
from .experts.executor import LocalExecutor


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
    if ex is None:  # (being built)
        return
    experts = value if name == "routed_experts" else layer.routed_experts
    router = value if name == "router" else layer.router
    if name == "routed_experts" and value is not ex.experts:
        if type(ex) is not LocalExecutor:
            raise ValueError(f"routed_experts of a layer with a {type(ex).__name__} cannot be replaced (its placement "
                             f"and collectives belong to the experts it was built with): build a new layer")
        ex.experts = value
    graphs = layer.__dict__.get("_graphs")
    if graphs is not None:
        graphs.clear()
        if not graph_safe(router, experts, ex):
            layer.__dict__["_graphs"] = None
        graphs.buckets = bool(getattr(router, "batch_invariant", False))
