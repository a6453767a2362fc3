"""MoERunner: the forward pass of one MoE layer, top to bottom (SPEC §1 "Forward order").

    x        = routed_input_transform(h)            if set, else h          [T, H]
    logits   = gate(x)  (gate(h) with gate_input="block")  if not given     [T, E + Z]
    routing  = router.route(x, logits)              weights [T, K] f32, ids [T, K] i32, zero_scale [T] f32
    routed   = expert_executor(x, weights, ids) + x * zero_scale   (local, or EP dispatch/combine + TP reduce)
    routed  *= routed_scaling_factor                (only when applied to the output)
    routed   = routed_output_transform(routed)      if set
    shared   = shared_experts(h) [* sigmoid(shared_expert_gate(h))]
    out      = routed + shared
    return final_output_transform(out)              if set (AXK1's post-MoE norm), else out

Everything the runner holds is a constructor argument (:func:`moekit.FusedMoE` builds them bottom-up).

Shapes of what user modules return are checked at every forward (shapes only: no host synchronisation),
so nothing is silently broadcast. ``H_in`` is the width of ``hidden_states``; the output has the shape of
``hidden_states`` (SPEC §1), so:

    routed_input_transform(h)  -> [T, hidden_size]      (a latent projection maps H_in -> hidden_size)
    gate(x)                    -> [T, E + Z]
    routed_output_transform(r) -> [T, H_in]             (without it, hidden_size must equal H_in)
    shared_experts(h)          -> [T, H_in]
    shared_expert_gate(h)      -> [T, 1] or [T, H_in]   (a per-token or per-channel gate)
"""

from __future__ import annotations

import torch

from ._checks import as_float_dtype, check_device, check_int
from .config import MoEConfig
from .experts.executor import LocalExecutor
from .experts.graphed import GraphCache
from .experts.graphed_plan import (GraphPlan, capture_whole, graph_plan, release_graphs, replay_bucket, replay_whole,
                                   route_graphed, take_graphs, unpack_scores)
from .experts.mapping import check_expert_mapping, load_layer_weights
from .experts.range16 import cast_dtype_checked
from .experts.routed import RoutedExperts
from .parallel.agree import agreed_forward
from .parallel.rebalance import rebalance_layer
from .routing.base import BaseRouter
from .runner_graphs import before_swap, graph_safe, graph_state
from .runner_checks import (check_hidden, check_routed_input, check_runner_args, guard_placement,
                            compute_router_logits, input_width, ran, router_logits_for)

#: eager forwards of at most this many tokens replay an internal CUDA graph (``eager_graph_tokens``), for a
#: layer with a pool of its own. Decision (round 11): 8, not 64. Buckets up to 64 put a 2 MB scratch
#: allocation (a 20 MB allocator segment) in each layer's own pool: ~1 GB for a hand-built stack of 48
#: Qwen3-30B-A3B layers, for little gain (a standalone layer's eager call at 8 < T <= 64 is already about
#: GPU-bound: Qwen3 T = 64 host 292 vs GPU 300 µs on the H200). Layers that share a GraphPool (loaded or
#: patched models) get experts/graphed.MODEL_GRAPH_TOKENS: 2048.
DEFAULT_EAGER_GRAPH_TOKENS = 8


class MoERunner(torch.nn.Module):
    """Owns ``router``, ``routed_experts`` and the ``expert_executor`` that runs them, and runs the layer.
    Build it with :func:`moekit.FusedMoE`.

    ``forward(hidden_states [..., H], router_logits [T, E + Z] | None = None, *, input_ids [T] | None
    = None) -> [..., H]`` (same dtype as ``hidden_states``; see the module docstring for the order);
    :meth:`forward_with_scores` returns the routing weights beside it.

    Args:
        layer_name: the layer's name (messages, ``layer.layer_name``).
        moe_config: the layer's :class:`~moekit.MoEConfig`.
        router: the :class:`~moekit.BaseRouter` that turns logits into ``(weights, ids)``.
        routed_experts: the :class:`~moekit.RoutedExperts` holding this rank's expert weights.
        enable_dbo: only False; True (dual-batch overlap) raises ``NotImplementedError``.
        gate: module computing ``router_logits`` when a forward gets none (else they must be passed).
        shared_expert_gate: module ``[T, H] -> [T, 1]``; scales the shared output by its sigmoid.
        shared_experts: module ``[T, H] -> [T, H]`` added to the routed output.
        routed_input_transform: module applied to the hidden states before gate, router and experts.
        routed_output_transform: module applied to the routed output before the shared output is added.
        routed_scaling_factor: the output-side factor (1.0 when the router applies it).
        router_logits_dtype: dtype the logits (the gate's, or those given) are cast to before routing (None: as is).
        expert_executor: an object with ``name``, ``experts`` and ``__call__(x, topk_weights,
            topk_ids) -> [T, H]`` (default :class:`~moekit.experts.executor.LocalExecutor` over
            ``routed_experts``; parallel layers get a :class:`~moekit.parallel.ParallelExecutor`).
        n_shared_experts: informational (shared experts run through ``shared_experts``).
        expert_mapping: the checkpoint entries :meth:`load_weights` accepts (see
            :func:`~moekit.fused_moe_make_expert_params_mapping`); None: both usual conventions.
        eager_graph_tokens: an eager forward of ``1 <= T <= eager_graph_tokens`` tokens (default 8) on a
            CUDA device replays an internal CUDA graph (bit-identical to the plain call, a fraction of its
            host time). Up to T = 8, one graph per input key: the whole forward when every module in it is
            moekit's own or an exact ``nn.Linear`` (:mod:`moekit.experts.graphed_plan`), else route ->
            experts; above, route -> experts of T's token bucket (T rounded up to a multiple of 8 up to 64,
            32 up to 512, 128 beyond), the padding rows repeating token 0 (SPEC §9 keeps the real rows'
            bits). 0 disables it. Only for the Triton backend, the
            local executor and score-based routers or graph-safe routing functions; never while torch.compile
            traces, inside an outer graph capture or when autograd is wanted (see :mod:`moekit.experts.graphed`).
            Threads: one forward at a time replays a layer's (or a shared pool's) graphs; a forward of another
            thread meanwhile runs the plain kernels (:mod:`moekit.experts.graph_lock`).
        graph_pool: a :class:`~moekit.experts.graphed.GraphPool` (or ``torch.cuda.graph_pool_handle()``)
            shared with other layers (default: the layer's own); a ``GraphPool``'s layers share its lock.
        gate_input: what the gate reads when it computes the logits: ``"routed"`` (``x_routed``, SPEC §1)
            or ``"block"`` (the layer's input ``hidden_states``: Gemma 4, Muse Spark, Nemotron-H with a latent).
        final_output_transform: module applied to ``routed + shared`` (A.X-K1's post-MoE norm); None: nothing.

    Output-side ``routed_scaling_factor`` is read from ``moe_config`` (:attr:`MoEConfig.output_scale`, the one
    store); the keyword stays for the seed's signature and, if given, must agree with the config. User
    modules must be callables (``TypeError`` at construction); a ``gate`` that is an ``nn.Linear`` must map
    ``hidden_size -> E + Z`` (``ValueError`` at construction).

    Decisions (issue #12):

    - Training (round 58; issue #12 had refused it): autograd flows through the forward on every backend
      (:mod:`moekit.ops.grad`). The kernels' forward values are kept bit for bit; the backward recomputes each
      expert with torch (:mod:`moekit.ops.experts_grad`: grouped GEMMs, or a float32 loop) and gives
      ``d hidden_states``, the routing weights' gradient (through the scoring function to the router logits and the
      gate; a selection bias picks and gets none), and, where ``requires_grad`` is set, the expert weights and biases of unquantised
      layers. Expert weights are created with ``requires_grad=False`` (a frozen-experts fine-tune needs nothing);
      quantised weights stay frozen, their backward runs on the dequantised weights with the fp8 activation
      quantisation as the identity (straight-through). The internal CUDA graphs step aside while autograd is
      wanted. Expert / tensor parallel layers run their forward and raise ``NotImplementedError`` in a backward
      (their collectives have no backward). The backward is torch code, not fused kernels: expect it to cost several forward passes.
    - ``.to(device)`` / ``.cuda()`` to a CUDA device on a machine without one raise ``ValueError``
      naming the device (``moekit._checks.check_device``) instead of torch's assertion.
    """

    def __init__(
        self,
        layer_name: str,
        moe_config: MoEConfig,
        router: BaseRouter,
        routed_experts: RoutedExperts,
        enable_dbo: bool = False,
        gate: torch.nn.Module | None = None,
        shared_expert_gate: torch.nn.Module | None = None,
        shared_experts: torch.nn.Module | None = None,
        routed_input_transform: torch.nn.Module | None = None,
        routed_output_transform: torch.nn.Module | None = None,
        routed_scaling_factor: float | None = None,
        router_logits_dtype: torch.dtype | None = None,
        *,
        expert_executor=None,
        n_shared_experts: int | None = None,
        expert_mapping: list[tuple[str, str, int, str]] | None = None,
        eager_graph_tokens: int = DEFAULT_EAGER_GRAPH_TOKENS,
        graph_pool=None,
        gate_input: str = "routed",
        final_output_transform: torch.nn.Module | None = None,
    ):
        super().__init__()
        check_runner_args(moe_config, router, enable_dbo, gate_input, routed_scaling_factor, dict(
            gate=gate, shared_experts=shared_experts, shared_expert_gate=shared_expert_gate,
            routed_input_transform=routed_input_transform, routed_output_transform=routed_output_transform,
            final_output_transform=final_output_transform))
        guard_placement(self, router, routed_experts)
        self.layer_name, self.moe_config = layer_name, moe_config
        # the path of a forward, in order
        self.routed_input_transform = routed_input_transform
        self.gate = gate
        self.router = router
        self.routed_experts = routed_experts
        self.routed_output_transform = routed_output_transform
        self.shared_experts, self.shared_expert_gate = shared_experts, shared_expert_gate
        self.gate_input = gate_input
        self.final_output_transform = final_output_transform
        rld = router_logits_dtype
        self.router_logits_dtype = None if rld is None else as_float_dtype("router_logits_dtype", rld)
        if expert_executor is None:
            expert_executor = LocalExecutor(routed_experts)
        elif expert_executor.experts is not routed_experts:
            raise ValueError("expert_executor must run this runner's routed_experts")
        self.expert_executor = expert_executor
        self.n_shared_experts = n_shared_experts
        self.expert_mapping = check_expert_mapping(expert_mapping)
        check_int("eager_graph_tokens", eager_graph_tokens, minimum=0)
        self._graphs = None
        if eager_graph_tokens and graph_safe(router, routed_experts, expert_executor):
            self._graphs = GraphCache(eager_graph_tokens, graph_pool, buckets=router.batch_invariant)
        self._graph_plan: GraphPlan | None = None  # what the graphs may fold: made at the first forward

    def add_module(self, name: str, module) -> None:  # (round 64: add_module / register_module bypassed before_swap)
        if name in ("routed_experts", "router"):
            before_swap(self, name, module)
            self.__dict__["_graph_plan"] = None
        super().add_module(name, module)

    def __setattr__(self, name: str, value) -> None:
        if name in ("routed_experts", "router"):
            before_swap(self, name, value)
        super().__setattr__(name, value)  # a new module or setting: decide again what the graphs may hold
        if "_graph_plan" in self.__dict__ and name not in ("_graph_plan", "training"):
            self.__dict__["_graph_plan"] = None
            if self.__dict__.get("_graphs") is not None:
                self._graphs.clear()

    @property
    def eager_graph_tokens(self) -> int:
        """Largest token count an eager forward replays from an internal CUDA graph (0: never). Settable
        on a layer that may graph (its graphs are dropped); a layer that never graphs (torch backend,
        collectives, hash routing, a routing function not declared graph-safe) stays at 0, and one whose
        router is not batch invariant (a graph-safe routing function) at most 8 (exact-T graphs)."""
        return self._graphs.limit if self._graphs is not None and not self._graphs.off else 0

    @eager_graph_tokens.setter
    def eager_graph_tokens(self, tokens: int) -> None:
        check_int("eager_graph_tokens", tokens, minimum=0)
        graphs = self.__dict__.get("_graphs")
        if graphs is not None:
            graphs.clear()
            graphs.max_tokens = tokens

    @property
    def backend(self) -> str:
        return self.routed_experts.backend

    @property
    def input_size(self) -> int:
        """The width of the ``hidden_states`` the layer takes: ``moe_config.hidden_size`` (the routed experts'),
        or with a ``routed_input_transform`` (a latent MoE) the ``in_features`` of its first ``nn.Linear``
        (a transform without one is taken as width-preserving)."""
        return input_width(self.routed_input_transform, self.moe_config.hidden_size)

    # the output-side factor (1.0 when the router applies it): read from moe_config, its one store
    routed_scaling_factor = property(lambda self: self.moe_config.output_scale,
                                     doc="the output-side routed_scaling_factor (from moe_config)")

    # -- device moves: a CUDA target on a machine without CUDA names itself -----------------------
    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            check_device("device", device)
        return super().to(*args, **kwargs)

    def cuda(self, device=None):
        check_device("device", torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return super().cuda(device)

    def to_empty(self, *, device, recurse: bool = True):
        if device is not None:  # (round 66: torch's "not compiled with CUDA" AssertionError)
            check_device("device", device)
        return super().to_empty(device=device, recurse=recurse)

    # -- forward (on a parallel layer, a rank's failure before the first collective reaches its peers: agreed_forward)
    @agreed_forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [..., H_in] fp32/bf16/fp16; router_logits: [T, E + Z] any float or None;
        input_ids: [T] (hash routing). Returns [..., H_in]: the shape and dtype of hidden_states."""
        graphs = take_graphs(self, hidden_states)
        try:
            if graphs is not None and input_ids is None:
                # replay of a whole-forward graph: inputs of a captured key were checked when it was captured
                out = replay_whole(self, graphs, hidden_states, router_logits)
                if out is not None:
                    return out
                # a bucket graph that a checked call of these input keys already replayed: no checks again
                routed = replay_bucket(self, graphs, hidden_states, router_logits)
                if routed is not None:
                    return self._tail(hidden_states, routed, self._copy_routed())
            return self._forward(hidden_states, router_logits, input_ids, graphs)
        finally:
            release_graphs(graphs)

    @agreed_forward
    def forward_with_scores(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                            input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`, and the routing weights it used: ``(out [..., H_in], topk_weights [T, K] float32)``, the
        bits of ``router.select_experts(x, logits)[0]``, from one routing (inside the internal graphs when they
        serve the call, the weights riding in the graph's output: :func:`~moekit.experts.graphed_plan.pack_scores`)."""
        graphs = take_graphs(self, hidden_states)
        try:
            if graphs is not None and input_ids is None:  # a checked call of these input keys was served: no checks
                packed = replay_bucket(self, graphs, hidden_states, router_logits, tag="scores")
                if packed is not None:
                    routed, weights = unpack_scores(packed, self.router.top_k)
                    return self._tail(hidden_states, routed, False), weights
            check_hidden(self, hidden_states, router_logits, input_ids)
            h = hidden_states.reshape(-1, hidden_states.shape[-1])
            routed, weights = route_graphed(self, hidden_states, h, router_logits, input_ids, graphs, True)
            return self._tail(hidden_states, routed, False, h), weights
        finally:
            release_graphs(graphs)

    def _forward(self, hidden_states, router_logits, input_ids, graphs):
        """The checked forward; with ``graphs``, captures a whole graph when the plan allows (see
        :mod:`moekit.experts.graphed_plan`), else replays the partial one (route -> experts)."""
        check_hidden(self, hidden_states, router_logits, input_ids)
        if graphs is not None and input_ids is None:
            out, graphs = capture_whole(self, graphs, hidden_states, router_logits)
            if out is not None:
                return out
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed = route_graphed(self, hidden_states, h, router_logits, input_ids, graphs, False)[0]
        return self._tail(hidden_states, routed, False, h)

    def _routed_input(self, h: torch.Tensor) -> torch.Tensor:
        """x [T, hidden_size]: ``routed_input_transform(h)`` if set, else ``h`` (the input [T, H_in]), checked."""
        x = h
        if self.routed_input_transform is not None:
            x = ran("routed_input_transform", self.routed_input_transform, h, h.shape[0],
                    (self.moe_config.hidden_size,))
        check_routed_input(self, x)
        return x

    def _copy_routed(self) -> bool:
        """Whether a graph's static routed output must be copied: it would be returned as it is (no shared
        experts to add to it) or handed to a user module (``routed_output_transform``)."""
        return self.routed_output_transform is not None or self.shared_experts is None

    def _tail(self, hidden_states, routed, copy: bool, h=None) -> torch.Tensor:
        """routed [T, *] -> the layer's output: routed_output_transform, + shared experts (of ``h``, the input
        as [T, H_in]), final_output_transform, the shape and dtype of hidden_states. ``copy``: ``routed`` is a
        graph's static output that must be cloned first (see :meth:`_copy_routed`)."""
        width = hidden_states.shape[-1]
        if h is None:
            h = hidden_states if hidden_states.dim() == 2 else hidden_states.reshape(-1, width)
        if copy:
            routed = routed.clone()
        t = h.shape[0]
        if self.routed_output_transform is not None:
            routed = ran("routed_output_transform", self.routed_output_transform, routed, t, (width,))
        elif routed.shape[-1] != width:
            raise ValueError(
                f"the routed output has width hidden_size={routed.shape[-1]} but hidden_states has width {width}; "
                "the output has the shape of hidden_states: pass a routed_output_transform mapping back to it"
            )

        if self.shared_experts is not None:
            shared = ran("shared_experts", self.shared_experts, h, t, (width,))
            if self.shared_expert_gate is not None:
                g = ran("shared_expert_gate", self.shared_expert_gate, h, t, (1, width))
                shared = torch.sigmoid(g) * shared
            routed = routed + shared
        if self.final_output_transform is not None:
            routed = ran("final_output_transform", self.final_output_transform, routed, t, (width,))
        # SPEC §1: the output has the shape and dtype of hidden_states, whatever dtype user modules returned
        if routed.dim() != hidden_states.dim():
            routed = routed.reshape(hidden_states.shape)
        return routed if routed.dtype == hidden_states.dtype else routed.to(hidden_states.dtype)

    def _routed(self, x: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """route -> experts (+ zero experts) (* output scale): moekit's own ops, the graphed part."""
        return self._route_experts(x, logits, input_ids)[0]

    def _route_experts(self, x, logits, input_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_routed` and the routing weights it used: ``(routed [T, W], topk_weights [T, K] float32)``."""
        routing = self.router.route(x, logits, input_ids=input_ids)
        routed = self.expert_executor(x, routing.topk_weights, routing.topk_ids)
        if routing.zero_scale is not None or self.routed_scaling_factor != 1.0:
            # ((routed + x * zero_scale) * scale) in float32, rounded once (one launch on the Triton table); routed
            # itself arrives rounded to params_dtype (fp16: a sum past 65504 is inf here already: README, fp16)
            routed = self.routed_experts.kernels.zero_combine(routed, x, routing.zero_scale,
                                                              float(self.routed_scaling_factor))
        return routed, routing.topk_weights

    def _gate_routed(self, x: torch.Tensor) -> torch.Tensor:
        """gate -> route -> experts: the graphed part when the gate is batch invariant."""
        return self._routed(x, self._logits(x, None))

    def _make_graph_plan(self) -> GraphPlan:
        self.__dict__["_graph_plan"] = plan = graph_plan(self)
        return plan

    _graph_state = graph_state  # what the graphs read besides their inputs (a change drops them)

    def _apply(self, fn, *args, **kwargs):
        cast_dtype_checked(self.routed_experts, fn)  # (a float16 refusal before any child moves: round 68)
        if self._graphs is not None:  # .to() / .cuda() / .half(): drop the graphs (and their memory) first
            self._graphs.clear()
        out = super()._apply(fn, *args, **kwargs)
        self.moe_config = getattr(self.routed_experts, "moe_config", self.moe_config)  # (params_dtype after a cast)
        return out

    _logits = router_logits_for  # (x [T, H], router_logits [..., E + Z] or None) -> [T, E + Z]
    compute_router_logits = compute_router_logits  # (hidden_states [..., H_in]) -> router_logits [T, E + Z]

    # -- weights ------------------------------------------------------------------------------
    def load_expert_weights(self, w13, w2, w13_bias=None, w2_bias=None, *, w13_scale=None, w2_scale=None,
                            w13_input_scale=None, w2_input_scale=None) -> None:
        """Take the global ``[E, ...]`` tensors and keep this rank's share; quantised layers take the
        scales too, or full-precision weights to quantise (see RoutedExperts.load_expert_weights)."""
        self.routed_experts.load_expert_weights(w13, w2, w13_bias, w2_bias, w13_scale=w13_scale, w2_scale=w2_scale,
                                                w13_input_scale=w13_input_scale, w2_input_scale=w2_input_scale)

    def load_weights(self, weights, *, fused_layout: str = "rows") -> set[str]:
        """Consume checkpoint ``(name, tensor)`` pairs through the expert-params mapping (SPEC §6);
        fused expert stacks are read in ``fused_layout`` (see :mod:`moekit.experts.layout`). Checks across keys (a
        relu2 expert given both gate_proj and up_proj) hold within one call: pass a layer's keys together."""
        return load_layer_weights(self, weights, fused_layout=fused_layout)

    def rebalance(self, **kwargs) -> dict:
        """EPLB: rebalance this layer's experts over its EP group (``enable_eplb=True`` layers; every
        rank calls it). Returns the imbalance before/after; see :func:`moekit.parallel.rebalance`."""
        return rebalance_layer(self, **kwargs)

    def extra_repr(self) -> str:
        c = self.moe_config
        return (
            f"layer_name={self.layer_name!r}, E={c.num_experts}, Z={c.num_zero_experts}, K={c.top_k}, "
            f"H={c.hidden_size}, I={c.intermediate_size}, activation={c.activation!r}, backend={self.backend!r}, "
            f"executor={self.expert_executor.name!r}"
        )
