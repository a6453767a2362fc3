"""What a layer's internal CUDA graphs may hold, and the layer side of a replay (issue #11 item 1).

    whole:   out = forward(hidden_states, router_logits | None)     checks, gate, route, experts, shared,
                                                                     reshape, dtype cast: one graph per key
                                                                     (T <= 8, exact)
    partial: routed = route_and_experts(x, logits)                   user modules (and, above T = 8, the
             routed = gate_route_and_experts(x)                      gate and shared experts) run eagerly
                                                                     around it; graphs per token bucket; a
                                                                     batch-invariant gate runs inside

A **whole** graph replays the layer's entire forward, so a call whose inputs match a captured key costs
the host: the key lookup, :meth:`GraphPlan` state check, one input copy op (``copy_`` or
``torch._foreach_copy_`` for ``(hidden_states, router_logits)``), ``graph.replay()`` and one ``clone``
of the static output (a public forward must return a fresh tensor: the next replay overwrites the
static one, and a graph writes to fixed addresses, so the copy stays). The key is ``(shape, dtype,
device)`` of ``hidden_states`` and of ``router_logits`` (or None): every input check of the forward
depends on these and the layer's state only (the Triton path checks no values), so the first, checked,
eager call of a key validates every later call of that key, and replays skip the checks.

The fold rule: a graph captures only moekit's own code or exact ``torch.nn.Linear`` modules, never an
arbitrary user module (it may keep CPU state, synchronise, or change per call). A layer is captured
whole when

- ``routed_input_transform``, ``routed_output_transform`` and ``final_output_transform`` are None;
- ``shared_experts`` is None, or a module whose own class declares ``_moekit_graph_safe = True``
  (moekit's :class:`~moekit.loading.modules.SharedMLP`; a subclass must declare it again) whose
  children are exact ``nn.Linear`` modules or declare it too (its output ``RMSNorm``), and
  ``shared_expert_gate`` is None or an exact ``nn.Linear``;
- for calls without ``router_logits``, the ``gate`` is an exact ``nn.Linear`` or declares
  ``_moekit_graph_safe`` (moekit's :class:`~moekit.loading.modules.RouterLinear`) (other gates: the partial graph, gate run eagerly);
- no forward hooks are registered on those modules (checked in the state), and, when a gate or shared
  expert is folded, CUDA autocast is off (its dtype choices would be baked into the graph);
- no autograd is wanted: grad disabled, or neither an input nor a folded parameter requires grad (a
  plain ``nn.Linear`` weight does: fold it under ``torch.no_grad()`` / ``inference_mode()`` or after
  ``requires_grad_(False)``, as transformers' ``generate`` does).

Otherwise the partial graph (route -> experts) is used as before. The partial graphs start at the gate
(``x`` their one input: no logits copy, no eager gate launch before the replay) for calls without
``router_logits`` when the gate is **batch invariant** (:attr:`GraphPlan.bucket_gate`: a graph-safe gate
class with a ``batch_invariant`` attribute, true now: moekit's ``RouterLinear`` on its Triton backend) and
reads the routed input; a padded bucket then runs the gate on its padding rows too, and a real row's logits
are the bits of the plain call's (a cuBLAS ``nn.Linear`` gives no such promise, so it stays outside). A later
call of an input key (shape, dtype, device of ``hidden_states``, and of ``router_logits`` when passed) that a
bucket graph already served goes straight to it (:func:`replay_bucket`, as whole graphs do; up to
:data:`~moekit.experts.graphed.DIRECT_KEYS` keys per layer, later keys stay on the checked path): only autograd,
autocast, an outer capture and the state are checked again, then the layer's tail (shared experts, transforms)
runs as usual. H200, transformers' blocks patched, eager: the gate inside (round 22) DeepSeek-V3 1x1024
6.05 -> 5.79 ms, Qwen3-30B-A3B 64x1 0.397 -> 0.368 ms (``benchmarks/results/transformers-NVIDIA_H200-2026-12-01-r22*``);
the direct replay (round 23, A/B in one run: ``NVIDIA_H200-2026-12-01-r23-ab-*``) Qwen3-30B-A3B 64x1 0.375 ->
0.348 ms, DeepSeek-V3 1x1024 5.96 -> 5.87 ms.

**Routing weights beside the output** (``forward_with_scores``: transformers' gpt-oss block returns
``(hidden, router_scores)``): the same bucket graphs (gate inside or not), keyed apart (``tag="scores"``), return
both through their one output, the weights' float32 bits as ``2K`` extra columns of the output's 16-bit dtype
(:func:`pack_scores`, :func:`unpack_scores`: one copy each after the replay), so a call routes once; later calls
of a checked input key replay directly as the forward's do (their direct keys tagged apart); elsewhere the same ops
run eagerly. Invalidation: :meth:`GraphPlan.watched`
lists the modules whose parameter/buffer addresses and children are compared at every replay
(:func:`~moekit.experts.graphed.watched_fingerprint`: a few ``data_ptr()`` reads, no generators), with
the routing settings and the public attributes of folded modules; a reassignment on the layer itself
(``layer.gate = ...``) drops the plan and the graphs. A tensor re-viewed to another shape or dtype at the
same address (``w.data = w.view(...)``) is not detected: call ``layer._graphs.clear()`` after such edits.
"""

from __future__ import annotations

from operator import itemgetter

import torch

from .._checks import declared_graph_safe
from .graphed import (GraphCache, inputs_want_grad, pack_scores, tensor_key, unpack_scores,  # noqa: F401
                      watched_fingerprint)

_Linear = torch.nn.Linear


class GraphPlan:
    """whole_logits: a call with router_logits may be captured whole; whole_gate: one without them
    (the gate is folded); folded: the user-facing modules inside the whole graph; watched: modules
    whose tensors the graphs read by address."""

    __slots__ = ("whole_logits", "whole_gate", "folded", "watched", "router", "bucket_gate", "inner", "_tensors",
                 "_children", "_configured", "_readers", "_hooks", "_dicts", "_layout", "blocked")

    def __init__(self, whole_logits: bool, whole_gate: bool, folded: tuple, watched: tuple, router=None,
                 bucket_gate=None, inner: tuple = (), parents: tuple = (), idle: tuple = ()):
        # the gate the route -> experts graphs may hold (when batch invariant): watched like a folded module
        extra = (bucket_gate,) if bucket_gate is not None and bucket_gate not in folded else ()
        self.whole_logits, self.whole_gate, self.folded = whole_logits, whole_gate, folded
        self.watched = watched + extra
        self.router = router  # the layer's, read here without nn.Module.__getattr__
        self.bucket_gate = bucket_gate
        self.inner = inner  # user-facing modules inside every graph of the routed path (an expert output norm)
        # stable dict objects; the bucket gate's too (round 64: its weight replaced was not seen)
        self._tensors = tuple(d for m in self.watched for d in (m._parameters, m._buffers))
        # children whose identity the graphs bake in: the folded and inner modules', ``parents``' (the routed
        # experts: a norm swapped there) and the router's (round 64: a routing-function module swapped was not seen)
        routing = tuple(router.modules())[1:] if router is not None else ()  # (hooks on the router never run)
        self._children = tuple(m._modules for m in (*folded, *inner, *parents, *routing,
                                                   *((router,) if router is not None else ())))
        # forward (pre-)hooks of every module a graph runs: a module with hooks is never folded (graph_plan), and a
        # hook on a module every graph runs (the experts, their norm, a routing module) keeps the graphs off
        # (``blocked``): a replay would skip it (round 64: hooks ran at capture only)
        inside = (*parents, *inner, *routing)
        self._hooks = tuple(d for m in (*inside, *folded, *extra) for d in (m._forward_hooks, m._forward_pre_hooks))
        self._dicts = tuple(m.__dict__ for m in (*inside, *folded, *extra))  # (a forward wrapped there: round 69)
        self.blocked = any(_hooked(m) for m in inside)
        self._layout = self.layout()
        # modules whose plain attributes a graph bakes in: the router (a routing function's settings, its
        # scaling factor) and its children, the folded modules and the inner ones
        self._configured = (*(router.modules() if router is not None else ()), *folded, *extra, *inner, *idle)
        self._readers = _settings_readers(self._configured)

    def usable(self, experts) -> bool:
        """Graphs may run now (read live, cheaply): no hook on a module every graph runs (the experts, their norm,
        the router's children), the output norm declared graph-safe (round 64: a user norm swapped in was captured)."""
        norm = experts._modules.get("expert_output_norm")  # (the dict: nn.Module.__getattr__ costs ~0.5 us)
        if self.blocked or _hooked(experts) or (norm is not None and (_hooked(norm) or not declared_graph_safe(norm))):
            return False
        return not any(m is not None and _hooked(m) for m in self.router._modules.values())

    def fingerprint(self) -> tuple:
        """Data pointers of the watched tensors, identity of the folded modules' children."""
        return watched_fingerprint(self._tensors, self._children)

    def layout(self) -> tuple:
        """What the plan itself was decided from: the children of its modules and their hooks (by handle id: a hook
        removed and another added is a change)."""
        return (tuple(m for d in self._children for m in d.values()), tuple(tuple(d) for d in self._hooks),
                tuple("forward" in d for d in self._dicts))

    def stale(self) -> bool:
        """A child swapped or a hook added / removed since the plan was made: the fold rule must run again (round 64:
        a folded module's new child, or a non-graph-safe norm, was kept in a plan made for the old one)."""
        return self.layout() != self._layout

    @property
    def folds(self) -> bool:
        return bool(self.folded)

    def gate_in_bucket(self) -> bool:
        """The route -> experts graphs may start at the gate: it is batch invariant now, autocast is off and no
        autograd is wanted through its parameters (the caller checked the inputs: :meth:`GraphCache.eligible`)."""
        g = self.bucket_gate
        if g is None or not g.batch_invariant or _autocast():
            return False
        return not (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in g._parameters.values()))

    def whole(self, router_logits) -> bool:
        if router_logits is None:
            return self.whole_gate
        return self.whole_logits and type(router_logits) is torch.Tensor

    def wants_grad(self, hidden_states, router_logits) -> bool:
        """Autograd would track the plain call (its caller checked that grad is enabled): an input or a folded
        parameter requires grad."""
        if inputs_want_grad(hidden_states, router_logits):
            return True
        return any(p is not None and p.requires_grad for m in (*self.folded, *self.inner) for p in m._parameters.values())

    def settings(self) -> tuple:
        """Public attributes and hook counts of the router, its children and the folded modules (a change
        drops the graphs: e.g. a routing function replaced, or a custom router's scaling factor). The
        attribute names are read once (:func:`_settings_readers`) and again when a module's ``__dict__``
        changes size (an attribute added or deleted): a call reads the values by one ``itemgetter`` per module."""
        try:
            out = tuple((len(d), _plain(get(d)), len(fh), len(fph)) for d, n, get, fh, fph in self._readers
                        if len(d) == n)
            if len(out) == len(self._readers):
                return out
        except KeyError:  # a public attribute deleted and another added (same size)
            pass
        self._readers = _settings_readers(self._configured)
        return tuple((len(d), _plain(get(d)), len(fh), len(fph)) for d, n, get, fh, fph in self._readers)


_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, torch.nn.Buffer))


def _plain(values: tuple) -> tuple:  # settings as compared: a tensor attribute by its identity and address (round 64:
    # == of two tensors raised "Boolean value of Tensor ... is ambiguous"; equal one-element tensors hid a new address)
    if _TENSOR_TYPES.isdisjoint(map(type, values)):  # (C-level: the common case costs ~0.1 us per module)
        return values
    return tuple((id(v), v.data_ptr()) if isinstance(v, torch.Tensor) else v for v in values)


def _settings_readers(modules) -> tuple:  # per module: (__dict__, its size, getter of its public attributes but
    # training, forward hooks, forward pre-hooks) for GraphPlan.settings
    out = []
    for m in modules:
        d = m.__dict__
        keys = [k for k in d if k[0] != "_" and k != "training"]
        get = _nothing if not keys else itemgetter(*keys) if len(keys) > 1 else _one(keys[0])
        out.append((d, len(d), get, m._forward_hooks, m._forward_pre_hooks))
    return tuple(out)


def _nothing(_d) -> tuple:
    return ()


def _one(key):  # a getter of one attribute as a 1-tuple (itemgetter of one key gives the bare value)
    return lambda d: (d[key],)


def _exact_linear(m) -> bool:  # an exact torch.nn.Linear (a subclass may do anything in forward)
    return type(m) is _Linear


def _safe_module(m) -> bool:  # a module whose own class declares _moekit_graph_safe (RouterLinear, SharedMLP: plain
    # torch ops on their own weights, no host state); a plain function never folds (no tensors to watch)
    return isinstance(m, torch.nn.Module) and declared_graph_safe(m)


def _hooked(m) -> bool:  # forward (pre-)hooks on module m, or its forward wrapped on the instance (accelerate's hooks:
    # round 69): never folded, and graphs stay off where every graph runs it (a replay would skip it)
    return bool(m._forward_hooks or m._forward_pre_hooks) or "forward" in m.__dict__


def gate_foldable(gate) -> bool:
    """An exact ``nn.Linear`` or moekit's ``RouterLinear`` (plain torch ops on its own weights), without hooks."""
    return gate is not None and (type(gate) is _Linear or _safe_module(gate)) and not _hooked(gate)


def shared_foldable(shared, shared_gate) -> bool:
    """No shared experts, or moekit's ``SharedMLP`` of exact ``nn.Linear`` children or graph-safe ones (its
    output ``RMSNorm``) (+ an exact ``nn.Linear`` gate, or none), none of them with hooks."""
    if shared is None:
        return True
    if not _safe_module(shared) or _hooked(shared) or \
            not all((_exact_linear(c) or _safe_module(c)) and not _hooked(c) for c in shared.children()):
        return False
    return shared_gate is None or (_exact_linear(shared_gate) and not _hooked(shared_gate))


def graph_plan(layer) -> GraphPlan:
    """The plan of a :class:`~moekit.runner.MoERunner` (module docstring rule)."""
    norm = layer.routed_experts.expert_output_norm
    inner = (norm,) if norm is not None else ()  # an expert output norm swapped or edited: the graphs go
    base = (layer.routed_experts, *inner, *layer.router.modules())  # (a routing function's module holds tensors)
    whole = (layer.routed_input_transform is None and layer.routed_output_transform is None
             and layer.final_output_transform is None
             and shared_foldable(layer.shared_experts, layer.shared_expert_gate))
    folded = ()
    if whole and layer.shared_experts is not None:
        folded = (layer.shared_experts, *layer.shared_experts.children())
        folded += (layer.shared_expert_gate,) if layer.shared_expert_gate is not None else ()
    whole_gate = whole and gate_foldable(layer.gate)
    if whole_gate:
        folded += (layer.gate,)
    bucket_gate = layer.gate if bucket_gate_candidate(layer) else None
    idle = (layer.gate,) if isinstance(layer.gate, torch.nn.Module) and _hooked(layer.gate) else ()  # (read still)
    return GraphPlan(whole, whole_gate, folded, base + folded, layer.router, bucket_gate, inner,
                     (layer.routed_experts,), idle)


def bucket_gate_candidate(layer) -> bool:
    """The gate may run inside the route -> experts graphs (token buckets): a graph-safe module that says
    whether it is batch invariant (moekit's ``RouterLinear``; invariant on its Triton backend, checked per
    call), reading the routed input. (A cuBLAS ``nn.Linear`` is not batch invariant: it stays outside.)"""
    g = layer.gate
    return (gate_foldable(g) and hasattr(type(g), "batch_invariant")
            and (layer.gate_input == "routed" or layer.routed_input_transform is None))


def _autocast() -> bool:
    return torch.is_autocast_enabled("cuda")


def take_graphs(layer, hidden_states: torch.Tensor) -> GraphCache | None:
    """The layer's internal graphs, taken for this forward (the caller releases them: ``graphs.lock.release()`` in a
    ``finally``), or None: torch.compile traces the call (nothing of the graph machinery is traced), a routing
    function was swapped for one not declared graph-safe (plain calls only), or another thread's forward holds them
    (this one runs eagerly: the same kernels, :mod:`.graph_lock`). (Round 51: a plain function, not a generator
    context manager: about a microsecond less per eager call.)"""
    graphs = layer._graphs
    router = layer._modules["router"]
    if graphs is None or graphs.off or torch.compiler.is_compiling() or not router.capturable:
        return None
    experts = layer._modules["routed_experts"]
    if torch.is_grad_enabled() and (_training(experts) or router_trains(router)):
        return None  # expert weights (or an output norm, or a routing module's parameter: Gemma 4's per-expert
        # scale, round 64) being trained (round 58): a replay would drop their grads
    if global_hooks() or not (layer._graph_plan or layer._make_graph_plan()).usable(experts):
        return None
    if _autocast() and getattr(router, "custom_routing_function", None) is not None:
        return None  # a routing function's torch ops follow autocast, which a graph would bake in (round 64)
    return graphs if graphs.lock.take(hidden_states) else None


def _training(experts) -> bool:  # a parameter of the routed experts or of their children (an output norm) trains
    return any(p is not None and p.requires_grad
               for m in (experts, *experts._modules.values()) if m is not None for p in m._parameters.values())


def router_trains(m) -> bool:  # a parameter of the router or of its children (a routing module's) requires grad
    return (any(p is not None and p.requires_grad for p in m._parameters.values())
            or any(c is not None and router_trains(c) for c in m._modules.values()))


def global_hooks(module=torch.nn.modules.module) -> bool:  # hooks for every module: a capture only would run them
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def release_graphs(graphs: GraphCache | None) -> None:
    """Let go of what :func:`take_graphs` returned (None: nothing was held)."""
    if graphs is not None:
        graphs.lock.release()


def replay_whole(layer, graphs: GraphCache, hidden_states, router_logits):
    """The layer's output from a whole graph of this key, or None (no graph, or one may not be used now)."""
    entry = graphs.lookup((tensor_key(hidden_states), tensor_key(router_logits)))
    if entry is None:
        return None
    plan = layer._graph_plan
    if plan is None or (torch.is_grad_enabled() and plan.wants_grad(hidden_states, router_logits)):
        return None
    if (plan.folded and _autocast()) or not _current(layer, graphs):
        return None
    return graphs.replay(entry, (hidden_states,) if router_logits is None else (hidden_states, router_logits))


def _current(layer, graphs: GraphCache) -> bool:
    """The graphs may replay now: not inside a user's capture (the plain kernels are captured into it then), and
    captured for the layer's current state (else they are dropped)."""
    if torch.cuda.is_current_stream_capturing():
        return False
    if layer._graph_state() != graphs._state:
        graphs.clear()
        return False
    return True


def replay_bucket(layer, graphs: GraphCache, hidden_states, router_logits, tag=None):
    """The routed output ``[T, H]`` (the graph's static rows; with ``tag="scores"`` the packed output of
    :func:`pack_scores`) from the bucket graph that a checked call of these input keys (shape, dtype, device of
    ``hidden_states`` and of ``router_logits`` or None) replayed, or None. Every check of the forward before the
    graph depends on those keys and on the layer's state only, as for whole graphs; what may change between calls
    is checked again: autograd, autocast (the gate inside), an outer capture, the state."""
    entry = graphs.direct((tensor_key(hidden_states), tensor_key(router_logits), tag))
    if entry is None:
        return None
    plan = layer._graph_plan
    if plan is None or inputs_want_grad(hidden_states, router_logits):
        return None
    if (router_logits is None and not plan.gate_in_bucket()) or not _current(layer, graphs):
        return None
    x = hidden_states if hidden_states.dim() == 2 else hidden_states.reshape(-1, hidden_states.shape[-1])
    return graphs.replay(entry, (x,) if router_logits is None else (x, router_logits), copy=False)


def capture_whole(layer, graphs: GraphCache, hidden_states, router_logits):
    """``(output, None)`` when this call was run and captured as a whole graph; else ``(None, graphs)``:
    the partial graph may still serve it (a token count above the exact ones: a bucket of route -> experts)."""
    plan = layer._graph_plan or layer._make_graph_plan()
    if not plan.whole(router_logits):
        return None, graphs
    tokens = hidden_states.numel() // max(hidden_states.shape[-1], 1)
    if not graphs.eligible(hidden_states, router_logits, tokens, whole=True):
        return None, graphs
    if plan.folded and (_autocast() or (torch.is_grad_enabled() and plan.wants_grad(hidden_states, router_logits))):
        return None, graphs  # the folded modules must run eagerly now: route -> experts may still replay
    key = (tensor_key(hidden_states), tensor_key(router_logits))
    if False in key:  # a tensor subclass: no key of its own (round 64: every subclass shared one, False == False)
        return None, graphs
    graphs.sync_state(layer._graph_state())
    inputs = (hidden_states,) if router_logits is None else (hidden_states, router_logits)
    return graphs.capture(key, lambda h, lg=None: layer._forward(h, lg, None, None), inputs), None


def route_graphed(layer, hidden_states, h, router_logits, input_ids, graphs, scores: bool) -> tuple:
    """(gate ->) route -> experts of a checked input ``h`` [T, H_in] -> ``(routed, topk_weights | None)``: from the
    graph of T's bucket when ``graphs`` serve the call (the gate inside when it is batch invariant), else eagerly.
    ``scores``: the routing weights too (``forward_with_scores``): they ride in the graph's output
    (:func:`pack_scores`), and those graphs are keyed apart (``tag="scores"``). Checked input keys later replay
    directly (:func:`replay_bucket`, with the tag)."""
    x = layer._routed_input(h)
    tag = "scores" if scores else None
    kw = dict(copy=not scores and layer._copy_routed(), tag=tag)  # (scores: unpack_scores copies)
    plain = layer.routed_input_transform is None  # x is the caller's input: a direct key (see replay_bucket)
    if (graphs is not None and input_ids is None and router_logits is None
            and (layer._graph_plan or layer._make_graph_plan()).gate_in_bucket() and graphs.eligible(x, None)):
        fn = (lambda xs: pack_scores(*layer._route_experts(xs, layer._logits(xs, None)))) if scores else \
            layer._gate_routed
        direct = (tensor_key(hidden_states), None, tag) if plain else None
        out = graphs(fn, x, None, layer._graph_state(), direct=direct, **kw)
    else:
        logits = layer._logits(h if layer.gate_input == "block" else x, router_logits)
        if not (graphs is not None and input_ids is None and graphs.eligible(x, logits)):
            routed, weights = layer._route_experts(x, logits, input_ids)
            return routed, weights if scores else None
        fn = (lambda xs, ls: pack_scores(*layer._route_experts(xs, ls))) if scores else layer._routed
        # (direct replays when x and the logits are the inputs themselves: no transform, reshape or cast)
        direct = (tensor_key(hidden_states), tensor_key(router_logits), tag) if plain and logits is router_logits \
            else None
        out = graphs(fn, x, logits, layer._graph_state(), direct=direct, **kw)
    return unpack_scores(out, layer.router.top_k) if scores else (out, None)
