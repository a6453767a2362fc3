"""The router contract and the one place that owns scoring, renormalisation, scaling and the bias check.

Every router maps ``(hidden_states [T, H], router_logits [T, N]) -> (topk_weights [T, K] float32,
topk_ids [T, K] int32)``. :class:`BaseRouter` holds what all routers share (``top_k``, ``E``, the EPLB
state, the id dtype, the kernel table) and the per-call input checks; :class:`ScoredRouter` adds the
score-based math, built once by :func:`routing_spec` into a :class:`~moekit.ops.routing.TopKSpec`::

    s   = scores(logits)            softmax | sigmoid | sqrtsoftplus, float32
    ids = topk(s + bias)            (grouped: only in the topk_group best groups); ties -> lower id
    w   = s[ids]; if renormalize: w /= Σw; w *= routed_scaling_factor

A subclass implements ``_compute_routing``; routers call the kernel table (``self.kernels.route`` /
``hash_route``) and never branch on the backend's name.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch

from .._checks import check_bool, check_finite, check_int, check_same_device, check_tensor, host_sync_allowed
from ..ops.device_guard import call_on_device
from ..ops.kernels import Kernels, kernels_for
from ..ops.routing import TopKSpec, check_bias, check_gating, check_indices_type
from ..types import RoutingMethodType, RoutingResult
from .zero_output import ThreadValue, swap_zero_output, swap_zero_output_eagerly  # noqa: F401 (old pickles)

IndicesTypeGetter = Callable[[], "torch.dtype | None"]


def get_routing_method_type(
    scoring_func: str, top_k: int, renormalize: bool, num_expert_group: int | None, has_e_score_bias: bool
) -> RoutingMethodType:
    """bias and ``num_expert_group > 0`` and sigmoid -> DeepSeekV3; other biased -> Unspecified;
    sigmoid -> Llama4 when ``top_k == 1`` else Unspecified; softmax -> Renormalize if ``renormalize``
    else Default; anything else -> Unspecified (the seed's classification of a routing configuration).
    """
    if has_e_score_bias:
        if (num_expert_group or 0) > 0 and scoring_func == "sigmoid":
            return RoutingMethodType.DeepSeekV3
        return RoutingMethodType.Unspecified
    if scoring_func == "sigmoid":
        return RoutingMethodType.Llama4 if top_k == 1 else RoutingMethodType.Unspecified
    if scoring_func == "softmax":
        return RoutingMethodType.Renormalize if renormalize else RoutingMethodType.Default
    return RoutingMethodType.Unspecified


def routing_spec(
    top_k: int, num_columns: int, renormalize: bool, routed_scaling_factor: float, *, top_k_name: str = "top_k",
    **fields
) -> TopKSpec:
    """The checked :class:`TopKSpec` of a router: ``w = s[ids]; w /= Σw if renormalize; w *= scale``.

    top_k: experts per token, ``1 <= top_k <= num_columns``.
    num_columns: logit columns the router reads (``E``, or ``E + Z`` with zero experts).
    renormalize: a real ``bool`` (``TypeError`` naming it otherwise, e.g. for ``"no"``).
    routed_scaling_factor: a finite int or float > 0 (``TypeError`` for bool / str / None, ``ValueError``
        for NaN / inf / <= 0: :meth:`TopKSpec.validate` is the one check); stored as a float.
    top_k_name: ``top_k``'s name in errors (the caller's spelling: ``GroupedTopk`` takes ``topk``).
    fields: further ``TopKSpec`` fields (``scoring_func``, ``num_expert_group``, ``topk_group``).
    """
    check_bool("renormalize", renormalize)
    spec = TopKSpec(top_k, renormalize=renormalize, routed_scaling_factor=routed_scaling_factor, **fields)
    spec = spec.validate(num_columns, top_k_name=top_k_name)
    return dataclasses.replace(spec, routed_scaling_factor=float(spec.routed_scaling_factor))


class BaseRouter(torch.nn.Module):
    """``select_experts(x [T, H], logits [T, N]) -> (w [T, K] float32, ids [T, K] int32)``; with EPLB
    the logical ids are then mapped to physical replicas: ``ids = eplb_state.map_logical_to_physical(ids)``.

    top_k: experts per token (int >= 1).
    global_num_experts: ``E``, real routed experts (global, logical).
    eplb_state: an object with ``map_logical_to_physical(ids [T, K]) -> ids [T, K]`` (moekit's
        :class:`~moekit.parallel.EplbState`), given at construction, or None.
    enable_eplb: the seed's flag. ``self.enable_eplb`` is True exactly when ``eplb_state`` is given;
        ``enable_eplb=True`` without an ``eplb_state`` raises ``ValueError``.
    indices_type_getter: ``() -> torch.dtype | None``, the id dtype (int32 when it returns None).
    kernels: the kernel table (:class:`~moekit.ops.kernels.Kernels`) of the layer's backend;
        ``None`` means the torch reference table.

    A subclass implements ``_compute_routing(hidden_states, router_logits, indices_type, input_ids)
    -> RoutingResult``; ``num_logit_columns`` overrides ``N`` (default ``E``).
    """

    _unset_values: dict | None = None  # value buffers to_empty materialised and nothing wrote since (keep_bias_dtype)

    #: number of logit columns this router reads, if not ``global_num_experts``
    num_logit_columns: int | None = None
    #: ``route`` only enqueues device work (no host synchronisation, no user code): a layer may capture
    #: it in its internal CUDA graphs (:mod:`moekit.experts.graphed`). False unless a subclass knows.
    capturable: bool = False
    #: a token's routing never depends on the other rows of the batch (SPEC §9): a layer may replay it in
    #: padded token-bucket graphs (otherwise exact-T graphs only)
    batch_invariant: bool = True

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None, enable_eplb: bool = False,
                 indices_type_getter: IndicesTypeGetter | None = None, *, kernels: Kernels | None = None):
        super().__init__()
        self.top_k = check_int("top_k", top_k, minimum=1)
        self.global_num_experts = check_int("global_num_experts", global_num_experts, minimum=1)
        if eplb_state is not None and not callable(getattr(eplb_state, "map_logical_to_physical", None)):
            raise TypeError(f"eplb_state must have a map_logical_to_physical method, got {type(eplb_state).__name__}")
        check_bool("enable_eplb", enable_eplb)
        if enable_eplb and eplb_state is None:
            raise ValueError("enable_eplb=True needs eplb_state (the logical -> physical map), got None")
        if indices_type_getter is not None and not callable(indices_type_getter):
            raise TypeError(f"indices_type_getter must be callable or None, got {indices_type_getter!r}")
        if kernels is not None and not isinstance(kernels, Kernels):
            raise TypeError(f"kernels must be a moekit.ops.kernels.Kernels table or None, got {kernels!r}")
        self.eplb_state = eplb_state
        self.enable_eplb = eplb_state is not None
        self.indices_type_getter = indices_type_getter
        self.kernels = kernels if kernels is not None else kernels_for("torch")
        self._zero_expert_output = ThreadValue()  # the seed's side channel, per thread

    def _compute_routing(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                         indices_type: torch.dtype | None, input_ids: torch.Tensor | None) -> RoutingResult:
        raise NotImplementedError

    @property
    def routing_method_type(self) -> RoutingMethodType:
        """The seed's :class:`RoutingMethodType` of this router (Unspecified unless a subclass knows)."""
        return RoutingMethodType.Unspecified

    @property
    def backend(self) -> str:
        """Name of the kernel table ("torch" or "triton"), for display only."""
        return self.kernels.name

    @property
    def indices_type(self) -> torch.dtype | None:
        """The id dtype from ``indices_type_getter`` (None: int32)."""
        return self.indices_type_getter() if self.indices_type_getter is not None else None

    def route(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
              input_ids: torch.Tensor | None = None) -> RoutingResult:
        """The full :class:`RoutingResult` (the zero slots' weight sum included, no side channel).

        hidden_states: [T, H]; router_logits: [T, N] float, same device; input_ids: [T] int (hash routing). The
        kernels run on the current CUDA device: :meth:`forward` / :meth:`select_experts` make ``hidden_states``'
        device current first (the layer's forward did already for its call of ``route``).
        """
        check_tensor("hidden_states", hidden_states)
        if hidden_states.dim() != 2:  # (round 63: [B, 1, H] broadcast the zero experts' term into [B, B, H])
            raise ValueError(f"hidden_states must have shape [T, H], got {list(hidden_states.shape)}")
        if not hidden_states.is_floating_point():  # (round 64: zero experts' term of int hidden states was 0s)
            raise TypeError(f"hidden_states must be a float tensor, got {hidden_states.dtype}")
        check_gating(router_logits, hidden_states.shape[0], self.num_logit_columns or self.global_num_experts)
        check_same_device("router_logits", router_logits, "hidden_states", hidden_states)
        indices_type = self.indices_type
        check_indices_type(indices_type)
        if self._unset_values:  # (to_empty from meta: never loaded since)
            if host_sync_allowed():
                check_values_set(self)
            elif torch.compiler.is_compiling():  # (a graph break: fullgraph needs a load or one eager forward first)
                check_values_set_eagerly(self)
            elif names := [n for n, (t, _) in self._unset_values.items() if self._buffers.get(n) is t]:
                raise RuntimeError(f"{type(self).__name__}: {', '.join(names)} came from to_empty and no load wrote "
                                   "it (an in-place write is seen by an eager call): load it (load_state_dict / "
                                   "load_weights), or run one eager forward, before capturing (round 68)")
        result = self._compute_routing(hidden_states, router_logits, indices_type, input_ids)
        if self.eplb_state is not None:
            ids = self.eplb_state.map_logical_to_physical(result.topk_ids)
            result = RoutingResult(result.topk_weights, ids, result.zero_scale)
        return result

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
                input_ids: torch.Tensor | None = None) -> RoutingResult:
        """``router(hidden_states, router_logits)``: :meth:`route`. A layer calls ``route`` itself (no module call
        on its hot path), so forward hooks on a layer's router run only for such direct calls (registering one
        warns: :meth:`register_forward_hook`). Runs on the CUDA device of ``hidden_states`` (made current where another
        one is: round 69, :mod:`moekit.ops.device_guard`), as :meth:`select_experts` does."""
        return call_on_device(hidden_states, self.route, hidden_states, router_logits, input_ids=input_ids)

    def register_forward_hook(self, hook, *args, **kwargs):
        _warn_hook("register_forward_hook")
        return super().register_forward_hook(hook, *args, **kwargs)

    def register_forward_pre_hook(self, hook, *args, **kwargs):
        _warn_hook("register_forward_pre_hook")
        return super().register_forward_pre_hook(hook, *args, **kwargs)

    def select_experts(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
                       input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_weights: [T, K] float32, topk_ids: [T, K] int32 (zero-expert slots already masked); on the CUDA
        device of ``hidden_states`` (:meth:`forward`)."""
        result = call_on_device(hidden_states, self.route, hidden_states, router_logits, input_ids=input_ids)
        zero = result.zero_contribution(hidden_states)
        value = zero.to(hidden_states.dtype) if zero is not None else None
        if value is not None or hasattr(type(self), "zero_expert_output"):  # (only zero-expert routers have a reader:
            # the others' compiled select_experts keep no graph break, review of round 68)
            (swap_zero_output_eagerly if torch.compiler.is_compiling() else swap_zero_output)(self, value)
        return result.topk_weights, result.topk_ids

    def zero_output_holder(self) -> "ThreadValue":
        """This router's per-thread zero-expert output (a router pickled before round 67 held a dict by thread id)."""
        holder = self.__dict__.get("_zero_expert_output")
        if not isinstance(holder, ThreadValue):
            holder = self.__dict__["_zero_expert_output"] = ThreadValue()
        return holder

    def forget_written_values(self) -> list[str]:
        """:func:`forget_written_values` (loads call it)."""
        return forget_written_values(self)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, global_num_experts={self.global_num_experts}, backend={self.backend!r}"


def _warn_hook(what: str) -> None:
    """Round 64: a hook on ``layer.router`` never fired (the layer calls ``router.route``, not the module)."""
    warnings.warn(f"router.{what}: a moekit layer calls its router's route() directly, not the module, so this hook "
                  f"runs only when the router itself is called (router(x, logits)). To observe a layer's routing use "
                  f"layer.forward_with_scores(...) or a hook on layer.gate (the logits).", UserWarning, stacklevel=3)


#: a router's value buffers (given at construction): NaN / -1 after ``to_empty`` until loaded
_VALUE_BUFFERS = {"e_score_correction_bias": math.nan, "hash_indices_table": -1}


def keep_bias_dtype(self, fn, recurse=True):
    """``nn.Module._apply`` of a module holding a selection bias buffer ``e_score_correction_bias``: ``Module.to`` /
    ``.half()`` move the bias but keep its dtype (SPEC §8: a selection bias is never rounded to bf16;
    ``model.to(torch.bfloat16)`` changed the choices of DeepSeek-V3-like biases otherwise). Use as ``_apply =
    keep_bias_dtype`` in the class body.

    A value buffer whose values an ``_apply`` did not keep (``to_empty``: uninitialised memory, from meta or not) is
    filled with NaN / -1 and recorded: :meth:`BaseRouter.route` raises until it is written (round 66: a layer built
    on meta routed with whatever memory ``to_empty`` left in its selection bias once its expert weights were loaded)."""
    before = {n: self._buffers.get(n) for n in _VALUE_BUFFERS}
    kept = {n: t.detach().cpu().clone() for n, t in before.items() if t is not None and not t.is_meta}  # (small)
    bias = before["e_score_correction_bias"]
    out = torch.nn.Module._apply(self, fn, recurse)
    moved = self._buffers.get("e_score_correction_bias")
    if bias is not None and moved is not None and moved.dtype != bias.dtype:
        self._buffers["e_score_correction_bias"] = bias.to(device=moved.device)
    for name, old in before.items():
        new = self._buffers.get(name)
        if old is None or new is None or new.is_meta or new is old:
            continue
        if name in kept and torch.equal(new.detach().cpu(), kept[name].to(new.dtype)):
            continue  # a device move: the values came along
        with torch.no_grad():
            new.fill_(_VALUE_BUFFERS[name])
        self._unset_values = {**(self._unset_values or {}), name: (new, _version(new))}
    return out


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def check_values_set(router) -> None:
    """``RuntimeError`` naming the value buffers materialised by ``to_empty`` (:func:`keep_bias_dtype`) that nothing
    wrote since: an assignment replaces them, a load copies into them (bumping their version; else, through ``.data``
    or into an inference tensor, found by their values: still all NaN / -1, one host read while so marked)."""
    unset = forget_written_values(router)
    if unset:
        raise RuntimeError(f"{type(router).__name__}: {', '.join(unset)} came from to_empty (uninitialised memory) and "
                           "was never loaded; load a state dict (layer.load_state_dict), the tensor "
                           "(layer.load_weights([('router.e_score_correction_bias', bias)]); router.hash_indices_table "
                           "likewise), or assign it, before a forward")


def check_not_meta(router) -> None:
    """``RuntimeError`` where a value buffer is still on meta at a forward on real tensors: a meta-built layer loaded
    with ``assign=True, strict=False`` from a state dict saved before round 48 (round 69: blamed a device mismatch)."""
    names = [n for n in _VALUE_BUFFERS if (t := router._buffers.get(n)) is not None and t.is_meta]
    if names:
        raise RuntimeError(
            f"{type(router).__name__}: {', '.join(names)} is on the meta device: it was never loaded (a state dict "
            "saved before round 48 lacks router.e_score_correction_bias / router.hash_indices_table); assign it before "
            "a forward (layer.router.e_score_correction_bias = bias, the table likewise), or build the layer on a "
            "real device with the bias / table given to it and load that state dict with strict=False")


#: :func:`check_values_set` run eagerly from compiled code (it reads versions and values: round 68)
check_values_set_eagerly = torch._disable_dynamo(check_values_set)  # (lazy: importing dynamo imports triton)


def forget_written_values(router) -> list[str]:
    """Drop the value buffers written since ``to_empty`` from ``router``'s record (host reads); return the names still
    unwritten. Loads call it (round 68: only an eager forward did, and a compiled one cannot: ``torch.compile`` of a
    layer built on meta and loaded failed until one eager forward had run)."""
    if not router._unset_values:
        return []

    def unwritten(name, t, v) -> bool:
        if v is not None and _version(t) != v:
            return False
        fill = _VALUE_BUFFERS[name]
        return bool(torch.isnan(t).all() if t.is_floating_point() and math.isnan(fill) else (t == fill).all())

    # a buffer other than the recorded one (assigned, or swapped in for one call by functional_call) is not refused,
    # and the record stays (round 67: a functional_call supplying the bias dropped it, and the layer's own unset bias
    # then routed to a misleading "non-finite values" error)
    swapped = {n: tv for n, tv in router._unset_values.items() if router._buffers.get(n) is not tv[0]}  # (no read)
    unset = {n: (t, v) for n, (t, v) in router._unset_values.items() if n not in swapped and unwritten(n, t, v)}
    router._unset_values = {**swapped, **unset} or None
    return list(unset)


def warn_bias_dtype(router, dtype: torch.dtype) -> None:
    """Once per router: its selection bias changed dtype since construction. :func:`keep_bias_dtype` keeps the
    router's own ``.to()`` from rounding it, but a bias shared with another module (vLLM's
    ``e_score_correction_bias=self.gate.e_score_correction_bias``, and :func:`moekit.integrations.transformers.patch`)
    follows its owner's ``.to()`` (round 64: ``model.to(torch.bfloat16)`` changed DeepSeek-V3-like choices silently).
    A warning, not an error: the bias is the model's own, and the unpatched model computes with it too."""
    if getattr(router, "_bias_dtype_warned", None) == dtype or router._bias_dtype is None or \
            dtype.itemsize >= router._bias_dtype.itemsize:  # (wider: nothing was rounded)
        return
    router._bias_dtype_warned = dtype
    warnings.warn(f"{type(router).__name__}: the selection bias e_score_correction_bias is now {dtype}; it was "
                  f"{router._bias_dtype} when the router was built. Something outside the router converted it (a "
                  f".to() of the module that shares the tensor, e.g. the gate owning it, or an assigning load), and a "
                  f"rounded bias can change which experts are chosen. Keep it float32: after converting the model, put "
                  f"the checkpoint's bias back (router.e_score_correction_bias.data = bias.float(), or an assigning "
                  f"load).",
                  UserWarning, stacklevel=3)


class ScoredRouter(BaseRouter):
    """Score-based routing (module docstring math): ``s = scores(logits)``, ``ids = topk(s + bias)``,
    ``w = s[ids]``, renormalised, scaled — the one place that builds the spec and checks the bias.

    top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels: see :class:`BaseRouter`.
    scoring_func: "softmax", "sigmoid" or "sqrtsoftplus" (``sqrt(softplus(logits))``).
    renormalize: bool, ``w /= Σw``. routed_scaling_factor: finite float > 0 applied after renormalising.
    e_score_correction_bias: [N] float, finite, the selection bias (weights stay unbiased), or None.
    num_expert_group, topk_group: grouping (1, 1 = ungrouped); see :class:`GroupedTopKRouter`.
    num_columns: ``N``, the logit columns (default ``E``).
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state=None, enable_eplb: bool = False,
                 indices_type_getter: IndicesTypeGetter | None = None, *, kernels: Kernels | None = None,
                 scoring_func: str = "softmax", renormalize: bool = True, routed_scaling_factor: float = 1.0,
                 e_score_correction_bias: torch.Tensor | None = None, num_expert_group: int = 1,
                 topk_group: int = 1, num_columns: int | None = None):
        super().__init__(top_k, global_num_experts, eplb_state, enable_eplb, indices_type_getter, kernels=kernels)
        columns = num_columns if num_columns is not None else self.global_num_experts
        self.spec = routing_spec(top_k, columns, renormalize, routed_scaling_factor, scoring_func=scoring_func,
                                 num_expert_group=num_expert_group, topk_group=topk_group)
        self.kernels.check_route(columns, self.spec.top_k)
        if e_score_correction_bias is not None:
            check_bias(e_score_correction_bias, columns)
            check_finite("e_score_correction_bias", e_score_correction_bias)
        self.register_buffer("e_score_correction_bias", e_score_correction_bias)  # in state_dict (round 48)
        self._bias_dtype = None if e_score_correction_bias is None else e_score_correction_bias.dtype

    _apply = keep_bias_dtype
    #: the bias dtype at construction (:func:`warn_bias_dtype`); None for a router pickled before round 64 (round 69)
    _bias_dtype: torch.dtype | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # a state dict's selection bias is checked as the constructor's (round 53: a NaN one loaded silently)
        bias = state_dict.get(prefix + "e_score_correction_bias")
        if isinstance(bias, torch.Tensor) and self.e_score_correction_bias is not None:
            check_finite(f"{prefix}e_score_correction_bias (state dict)", bias)
        super()._load_from_state_dict(state_dict, prefix, *args)
        forget_written_values(self)

    # the spec is the one store of these settings; the seed's attribute names read it
    scoring_func = property(lambda self: self.spec.scoring_func, doc='"softmax", "sigmoid" or "sqrtsoftplus"')
    renormalize = property(lambda self: self.spec.renormalize, doc="w /= Σw before scaling")
    routed_scaling_factor = property(lambda self: self.spec.routed_scaling_factor, doc="w *= this, last")
    num_expert_group = property(lambda self: self.spec.num_expert_group, doc="G (1: ungrouped)")
    topk_group = property(lambda self: self.spec.topk_group, doc="groups kept (1: ungrouped)")

    @property
    def capturable(self) -> bool:
        """On a kernel table that checks no values (Triton): no host synchronisation in ``route``."""
        return not self.kernels.checks_values

    @property
    def routing_method_type(self) -> RoutingMethodType:
        # a hash router's ids are no top-k of scores: classified as biased (Unspecified), as vLLM's bias router does
        has_bias = self.e_score_correction_bias is not None or getattr(self, "hash_indices_table", None) is not None
        return get_routing_method_type(self.scoring_func, self.top_k, self.renormalize, None, has_bias)

    def _scored_route(self, router_logits: torch.Tensor,
                      indices_type: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [T, K] float32, ids [T, K]) from the kernel table; inputs checked, rows unit-stride."""
        bias = self.e_score_correction_bias
        if bias is not None:
            if bias.is_meta and not router_logits.is_meta:  # (never loaded: round 69)
                check_not_meta(self)
            check_same_device("e_score_correction_bias", bias, "router_logits", router_logits)
            if bias.dtype != self._bias_dtype and not torch.compiler.is_compiling():
                warn_bias_dtype(self, bias.dtype)
            bias = bias.contiguous()
        return self.kernels.route(router_logits.contiguous(), self.spec, bias, indices_type)

    def _compute_routing(self, hidden_states, router_logits, indices_type, input_ids) -> RoutingResult:
        return RoutingResult(*self._scored_route(router_logits, indices_type))
