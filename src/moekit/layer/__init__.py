"""``FusedMoE``: the seed's factory keywords -> checks -> MoEConfig -> kernel table -> placement and EPLB
state -> router -> routed experts -> executor -> :class:`~moekit.runner.MoERunner`, each part built
once with everything it needs (see :func:`build_fused_moe`). ``FusedMoE`` is a class whose call runs
that factory, so ``isinstance(layer, FusedMoE)`` holds for the layers it builds (see :class:`FusedMoE`).

    layer = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, ...)   # -> MoERunner
    layer.load_expert_weights(w13 [E, 2I, H], w2 [E, H, I])
    out = layer(hidden_states [T, H], router_logits [T, E + Z] | None, *, input_ids=None)   # [T, H]
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable

import torch

from .._checks import as_float_dtype, check_bool, check_device, check_subclass
from ..config import MoEConfig
from ..experts.executor import LocalExecutor
from ..experts.routed import RoutedExperts
from ..ops.kernels import resolve_kernels
from ..parallel.executor import ParallelExecutor
from ..routing.base import BaseRouter
from ..routing.factory import create_fused_moe_router
from ..runner import MoERunner
from .checks import (
    check_not_meta,
    check_router_instance,
    check_routing_combination,
    check_unsupported,
    default_device,
    parallel_pieces,
    with_shared_slots,
    zero_expert_count,
)

log = logging.getLogger("moekit")


def build_fused_moe(
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
    eager_graph_tokens: int | None = None,
    gate_input: str = "routed",
    final_output_transform: torch.nn.Module | None = None,
    routed_shared_experts: int = 0,
    expert_output_norm: torch.nn.Module | None = None,
) -> MoERunner:
    """Build a complete Mixture-of-Experts layer and return it as a :class:`~moekit.MoERunner`
    (a ``torch.nn.Module``)::

        layer = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, ...)
        layer.load_expert_weights(w13 [E, 2I, H], w2 [E, H, I])        # before the first forward
        out = layer(hidden_states [..., H], router_logits [T, E + Z] | None, *, input_ids=None)  # [..., H]

    The keywords are those of vLLM's ``FusedMoE`` (the "seed"), with the same meaning and default, plus
    moekit's own: ``device`` and every keyword after it (parallelism, backend, internal graphs, issue #13's
    extensions for transformers architectures: ``gate_input`` ... ``expert_output_norm``). A keyword this
    build cannot honour raises ``NotImplementedError`` naming it (never silently ignored); invalid values
    raise ``ValueError``/``TypeError`` naming the argument, the value and what was expected. The parts are
    built bottom-up, once: kernel table -> placement / EPLB state -> router -> routed experts -> executor
    -> runner. The expert weights start unset (NaN where they are floats): a forward before they are loaded
    (``layer.load_expert_weights``, ``layer.load_weights`` or :func:`moekit.load_moe_layers`) raises
    ``RuntimeError``. Shapes: ``T`` tokens, ``H`` hidden, ``I`` intermediate, ``E`` experts, ``Z`` zero
    experts, ``K`` top-k, ``G`` groups.

    Args:
        num_experts: ``E``, the number of real routed experts (global, logical), an int >= 1.
        top_k: ``K``, experts per token, ``1 <= K <= E + Z``.
        hidden_size: ``H``, the width of ``hidden_states`` (after ``routed_input_transform``, if any).
        intermediate_size: ``I``, the intermediate width of one whole expert (before a tensor-parallel
            split); ``w13`` holds ``2I`` rows for gated activations, ``I`` for ``"relu2"``.
        params_dtype: dtype of the expert weights (and of activations the layer computes): float32,
            bfloat16, float16 (float64 on the torch backend only). Default ``None``: the torch default dtype.
        renormalize: default True. Divide the top-k weights of each token by their sum before scaling.
        use_grouped_topk: default False. DeepSeek-V2/V3 grouped top-k: scores are split into
            ``num_expert_group`` groups, the ``topk_group`` best groups are kept, the top-k is taken inside.
        num_expert_group: ``G`` for grouped top-k (``E % G == 0``); default None. Needs
            ``use_grouped_topk=True`` (a grouping without it raises ``ValueError``).
        topk_group: groups kept per token for grouped top-k, ``1 <= topk_group <= G``; default None.
        quant_config: default None (weights in ``params_dtype``). Otherwise a Hugging Face
            ``quantization_config`` dict, exactly as a checkpoint's config.json holds it, or a moekit
            format object equivalent to one. Accepted formats: **fp8 block**
            (``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [bn, bk]}``, optionally ``"scale_fmt": "ue8m0"``; DeepSeek-V3, Qwen3-FP8),
            **fp8 per channel / per tensor** (compressed-tensors ``float-quantized``, e.g. GLM-4.5-FP8),
            **mxfp4** (``{"quant_method": "mxfp4"}``, gpt-oss; weight-only) and **int4 per group**
            (compressed-tensors ``pack-quantized``, 4-bit symmetric, ``group_size`` 32; Kimi-K2). Quantised
            weights and their scales are loaded with ``load_expert_weights(..., w13_scale=, w2_scale=)``;
            ``params_dtype`` stays the activation dtype. A format or option this build cannot run raises
            ``NotImplementedError`` naming it.
        tp_size: tensor-parallel size; default None (= 1). A value > 1 needs ``tp_group``, whose size it
            must equal; otherwise ``NotImplementedError``.
        dp_size: data-parallel size; only None or 1 are accepted, anything else raises
            ``NotImplementedError`` (data parallelism is the caller's; use ``ep_group`` for experts).
        pcp_size: pipeline context-parallel size; only None or 1 are accepted, anything else raises
            ``NotImplementedError``.
        prefix: the layer's name (``"model.layers.3.mlp"``), used in messages and as ``layer.layer_name``;
            default ``""``.
        custom_routing_function: ``f(hidden_states, gating_output, topk, renormalize) -> (weights [T, K]
            float, ids [T, K] int)`` deciding the routing (e.g. Llama 4: top-k of the logits, sigmoid
            weights); default None. Cannot be combined with another router selector or ``scoring_func``.
        router: a ready :class:`~moekit.BaseRouter` to use instead of building one; default None. Its
            ``top_k`` and number of experts must match, and the routing keywords must stay at their
            defaults (they would be ignored, so they raise ``ValueError``); not with ``enable_eplb``.
        scoring_func: ``"softmax"`` (default), ``"sigmoid"`` or ``"sqrtsoftplus"`` (``sqrt(softplus(x))``,
            DeepSeek-V4): how logits become scores.
        routed_scaling_factor: default 1.0. Multiplies the routing weights after renormalisation (or the
            routed output, with ``apply_routed_scale_to_output``). A finite float.
        swiglu_limit: default None. For gated activations: clamp the gate to ``<= limit`` and the up
            projection to ``[-limit, limit]`` (DeepSeek-V4); for ``"swigluoai"`` the clamp limit (default 7.0);
            for ``"silu_post_clamp"`` see ``activation``. ``"relu2"`` / ``"softcap_swiglu"`` refuse it (``ValueError``).
        e_score_correction_bias: ``[E]`` float tensor (``[E + Z]`` with zero experts), default None. A
            selection bias: it picks the experts, the unbiased scores weigh them (DeepSeek-V3, LongCat). Kept
            by reference, as ``hash_indices_table`` (the router's buffer: a load writes into the tensor given).
        apply_router_weight_on_input: default False. Multiply the expert input, not its output, by the
            routing weight (Llama 4); requires ``top_k == 1``; not with zero experts (``NotImplementedError``).
        activation: the expert activation, default ``"silu"``; one of ``moekit.ACTIVATIONS``: ``"silu"``,
            ``"gelu"``, ``"gelu_tanh"`` (gated: ``act(gate) * up``), ``"swigluoai"`` (gpt-oss's clamped
            SwiGLU), ``"relu2"`` (non-gated ``relu(h)**2``; alias ``"relu2_no_mul"``), and two that checkpoints
            use: ``"silu_post_clamp"`` (the limit clamps ``silu(gate)``) and ``"softcap_swiglu"`` (Inkling-2).
            Unknown names raise ``ValueError`` listing the valid names and aliases.
        enable_eplb: default False. Expert-parallel load balancing: record per-expert loads and move
            experts with ``layer.rebalance()``. Builds a parallel layer (a process group is optional).
        num_redundant_experts: default 0. Extra physical replicas of experts for EPLB (needs
            ``enable_eplb=True``); with ``ep_group`` of size ``W``, ``E + R`` must divide by ``W``.
        has_bias: default False. The experts have biases: ``w13_bias [E, 2I]``, ``w2_bias [E, H]``.
        is_sequence_parallel: only False; True raises ``NotImplementedError`` (sequence-parallel MoE is not built).
        expert_mapping: the checkpoint-name mapping ``[(param_name, weight_name, expert_id, shard_id)]``
            of :func:`~moekit.fused_moe_make_expert_params_mapping` that ``layer.load_weights`` uses;
            default None (both usual conventions, ``{gate,up,down}_proj`` and Mixtral's ``w1/w3/w2``).
        n_shared_experts: default None. Informational (how many shared experts ``shared_experts`` fuses);
            a value without ``shared_experts`` raises ``NotImplementedError`` (moekit does not build them).
        router_logits_dtype: dtype the router logits (``gate``'s output, or the ``router_logits`` a forward is
            given) are cast to before routing (e.g. ``torch.float32``); default None (as produced). Routing math
            runs in float32 either way.
        gate: a module computing ``router_logits [T, E + Z]`` from the (transformed) hidden states when a
            forward gets none; default None (then ``router_logits`` must be passed).
        shared_experts: a module ``[T, H] -> [T, H]`` run on the untransformed hidden states and added to
            the routed output; default None.
        shared_expert_gate: a module ``[T, H] -> [T, 1]``; the shared output is multiplied by
            ``sigmoid(shared_expert_gate(hidden_states))`` (Qwen2-MoE); default None; needs ``shared_experts``.
        routed_input_transform: a module applied to ``hidden_states`` before the gate, router and experts
            (e.g. a latent projection; the experts then work at its output width); default None.
        routed_output_transform: a module applied to the routed (+ zero-expert) output before the shared
            output is added; default None.
        apply_routed_scale_to_output: default False. Apply ``routed_scaling_factor`` to the routed output
            instead of inside the router (the router then uses 1.0); results agree either way within rounding,
            except with ``apply_router_weight_on_input`` (the weight then scales the expert's input, not its output).
        zero_expert_type: None (default) or ``"identity"``: LongCat-Flash zero experts. Needs
            ``e_score_correction_bias`` of length ``E + Z`` (which sets ``Z``) and ``router_logits`` of
            width ``E + Z``; a slot routed to a zero expert adds ``w * x``. ``renormalize`` keeps the seed's
            default True here; LongCat-Flash does not renormalise (pass ``renormalize=False``, as the loader does).
        hash_indices_table: ``[vocab, K]`` int tensor, default None. Hash routing (DeepSeek-V4): the ids of
            token ``t`` are ``table[input_ids[t]]``, weights come from the scores; forwards then need
            ``input_ids``. A layer without a table does not read ``input_ids`` (decision: a model's loop may
            pass them to every MoE layer, as DeepSeek-V4 mixes hash and score layers).
        runner_cls: a :class:`~moekit.MoERunner` subclass to build instead of ``MoERunner``; default None.
        runner_args: extra keyword arguments for ``runner_cls``; default None.
        routed_experts_cls: a :class:`~moekit.RoutedExperts` subclass to build instead; default None.
        routed_experts_args: extra keyword arguments for ``routed_experts_cls``; default None.
        device: where the weights live (``"cpu"``, ``"cuda"``, ``torch.device``); default None: torch's
            default device. A device torch cannot use here raises.
        ep_group: a ``torch.distributed`` process group for expert parallelism (each rank holds ``E / W``
            experts); default None. Every rank of the group must call the layer the same number of times.
        tp_group: a ``torch.distributed`` process group for tensor parallelism (each rank holds an
            ``I / W`` slice of every expert); default None.
        expert_placement_strategy: ``"linear"`` (default: contiguous blocks of experts per rank) or
            ``"round_robin"``.
        backend: ``"auto"`` (default: ``"triton"`` on CUDA, ``"torch"`` elsewhere, resolved once, here, and
            recorded on ``layer.backend``), ``"torch"`` (the reference, any device) or ``"triton"`` (raises
            if Triton cannot run).
        eager_graph_tokens: eager forwards of ``1 <= T <=`` this many tokens on CUDA replay an internal
            CUDA graph (up to T = 8 per input shape: the whole forward, or route -> experts when user
            modules are in it; above, route -> experts per token bucket; bit-identical, a fraction of the
            host time); default :data:`moekit.runner.DEFAULT_EAGER_GRAPH_TOKENS` (8; layers of a model
            loaded or patched by moekit: :data:`moekit.experts.graphed.MODEL_GRAPH_TOKENS`, 2048), 0 disables (see
            :class:`MoERunner`).
        gate_input: ``"routed"`` (default: the gate reads ``x_routed``, SPEC §1) or ``"block"``: the gate reads
            the layer's input ``hidden_states``, before ``routed_input_transform`` (Gemma 4, Muse Spark,
            Nemotron-H with a latent; issue #13).
        final_output_transform: a module ``[T, H_in] -> [T, H_in]`` applied to ``routed + shared`` (A.X-K1's
            post-MoE RMSNorm); default None.
        routed_shared_experts: ``S``, default 0. The last ``S`` of the ``num_experts`` experts (and logit
            columns) are shared experts every token selects, their router scores normalised jointly with the
            ``top_k`` routed ones: ``w_j = s_j / (Σ_top-k s + Σ_shared s) · routed_scaling_factor`` (Inkling).
            The router returns ``top_k + S`` slots; ``e_score_correction_bias``, when given, has
            ``num_experts - S`` entries. Not with zero experts, custom/hash routing or grouped top-k.
        expert_output_norm: a module applied to every expert's output rows ``[N, H]`` (after ``b2``, before
            the routing weight; Muse Spark's post-expert RMSNorm), or with ``per_expert = True`` one called
            as ``norm(rows, logical_expert_ids [N])`` (Ergo's per-expert RMSNorm); default None. Every
            backend and format: the experts then run once per slot (``[T·K, H]`` rows, weight 1), the norm
            on those rows, the weighting and top-k sum in float32 (:class:`~moekit.RoutedExperts`). Not
            with ``apply_router_weight_on_input`` (``ValueError``) or tensor parallelism
            (``NotImplementedError``); the norm must map a zero row to zero (expert parallelism relies on
            it). The layer's internal CUDA graphs capture it only when its class declares
            ``_moekit_graph_safe = True`` (moekit's ``RMSNorm`` / ``ExpertRMSNorm``); otherwise the layer runs
            eagerly.

    Returns:
        A :class:`~moekit.MoERunner` (or ``runner_cls``) holding ``layer.router``,
        ``layer.routed_experts`` (``w13_weight [E_local, 2I, H]``, ``w2_weight [E_local, H, I]``),
        ``layer.gate`` and ``layer.shared_experts``.

    Notes and decisions (issue #12):

    - ``FusedMoE`` is a class whose call runs this factory and returns a :class:`MoERunner`;
      ``isinstance(layer, FusedMoE)`` and ``issubclass(MoERunner, FusedMoE)`` are True (seed users check
      them). To customise the layer, subclass :class:`MoERunner` and pass ``runner_cls=``.
    - Boolean keywords (``renormalize``, ``use_grouped_topk``, ``has_bias``, ``apply_router_weight_on_input``,
      ``enable_eplb``, ``is_sequence_parallel``, ``apply_routed_scale_to_output``) must be ``bool``;
      ``routed_scaling_factor`` a finite float > 0 (``TypeError`` / ``ValueError`` naming them).
    - ``params_dtype`` and ``router_logits_dtype`` take a float ``torch.dtype`` or its name ("bf16",
      "bfloat16", "fp16", "float32", ...). ``device="cuda"`` without a CUDA device raises ``ValueError``.
    - User modules (``gate``, ``shared_experts``, ``shared_expert_gate``, the routed transforms) must be
      callable (checked here); the shapes they return are checked at every forward (see
      :mod:`moekit.runner`): the output always has the shape of ``hidden_states``.
    - A selection bias or hash table on the meta device is refused unless ``device="meta"`` (it holds no
      values to route with); value checks skip meta tensors.
    - Training: autograd flows through the layer on both backends: gradients of ``hidden_states``, the router
      logits (so ``gate``), the shared experts and, once their ``requires_grad`` is set (``False`` at
      construction), the expert weights and biases (quantised weights stay frozen). The forward runs the same kernels,
      bit for bit; the backward is torch code (each expert recomputed). Expert / tensor parallel layers raise
      ``NotImplementedError`` in a backward. See :class:`MoERunner`.
    - fp16: the expert's intermediate activation (``act(w13 · x)``, rounded to the input dtype, as in
      the kernels) can overflow to ±inf in float16 even when the layer's true output would fit; use
      bfloat16 (or float32) for models whose activations exceed 65504.
    - ``torch.compile(layer, fullgraph=True)`` works on both backends, quantised layers included; while
      compiling, the reference backend skips its value checks (non-finite logits, id ranges) and runs a dense,
      trace-friendly expert loop, one chunk up to its workspace bound (one graph for every smaller T; see
      :func:`moekit.ops.experts.experts_reference`).
    """
    for name, flag in (("renormalize", renormalize), ("use_grouped_topk", use_grouped_topk),
                       ("has_bias", has_bias), ("apply_router_weight_on_input", apply_router_weight_on_input),
                       ("enable_eplb", enable_eplb), ("is_sequence_parallel", is_sequence_parallel),
                       ("apply_routed_scale_to_output", apply_routed_scale_to_output)):
        check_bool(name, flag)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (the layer's name, e.g. 'model.layers.3.mlp'), got {prefix!r}")
    check_subclass("runner_cls", runner_cls, MoERunner)
    check_subclass("routed_experts_cls", routed_experts_cls, RoutedExperts)
    for name, extra in (("runner_args", runner_args), ("routed_experts_args", routed_experts_args)):
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"{name} must be a dict of keyword arguments or None, got {type(extra).__name__}")
    check_unsupported(is_sequence_parallel, pcp_size, dp_size, tp_size, tp_group,
                       n_shared_experts, shared_experts)
    device = check_device("device", device) if device is not None else default_device()
    check_not_meta(device, e_score_correction_bias=e_score_correction_bias, hash_indices_table=hash_indices_table)
    config = MoEConfig(
        num_experts, top_k, hidden_size, intermediate_size, activation=activation, has_bias=has_bias,
        swiglu_limit=swiglu_limit, apply_router_weight_on_input=apply_router_weight_on_input,
        num_zero_experts=zero_expert_count(zero_expert_type, e_score_correction_bias, num_experts, router),
        params_dtype=torch.get_default_dtype() if params_dtype is None else as_float_dtype("params_dtype",
                                                                                            params_dtype),
        routed_scaling_factor=routed_scaling_factor, apply_routed_scale_to_output=apply_routed_scale_to_output,
        quant_config=quant_config,
    )
    routing = dict(  # the router's keywords: checked here, then the factory's (or a given router's)
        renormalize=renormalize, scoring_func=scoring_func, e_score_correction_bias=e_score_correction_bias,
        routed_scaling_factor=config.router_scale, zero_expert_type=zero_expert_type,
        use_grouped_topk=use_grouped_topk,
        custom_routing_function=custom_routing_function, hash_indices_table=hash_indices_table,
        num_expert_group=num_expert_group, topk_group=topk_group,
    )
    check_routing_combination(routing, apply_router_weight_on_input, config.num_zero_experts)
    if routed_shared_experts:
        top_k, routing["e_score_correction_bias"] = with_shared_slots(routed_shared_experts, num_experts, top_k,
                                                                       routing, device)
        config = dataclasses.replace(config, top_k=top_k)
    if router is not None:
        check_router_instance(router, routing, top_k=top_k, num_experts=num_experts, enable_eplb=enable_eplb,
                              output_scale=config.routed_scaling_factor if apply_routed_scale_to_output else 1.0)
    kernels = resolve_kernels(backend, device, quiet=True)
    if backend == "auto":
        log.info("moekit layer %r: backend %r on %s", prefix, kernels.name, device)

    parallel = enable_eplb or ep_group is not None or tp_group is not None
    placement, eplb_state = parallel_pieces(
        parallel, num_experts, num_redundant_experts, enable_eplb, ep_group, tp_group, tp_size,
        expert_placement_strategy, num_expert_group if use_grouped_topk else None, device,
        settings=(("top_k", top_k), ("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                  ("params_dtype", str(config.params_dtype)), ("activation", config.activation),
                  ("has_bias", config.has_bias), ("quant_config", repr(config.quant_config)),
                  # round 52's review: routing and activation settings that build alike but compute differently
                  ("routing", (renormalize, scoring_func, use_grouped_topk, num_expert_group, topk_group,
                               zero_expert_type, routed_shared_experts, getattr(custom_routing_function,
                                                                                "__qualname__", None))),
                  ("scales", (routed_scaling_factor, apply_routed_scale_to_output, apply_router_weight_on_input,
                              swiglu_limit))),
    )
    if router is None:
        router = create_fused_moe_router(
            top_k, num_experts, eplb_state=eplb_state, enable_eplb=enable_eplb, num_logical_experts=num_experts,
            kernels=kernels, **routing,
        )
    router.to(device)
    experts = (routed_experts_cls or RoutedExperts)(
        prefix, config.params_dtype, config, config.quant_config, placement=placement, kernels=kernels, device=device,
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
        router_logits_dtype=router_logits_dtype,
        expert_executor=executor,
        n_shared_experts=n_shared_experts,
        expert_mapping=expert_mapping,
        **({} if eager_graph_tokens is None else {"eager_graph_tokens": eager_graph_tokens}),
        gate_input=gate_input,
        final_output_transform=final_output_transform, **(runner_args or {}),
    )


class _FusedMoEType(type):
    """Metaclass of :class:`FusedMoE`: calling the class runs :func:`build_fused_moe` (a
    :class:`MoERunner` comes back), and every MoERunner is an instance (its class a subclass)."""

    def __call__(cls, *args, **kwargs) -> MoERunner:
        try:  # (an unknown keyword or a missing argument named for FusedMoE, not for the factory behind it)
            cls.__signature__.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"FusedMoE(): {err} (its arguments: help(moekit.FusedMoE))") from None
        return build_fused_moe(*args, **kwargs)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, MoERunner)

    def __subclasscheck__(cls, sub) -> bool:
        return isinstance(sub, type) and issubclass(sub, MoERunner)


class FusedMoE(metaclass=_FusedMoEType):
    # Decision (issue #12): the seed's FusedMoE is a class people check with isinstance; moekit's layer
    # is a MoERunner built by a factory. A class whose call is the factory keeps both: the seed's
    # signature and return type, and isinstance(layer, FusedMoE). The docstring is the factory's.
    __doc__ = build_fused_moe.__doc__
    __signature__ = inspect.signature(build_fused_moe)
    __slots__ = ()

    def __init_subclass__(cls, **kwargs):
        """Refused: the layer's class is MoERunner (subclass it and pass ``runner_cls=``)."""
        raise TypeError("FusedMoE is a factory and cannot be subclassed; subclass moekit.MoERunner and pass "
                        "runner_cls= instead")
