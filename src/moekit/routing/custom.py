"""CustomRoutingRouter: a user function decides ids and weights; moekit checks and scales them."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from .._checks import check_callable, check_finite, check_same_device, declared_graph_safe, host_sync_allowed
from ..ops.experts import check_ids_in_range
from ..ops.routing import LOGITS_HINT
from ..ops.kernels import Kernels
from ..types import RoutingMethodType, RoutingResult
from .base import BaseRouter, IndicesTypeGetter, routing_spec


_KEYWORDS = ("hidden_states", "gating_output", "topk", "renormalize")


def by_keyword(fn) -> bool:
    """How to call a routing function: positionally ``(hidden_states, router_logits, top_k, renormalize)`` where
    its signature takes four positional arguments (as before round 64: a module's hooks see them), else by the seed's
    names ``hidden_states=, gating_output=, topk=, renormalize=`` as vLLM calls it (keyword-only functions, and
    ``functools.partial(f, renormalize=...)`` whose positional call gave "multiple values"); a signature that takes
    neither raises ``TypeError`` at construction. Modules are read by their ``forward`` (also under a ``partial`` or
    ``torch.compile``)."""
    target = getattr(fn, "_orig_mod", fn)  # torch.compile(module)
    if isinstance(target, functools.partial) and isinstance(target.func, torch.nn.Module):
        target = functools.partial(target.func.forward, *target.args, **target.keywords)
    elif isinstance(target, torch.nn.Module):
        target = target.forward
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (some builtins): positional, as before
        return False
    for keyword, args, kwargs in ((False, _KEYWORDS, {}), (True, (), dict.fromkeys(_KEYWORDS))):
        try:
            sig.bind(*args, **kwargs)
            return keyword
        except TypeError:
            pass
    raise TypeError(f"custom_routing_function must take (hidden_states, gating_output, topk, renormalize), by "
                    f"keyword or as 4 positional arguments; {getattr(fn, '__name__', type(fn).__name__)} takes {sig}")


class CustomRoutingRouter(BaseRouter):
    """``(w, ids) = custom_routing_function(hidden_states, router_logits, top_k, renormalize)``, then
    ``w = float32(w) · routed_scaling_factor`` and ``ids`` cast to int32 (or ``indices_type``). The
    function decides everything else (renormalising is its job; it receives the flag). Example: Llama 4,
    ``ids = topk(logits)``, ``w = sigmoid(logits[ids])``, with ``apply_router_weight_on_input=True``.

    top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels: see :class:`BaseRouter`.
    custom_routing_function: ``(hidden_states [T, H], gating_output [T, E], topk: int, renormalize: bool)
        -> (topk_weights [T, K] float, topk_ids [T, K] int)``; required. Called positionally where it takes four
        positional arguments, else by those keyword names, as vLLM calls it (:func:`by_keyword`).
    renormalize: bool (default True), passed to the function.
    routed_scaling_factor: finite float > 0, multiplies the returned weights (the seed ignored it).

    Internal CUDA graphs (:mod:`moekit.experts.graphed`): a layer graphs this router's calls only when the
    function declares ``_moekit_graph_safe = True`` (on the function, the ``functools.partial``'s function,
    or a module's own class): it only enqueues device work (no host synchronisation, no ``.item()``, no
    Python state that changes per call) and reads its tensors by address. moekit's named routings do
    (:mod:`moekit.loading.routings`: Llama 4, PhiMoE, DBRX, Gemma 4, Kolibri, LFM2-MoE). Such graphs are exact-``T``
    only (``T <= 8``): a torch function's rows are not promised to be batch invariant (``batch_invariant``
    is False), so no padded token bucket is used.

    Checks: the returned pair must have shape ``[T, K]`` and integer ids (always). On the reference
    path (``kernels.checks_values``, the torch table) non-finite logits, non-finite returned weights
    and ids outside ``[0, E)`` raise ``ValueError`` (host synchronisations). On the kernel path these
    value checks are skipped: NaN / inf weights propagate into the layer output (the expert kernels
    multiply by them), and an id outside ``[0, E)`` becomes -1, a dead slot that adds nothing (also under EP).
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None,
                 custom_routing_function: Callable | None = None, renormalize: bool = True,
                 enable_eplb: bool = False, indices_type_getter: IndicesTypeGetter | None = None,
                 routed_scaling_factor: float = 1.0, *, kernels: Kernels | None = None):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        if custom_routing_function is None:
            raise TypeError("custom_routing_function must be a callable, got None")
        check_callable("custom_routing_function", custom_routing_function)
        spec = routing_spec(top_k, self.global_num_experts, renormalize, routed_scaling_factor)
        self.custom_routing_function = custom_routing_function
        self._call_style = (custom_routing_function, by_keyword(custom_routing_function))
        self.renormalize = spec.renormalize
        self.routed_scaling_factor = spec.routed_scaling_factor

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    @property
    def capturable(self) -> bool:
        """A kernel table that checks no values and a function that declares itself graph-safe."""
        return not self.kernels.checks_values and declared_graph_safe(self.custom_routing_function)

    #: a token's ids and weights may depend on the batch's row count (torch ops: no promise)
    batch_invariant = False

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        reference = self.kernels.checks_values
        if reference:
            check_finite("router_logits", router_logits, LOGITS_HINT)  # (round 68: the other routers' hint)
        fn = self.custom_routing_function
        if self._call_style[0] is not fn:  # the attribute was reassigned
            self._call_style = (fn, by_keyword(fn))
        if self._call_style[1]:
            out = fn(hidden_states=hidden_states, gating_output=router_logits, topk=self.top_k,
                     renormalize=self.renormalize)
        else:
            out = fn(hidden_states, router_logits, self.top_k, self.renormalize)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"custom_routing_function must return (topk_weights, topk_ids), got {type(out).__name__}")
        weights, ids = out
        t = router_logits.shape[0]
        for name, v in (("topk_weights", weights), ("topk_ids", ids)):
            if not isinstance(v, torch.Tensor):  # (round 63: a ValueError)
                raise TypeError(f"custom_routing_function returned {name} of type {type(v).__name__}, expected a "
                                f"torch.Tensor [{t}, {self.top_k}]")
            if tuple(v.shape) != (t, self.top_k):
                shape = list(v.shape)
                raise ValueError(f"custom_routing_function returned {name} {shape}, expected [{t}, {self.top_k}]")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"custom_routing_function returned topk_ids of dtype {ids.dtype}; expected integers")
        if not weights.is_floating_point():
            raise TypeError(f"custom_routing_function returned topk_weights of dtype {weights.dtype}; expected a float "
                            f"tensor")
        for name, v in (("topk_weights", weights), ("topk_ids", ids)):  # (round 64: torch's device error, or a layer
            check_same_device(f"{name} returned by custom_routing_function", v, "router_logits", router_logits)
        if ids.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no comparisons on CPU (round 64: the range
            ids = ids.long()  # check raised NotImplementedError for uint32 ids)
        weights = weights.float()
        if reference:
            check_finite("topk_weights returned by custom_routing_function", weights)
            check_ids_in_range(ids, self.global_num_experts)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
            if reference and host_sync_allowed():  # (round 66: finite weights past float32's range once scaled
                # reached the output as inf; round 68: not while compiling, whose symbolic float the name cannot hold)
                check_finite(f"topk_weights returned by custom_routing_function times routed_scaling_factor="
                             f"{self.routed_scaling_factor}", weights)
        out = indices_type or torch.int32
        if not reference:  # ids outside [0, E) are dead slots (-1), device-only: no host read. Round 61: an id of
            # 2^32 + e wrapped to expert e in the int32 cast; round 64: an int32 id >= E raised IndexError under EP
            # (decided: the mask on every kernel-path call, four small ops, over an unchecked id reaching the EP maps)
            if torch.iinfo(ids.dtype).bits > torch.iinfo(out).bits:
                ids = ids.long()
            ids = torch.where((ids < 0) | (ids >= self.global_num_experts), -1, ids)
        return RoutingResult(weights, ids.to(out))
