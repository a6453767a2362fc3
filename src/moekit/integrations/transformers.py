"""transformers integration: swap a loaded model's MoE blocks for moekit layers, or register moekit as
an experts implementation (``from_pretrained(..., experts_implementation="moekit")``).

transformers is imported inside the functions only: ``import moekit`` never needs it.
- :func:`patch` replaces every MoE block with :class:`MoEBlockAdapter` around a moekit layer (where the
  MoE is made of decoder-layer attributes, Gemma 4, the layer's ``experts`` becomes a
  :class:`LayerMoEAdapter`). The blocks are found at the plans' module paths (the spec's ``stack`` /
  ``towers`` / ``block``); the moekit layer is built from the plan as the loader builds it, then adopts
  every tensor of the block under the spec's renames (:mod:`moekit.integrations._blocks`): router,
  expert, shared-expert and transform weights are shared with the original block (no copy) where the
  layouts agree (transposed / interleaved / flat expert stacks and Inkling's appended shared experts are
  converted once, a copy, which keeps the stacks' ``requires_grad``). Quantised blocks stay quantised
  (:mod:`moekit.integrations._quant`): fp8 ``FP8Experts`` stacks and ``FP8Linear`` shared MLPs keep their fp8 bytes,
  plain-layout mxfp4 ``Mxfp4GptOssExperts`` stay 4-bit (gate/up rows de-interleaved: a copy), also from
  triton_kernels' swizzled layout (through its own ``unswizzle_data``: a copy). The adapter returns what the block
  returned: a tensor, gpt-oss's ``(hidden, router_scores)`` (the OpenAI privacy filter's: divided by K) or Llama 4's
  ``(hidden [T, H], router_logits)``. ``output_router_logits`` (the router logits transformers records for its
  load-balancing loss) is reproduced: each adapter records the logits its moekit layer routes with where transformers
  would have recorded its router's (:mod:`moekit.integrations._record`). Routing is transformers' eval-mode
  routing: a block whose original routes differently in training mode (input jitter, PhiMoE's sparsemixer) refuses
  a training-mode call.
- :func:`unpatch` puts the replaced blocks (kept by reference) back and removes those hooks (bit for bit).
- :func:`register` adds ``"moekit"`` to transformers' ``ExpertsInterface``: transformers keeps its router, moekit
  runs the experts (``fused_experts``) on the block's own weights. The switch only reaches experts classes that
  transformers decorates with ``@use_experts_implementation``; Llama 4 (and LongCat-Flash before transformers 5.25,
  and the specs with ``experts_switch=False``) have none, so there transformers would keep its own forward without a
  word. :func:`check_registered` finds that out (and raises); :func:`patch` is the path for those models.

Without transformers installed, :func:`patch`, :func:`register` and :func:`check_registered` raise
``ImportError`` with the install hint ``pip install 'moekit[transformers]'``.
"""

from __future__ import annotations

import functools

import torch

from ..experts.graphed import GraphPool
from ..loading.architectures import ArchSpec, plan_layers, rename_block_key
from ..loading.fields import construction_error, gives, mentioned
from ..loading.quant import checkpoint_formats
from ._adapters import LayerMoEAdapter, MoEBlockAdapter, _NoRouting
from ._blocks import block_tensors, carry_back_of, check_block_settings, converted_stacks, moekit_from_block
from ._blocks import check_no_adapters, train_time_routing
from ._experts import moekit_experts_forward, quantised_experts_refused, quantised_interfaces
from ._hooks import move_device_hook
from ._model import _activation_dtype, _model_config_dict, _planned_blocks, check_patch_args, switch_interface
from ._record import carry_hooks, make_record, mark_asked, original_router, warn_user_hooks
from ._restore import CARRY, GUARD, ORIGINAL, check_restorable, keep_original, restore_blocks, weaken_kept

__all__ = ["LayerMoEAdapter", "MoEBlockAdapter", "check_registered", "moekit_experts_forward", "patch", "register",
           "unpatch"]

_INSTALL_HINT = "pip install 'moekit[transformers]'"
#: attributes transformers' ``@use_experts_implementation`` sets on an experts module (what the switch reads)
_SWITCH_ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def _require_transformers(what: str):
    """transformers, or an ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"moekit.integrations.transformers.{what}() needs the transformers package, which is not "
            f"installed ({err}); install it with: {_INSTALL_HINT}"
        ) from err
    return transformers


def patch(model, *, backend: str = "auto", eager_graph_tokens: int | None = None,
          restorable: bool = False) -> list[str]:
    """Replace every MoE block of ``model`` by a moekit layer sharing its weights; returns their paths.

    Args:
        model: a loaded transformers ``PreTrainedModel`` (causal LM, or a multimodal wrapper such as
            ``Llama4ForConditionalGeneration``) with its weights in memory (not on the meta device).
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        eager_graph_tokens: the layers' internal CUDA-graph limit (eager calls of up to this many tokens replay a
            graph; see :class:`~moekit.MoERunner`); None (default): :data:`~moekit.experts.graphed.MODEL_GRAPH_TOKENS`
            (2048). The layers share one :class:`~moekit.experts.graphed.GraphPool`.
        restorable: keep every replaced block for :func:`unpatch`, also those whose weights the moekit layer holds
            as converted copies (gpt-oss, Llama 4, DBRX, ...: the block's own stacks then stay in memory, one more
            copy of those experts). False (default): such blocks are dropped as before (their memory is freed) and
            :func:`unpatch` refuses the model; blocks whose tensors the layer shares are kept either way (what the
            layer holds converted, e.g. a bf16 selection bias widened to float32, is at most 1 MiB or 1 % of it).

    Returns the module paths replaced, e.g. ``["model.layers.0.mlp", ...]``; blocks patched before are left as they
    are (a second call returns ``[]``). Where the MoE is made of attributes of the decoder layer (Gemma 4) the layer
    stays: its ``experts`` attribute becomes a :class:`LayerMoEAdapter` running the whole moekit layer on the layer's
    input, and the other MoE attributes (router, the norms around the experts, now inside the moekit layer) become
    pass-throughs; the path returned is the layer's. The layers are planned from the model's config: a block whose
    routing settings (``top_k``, ``norm_topk_prob``, ...) differ from it raises ``ValueError`` before anything changes.
    The replacements keep the replaced block's train/eval mode and accelerate device hook (a dispatched model,
    :mod:`._hooks`). The replaced modules are kept by reference (outside the module tree; the tensors the layers hold
    themselves by weak reference) for :func:`unpatch` where that is free or ``restorable`` asks for it. Supported: the
    architectures of :func:`moekit.loading.architectures.supported_model_types`. Unsupported architectures raise
    ``NotImplementedError`` listing the supported ones; a model whose MoE blocks are not where its config says raises
    ``RuntimeError``; without transformers, ``ImportError``. All or nothing: a block whose moekit layer cannot be built
    (the error propagates) leaves the model as it was (the blocks replaced before it are put back).

    ``output_router_logits`` (the router logits transformers records for its load-balancing loss, and its
    ``aux_loss``) works on the patched model as on the original: while transformers' collector gathers them (a
    forward that asks for them, in its kwargs or the config), each patched block records the logits its moekit layer
    routes with (the gate's ``[T, E + Z]``, in the layer's ``router_logits_dtype``) where transformers recorded its
    router's (:mod:`moekit.integrations._record`), and the loss's gradient reaches the router weights through them;
    the output is the same as without recording. A block transformers records nothing from stays silent (DeepSeek-V4's
    hash-routed layers). One whose router logits a record cannot stand for (two routers of the recorded class in one
    block, a spec by class name) refuses such a forward with ``NotImplementedError`` (a forward pre-hook on each
    transformers model inside the patched one, one per model: a second ``patch()`` adds none), and ``patch()`` refuses
    a model whose config asks for them then, before changing anything.
    """
    transformers = _require_transformers("patch")
    if not isinstance(restorable, bool):
        raise TypeError(f"patch(): restorable must be a bool, got {restorable!r} ({type(restorable).__name__})")
    check_patch_args(backend, eager_graph_tokens)  # (round 66: named as fields of the model's config)
    config = _model_config_dict(model)
    spec, plans = plan_layers(config, "the model's config")
    planned = list(_planned_blocks(model, plans))
    if not planned and not isinstance(model, transformers.PreTrainedModel):  # (a block: DeepSeek-V3's has a config)
        raise TypeError(f"patch() needs a transformers PreTrainedModel holding the MoE blocks, got "
                        f"{type(model).__name__}, which holds none of them (a block itself?)")
    if len(planned) != len(plans):  # (checked before anything changes)
        raise RuntimeError(f"patch found {len(planned)} MoE blocks but the config describes {len(plans)} "
                           f"({[p.name for p in plans]}); the model structure is not the expected one")
    blocks = [(n, m, p) for n, m, p in planned if not _patched(m)]  # (blocks patched before are left as they are)
    # each block's router-logits record (a layer-level MoE's below its experts); a config asking for router logits
    # that a block cannot record is refused before anything changes
    records = [make_record(model, n, m, p.num_experts + p.num_zero_experts, p.routed_shared_experts,
                           "experts" if spec.layer_level else "") for n, m, p in blocks]
    if _asks_router_logits(model):
        _refuse_unrecorded(model, "patch()", [why for name, why in records if name is None])
    for name, module, plan in blocks:  # (a block on the meta device, e.g. offloaded, raises before any is replaced)
        check_no_adapters(name, module)
        block_tensors(module, spec, plan)
        check_block_settings(module, plan, name, config)
        warn_user_hooks(name, module, spec.ckpt_blocks if spec.layer_level else None)
    fmt, dense_fmt, _ = checkpoint_formats(config, None)
    act_dtype = _activation_dtype(model)
    # undo: (parent, {attribute: the module it held}) per block replaced so far; flags: (parameter, requires_grad) of
    # every block built so far (building freezes quantised weights, the block's own parameters)
    replaced, undo, flags = [], [], []
    pool = GraphPool()  # the layers' internal CUDA graphs share one memory pool (run one after another)
    try:
        for (name, module, plan), record in zip(blocks, records):
            before = [(t, t.requires_grad) for t in block_tensors(module, spec, plan).values()
                      if isinstance(t, torch.nn.Parameter)]
            flags.extend(before)
            try:
                moe = moekit_from_block(module, spec, plan, backend, fmt, pool, eager_graph_tokens, act_dtype,
                                        dense_fmt)
            except ValueError as err:  # (round 66: an invalid grouping named no block and no config field)
                if gives(config, plan, mentioned(str(err))):
                    raise construction_error(err, plan, "the model's config", config) from err
                raise
            except KeyError as err:  # (round 66: a wrapped or replaced block raised KeyError('experts.down_proj'))
                raise RuntimeError(f"{name} is a {type(module).__name__} without the tensor {err.args[0]!r} of the "
                                   f"MoE block its config describes (wrapped or replaced?): patch the model before "
                                   "wrapping or replacing its blocks") from err
            moe.train(module.training)  # the replaced block's mode (an eval model stays in eval)
            stacks = converted_stacks(module, spec, plan, moe)  # (unpatch() writes trained copies back into them)
            kept = dict(carry=functools.partial(carry_back_of, stacks, spec.model_types[0], plan, moe) if stacks
                        is not None else None,
                        flags=[(t, old) for t, old in before if t.requires_grad != old])  # (unpatch() restores them)
            if spec.layer_level:
                undo.append((module, {member: getattr(module, member) for member in spec.ckpt_blocks}))
                _install_in_layer(module, spec, moe, restorable, record, kept)
            else:
                adapter = MoEBlockAdapter(moe, plan, train_time_routing(module), record).train(module.training)
                keep_original(adapter, module, moe, restorable, **kept)  # for unpatch()
                move_device_hook(module, adapter)  # (accelerate's device hook goes with the block: ._hooks)
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                undo.append((parent, {attr: module}))
                setattr(parent, attr, adapter)
            replaced.append(name)
    except BaseException:
        # all or nothing: a block that fails to build (an unsupported tensor, out of memory) puts back the blocks
        # replaced before it (``blocks`` holds them: no memory cost) and the requires_grad flags building changed
        for parent, members in reversed(undo):
            for attr, old in members.items():
                setattr(parent, attr, old)
        for t, old in reversed(flags):  # (a parameter two blocks share: its flag before the first)
            t.requires_grad_(old)
        raise
    weaken_kept(model)  # (the kept blocks' tensors the layers hold: by weak reference, ._restore.WEAK)
    _guard_router_logits(model)
    return replaced


def _asks_router_logits(module, kwargs: dict | None = None) -> bool:
    """``output_router_logits`` is on for a forward of ``module``: in the call's kwargs, else in its config (or
    its text config)."""
    if kwargs and kwargs.get("output_router_logits") is not None:
        return bool(kwargs["output_router_logits"])
    cfg = getattr(module, "config", None)
    if cfg is None:
        return False
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(cfg, "output_router_logits", False) or getattr(text, "output_router_logits", False))


def _patched(module) -> bool:
    return isinstance(module, MoEBlockAdapter) or isinstance(getattr(module, "experts", None), LayerMoEAdapter)


def _refuse_unrecorded(module, where: str, whys) -> None:
    """``NotImplementedError`` if a block's router logits cannot be recorded (``whys``: a reason per block, None
    where they can)."""
    whys = [w for w in whys if w]
    if whys:
        raise NotImplementedError(
            f"{where}: output_router_logits=True cannot be reproduced on this model patched by moekit: "
            f"{whys[0]}{f' (and {len(whys) - 1} more blocks)' if len(whys) > 1 else ''}, so the router logits "
            "transformers records for the load-balancing loss would be missing. Pass output_router_logits=False "
            f"(or set {type(module).__name__}.config.output_router_logits = False), or unpatch() the model")


def _router_logits_pre_hook(module, args, kwargs):
    """Refuse a forward of ``module`` that asks for router logits where a patched block below cannot record them;
    mark the records below it asked for this forward (read where a region is compiled on its own: :mod:`._record`)."""
    if not _asks_router_logits(module, kwargs):
        mark_asked(module, False)
        return
    adapters = [m for m in module.modules() if isinstance(m, (MoEBlockAdapter, LayerMoEAdapter))]
    _refuse_unrecorded(module, f"{type(module).__name__}.forward", [m.unrecorded for m in adapters])
    mark_asked(module, True, [m.record for m in adapters if m.record is not None])


def _guard_router_logits(model) -> None:
    """A forward pre-hook refusing router logits that cannot be recorded (:func:`_router_logits_pre_hook`) on
    ``model`` and every transformers model (``PreTrainedModel``) inside it; one per module (marked: a second
    ``patch()`` adds none)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if module is not model and not isinstance(module, PreTrainedModel):
            continue
        if module.__dict__.get(GUARD) is None:  # the handle, for unpatch()
            module.__dict__[GUARD] = module.register_forward_pre_hook(_router_logits_pre_hook, with_kwargs=True)


def _install_in_layer(layer, spec: ArchSpec, moe, restorable: bool, record, kept: dict) -> None:
    originals = {member: getattr(layer, member) for member in spec.ckpt_blocks}
    for member in spec.ckpt_blocks:
        if member == "experts":
            stand_in = LayerMoEAdapter(moe, record)
            keep_original(stand_in, originals, moe, restorable, **kept)  # for unpatch()
        elif rename_block_key(spec, member + ".").startswith("gate."):
            stand_in = _NoRouting()
        else:
            stand_in = torch.nn.Identity()
        move_device_hook(originals[member], stand_in)
        setattr(layer, member, stand_in.train(layer.training))


def unpatch(model) -> list[str]:
    """Undo :func:`patch` on ``model``: put back every MoE block it replaced (where the MoE is made of attributes of
    the decoder layer, Gemma 4: the layer's router, experts and norms) and remove its ``output_router_logits``
    pre-hooks; returns the paths restored.

    Args:
        model: a ``torch.nn.Module``, the model :func:`patch` was called on (or a module holding it); another
            type raises ``TypeError``.

    Returns the paths :func:`patch` returned (relative to ``model``, in module order), e.g.
    ``["model.layers.0.mlp", ...]``. The blocks put back are the original module objects (kept by reference by
    :func:`patch`, with their parameters, hooks and attributes; accelerate's device hook: the stand-in's, see
    :mod:`._hooks`), each taking its stand-in's train/eval mode, so the model's forward computes exactly what it
    computed before :func:`patch` (bit for bit) and ``output_router_logits`` works again. A model never patched, or
    unpatched already, is left as it is and gives ``[]``; :func:`patch` may be called again afterwards. Adapters
    built by hand stay (no original), with their models' pre-hooks.

    Memory: :func:`patch` keeps the replaced blocks by reference where the moekit layer shares the block's tensors
    (expert stacks in moekit's layout, ``[E, 2I, H]`` / ``[E, H, I]``: Mixtral, Qwen, DeepSeek, most types; small
    tensors the layer holds converted, at most 1 MiB or 1 % of what it shares, e.g. a bf16 selection bias widened to
    float32, are kept beside it): this costs (almost) nothing. Where it converted the stacks (a copy: gpt-oss, Llama
    4, Aria, Ergo and the OpenAI privacy filter, DBRX's flat stacks, Inkling's appended shared experts) it keeps the
    block only with ``patch(model, restorable=True)`` (the block's own stacks then stay in memory beside the copies
    until :func:`unpatch`); without it they were freed and :func:`unpatch` raises ``ValueError`` naming those blocks,
    before changing anything. It raises too, before changing anything, when a kept block's tensors are no longer
    the layer's (its weights replaced after :func:`patch`, e.g. ``load_state_dict(assign=True)``, or offloaded by
    accelerate: ``cpu_offload`` / ``disk_offload`` / ``dispatch_model`` of a patched model; a kept block holds the
    tensors its layer holds itself by weak reference, :mod:`._weak`, so those are freed then). The kept blocks are
    not part of the module tree: ``model.to()`` / ``.half()`` done while patched reach neither their converted
    stacks nor their buffers (after moving or casting a patched model, call ``model.to(...)`` again once
    unpatched). What training changed in converted copies is carried back: :func:`unpatch` first writes the layers'
    current expert weights into the kept blocks' own stacks (in place, in their layout, dtype and device; values
    exact), so patch, train, unpatch and ``save_pretrained`` saves the trained experts (an optimizer still holds the
    copies: build a new one to train on after unpatching; small tensors held converted, e.g. a bf16 selection bias
    widened to float32, are not carried back: edits to them while patched are lost). Quantised expert weights that
    :func:`patch` froze get their ``requires_grad`` from before :func:`patch` back, whatever was set on them while
    patched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch(): model must be a torch.nn.Module, got {type(model).__name__}")
    check_restorable(model)
    for m in model.modules():  # what training changed in converted copies goes back into the blocks' own stacks
        carry = m.__dict__.get(CARRY)
        if carry is not None and m.__dict__.get(ORIGINAL) is not None:
            carry()
    # transformers' capture hooks installed on the records while patched go back with them; the records a guarded
    # model's last forward marked asked are unmarked (they go with their blocks)
    for m in model.modules():
        mark_asked(m, False)
        original = m.__dict__.get(ORIGINAL) if isinstance(m, (MoEBlockAdapter, LayerMoEAdapter)) else None
        if original is not None and m.record is not None:
            carry_hooks(m.record, original_router(original, m.record.router_rel))
    return restore_blocks(model, (MoEBlockAdapter, LayerMoEAdapter))


def register(name: str = "moekit") -> str:
    """Register moekit in transformers' experts switch; returns ``name``, the value to pass as
    ``experts_implementation`` (``from_pretrained(..., experts_implementation="moekit")`` or
    ``model.set_experts_implementation("moekit")``).

    transformers keeps its router; moekit's :func:`~moekit.fused_experts` runs the experts on the block's own
    weights. The switch reaches the experts classes transformers decorates with ``@use_experts_implementation``:
    Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, DeepSeek-V2/V3/V4, GLM-4.5, OLMoE, gpt-oss, LongCat-Flash
    (transformers >= 5.25: its block adds the zero experts' share itself and hands the experts weight-0 slots).
    Llama 4, DBRX, JetMoE (and LongCat-Flash before 5.25) have no such decorator: transformers runs their own experts
    forward whatever ``experts_implementation`` says. Call :func:`check_registered` on a model to make sure every MoE
    block runs moekit (it raises there); use :func:`patch` for them. Quantised experts (transformers' ``FP8Experts``)
    dispatch through their own experts interface: the name is registered there too, as a forward that raises
    ``NotImplementedError`` pointing to :func:`patch` (which runs them in their format). The gate function is the
    experts module's own ``act_fn`` (what transformers runs), else the config's ``hidden_act``. Without transformers,
    ``ImportError``; a name of transformers' own (``"eager"``, ``"grouped_mm"``...) -> ``ValueError``.
    """
    _require_transformers("register")
    from transformers.integrations.moe import ExpertsInterface

    if not isinstance(name, str):
        raise TypeError(f"name must be a str (the experts_implementation value), got {type(name).__name__}: {name!r}")
    taken = getattr(ExpertsInterface, "_global_mapping", {}).get(name)  # (round 65: "eager" / "grouped_mm" replaced
    quantised = quantised_interfaces()  # transformers' own everywhere; round 66: those of quantised experts too)
    if not name or name == "eager" or taken not in (None, moekit_experts_forward) or any(
            c._global_mapping.get(name) not in (None, quantised_experts_refused) for c in quantised):
        raise ValueError(f"name must be a non-empty str that is none of transformers' own experts implementations "
                         f"(the experts_implementation value; e.g. 'moekit'), got {name!r}")
    ExpertsInterface.register(name, moekit_experts_forward)
    for c in quantised:  # (a clear refusal there, where transformers raised a KeyError saying it was not registered)
        c.register(name, quantised_experts_refused)
    return name


def check_registered(model, name: str = "moekit") -> list[str]:
    """Check that transformers' experts switch really runs moekit in every MoE block of ``model``.

    Returns the module paths of the experts modules that call moekit. Raises ``ValueError`` when the
    model was not built with ``experts_implementation=name`` (or :func:`register` was not called), and
    ``NotImplementedError`` naming the MoE blocks the switch does not run (Llama 4, DBRX, JetMoE, LongCat-Flash
    before 5.25: experts classes not decorated with ``@use_experts_implementation``; Muse Spark: a post-expert norm)
    with the advice to use :func:`patch`; ``ValueError`` for a model :func:`patch` patched (its blocks run moekit
    layers, not the switch).
    """
    _require_transformers("check_registered")
    from transformers.integrations.moe import ExpertsInterface

    if name not in ExpertsInterface():
        raise ValueError(f"experts implementation {name!r} is not registered; call register({name!r}) first")
    _spec, plans = plan_layers(_model_config_dict(model), "the model's config")
    reached, unreached, other = [], [], []
    for path, module, _plan in _planned_blocks(model, plans):
        if isinstance(module, MoEBlockAdapter) or isinstance(getattr(module, "experts", None), LayerMoEAdapter):
            raise ValueError(f"{type(model).__name__} was patched by moekit.integrations.transformers.patch ({path} "
                             "runs a moekit layer, not transformers' experts switch); check_registered checks the "
                             "switch: call it on a model that was not patched (or unpatch(model) first)")
        experts = getattr(module, "experts", None)
        if experts is None:  # no experts module (JetMoE, Granite: stacks on the block itself)
            unreached.append(f"{path} ({type(module).__name__})")
            continue
        if not all(hasattr(experts, a) for a in _SWITCH_ATTRS) or getattr(experts, "has_post_expert_norm", False):
            unreached.append(f"{path} ({type(experts).__name__})")  # (Muse Spark's norm: refused at forward)
            continue
        interface = switch_interface(experts)  # (round 66: FP8Experts dispatch through their own interface)
        if interface is not None and interface._global_mapping.get(name) is not moekit_experts_forward:
            unreached.append(f"{path} ({type(experts).__name__}: quantised experts)")
            continue
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        (reached if impl == name else other).append(f"{path}.experts")
    if unreached:
        raise NotImplementedError(
            f"transformers' experts switch does not reach {len(unreached)} MoE block(s) of "
            f"{type(model).__name__}: {', '.join(unreached[:4])}{' ...' if len(unreached) > 4 else ''}; their "
            f"experts class is not decorated with @use_experts_implementation (experts_implementation={name!r} is "
            "ignored there), has a post-expert norm it cannot run, or holds quantised experts (transformers' "
            "FP8Experts: fp8 stacks for its own kernels). Use moekit.integrations.transformers.patch(model)"
        )
    if other or not reached:
        impl = getattr(model.config, "_experts_implementation", None)
        raise ValueError(
            f"{type(model).__name__} runs experts_implementation={impl!r}, not {name!r}: load it with "
            f"from_pretrained(..., experts_implementation={name!r}) or call "
            f"model.set_experts_implementation({name!r})"
        )
    return reached
