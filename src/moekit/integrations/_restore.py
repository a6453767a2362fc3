"""What :func:`moekit.integrations.transformers.patch` keeps so that
:func:`~moekit.integrations.transformers.unpatch` can go back: each stand-in holds, by reference, the module(s) it
replaced, outside the module tree (not in ``parameters()``, ``state_dict()`` or ``modules()``: no tensor is counted
twice, ``model.to()`` does not reach them); each guarded model holds the handle of its ``output_router_logits``
pre-hook. The tensors of a kept module that the moekit layer holds itself (the same parameter or buffer objects) are
held by weak reference only (:mod:`._weak`, :data:`WEAK`): the layer keeps them alive, and once it no longer holds them
(replaced, offloaded) they are not kept in memory for ``unpatch()`` either.
"""

from __future__ import annotations

import torch

from ._hooks import hand_back_device_hook
from ._weak import WeakTensor, lost_bytes, strengthen, weaken_shared

#: attribute (in the stand-in's ``__dict__``) holding what a stand-in replaced: the block (a ``MoEBlockAdapter``) or,
#: for a layer-level MoE (Gemma 4), ``{member: module}`` of the decoder layer's MoE attributes (a ``LayerMoEAdapter``)
ORIGINAL = "_moekit_original"
#: attribute of a guarded model holding the ``RemovableHandle`` of its router-logits forward pre-hook
GUARD = "_moekit_router_logits_guard"


#: what a stand-in holds instead when ``patch(restorable=False)`` dropped an original that would cost memory
DROPPED = "_moekit_dropped_bytes"
#: beside ORIGINAL: the bytes the original cost beyond the moekit layer when it was kept (to find it stale later)
KEPT_COST = "_moekit_kept_bytes"
#: a kept original may cost this much beyond the moekit layer without ``restorable``: small tensors the layer holds
#: converted (a bf16 selection bias widened to float32, fp8 scales) must not make a shared block unrestorable
FREE_BYTES = 1 << 20
#: beside ORIGINAL where the moekit layer holds converted copies of the block's expert stacks: a callable writing the
#: layer's weights back into the kept block's stacks (what training changed), called by ``unpatch()``
CARRY = "_moekit_carry_back"
#: beside ORIGINAL: ``[(WeakTensor(parameter), requires_grad)]`` of the original's parameters whose flag building the
#: layer changed
FLAGS = "_moekit_requires_grad"
#: beside ORIGINAL: ``[(module path in the original, "_parameters" | "_buffers", name, WeakTensor)]`` of the tensors
#: the original holds by weak reference, its moekit layer's own objects (:func:`weaken_kept`; round 69: kept strongly,
#: they pinned the weights once accelerate's offloading replaced the layer's parameters: ``patch()`` then
#: ``disk_offload`` freed nothing); ``unpatch()`` holds them strongly again
WEAK = "_moekit_weak_tensors"


def extra_bytes(original, moe) -> tuple[int, int]:
    """(bytes of ``original``'s tensors that ``moe`` does not share, bytes it shares) for ``original`` a module or
    ``{member: module}``: what keeping it costs beyond the moekit layer (storages compared, so views count as
    shared; each storage counted once)."""
    shared = {t.untyped_storage().data_ptr() for t in list(moe.parameters()) + list(moe.buffers())}
    mods = original.values() if isinstance(original, dict) else [original]
    seen, extra, same = set(), 0, 0
    for m in mods:
        for t in list(m.parameters()) + list(m.buffers()) + swizzled_storages(m):
            st = t.untyped_storage()
            if t.device.type == "meta" or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            if st.data_ptr() in shared:
                same += st.nbytes()
            else:
                extra += st.nbytes()
    return extra, same


def stored_tensor(obj) -> torch.Tensor | None:
    """The torch tensor a triton_kernels ``Tensor`` (a wrapper, not a ``torch.Tensor``) stores, ``obj.storage.data``;
    None for anything else."""
    if obj is None or isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return None
    data = getattr(getattr(obj, "storage", None), "data", None)
    return data if isinstance(data, torch.Tensor) else None


def swizzled_storages(module) -> list[torch.Tensor]:
    """The torch tensors ``module`` and its submodules hold as triton_kernels ``Tensor`` attributes or in a
    ``PrecisionConfig``'s ``weight_scale`` (transformers' mxfp4 experts on a GPU). They are not parameters or
    buffers, so a byte count over those (what keeping a replaced block for ``unpatch()`` costs) misses them: a
    swizzled block patched by :func:`~._quant.mxfp4_stacks` keeps them all (the moekit layer holds unswizzled
    copies), so :func:`extra_bytes` counts them."""
    out, seen = [], set()
    for m in module.modules():
        for value in vars(m).values():
            for t in (stored_tensor(value), stored_tensor(getattr(value, "weight_scale", None))):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def keep_original(stand_in, original, moe, restorable: bool, carry=None, flags=()) -> None:
    """Keep ``original`` (a module, or ``{member: module}``) on ``stand_in`` by reference, outside the module tree,
    when that costs little (``moe`` shares its tensors; what it holds converted is at most :data:`FREE_BYTES` or 1 %
    of what it shares) or ``restorable``, with ``carry`` (None, or a callable writing the layer's converted weights
    back into it: :data:`CARRY`) and ``flags`` (``(parameter, requires_grad)`` of its parameters that building the
    layer changed: :data:`FLAGS`); else record the bytes dropped."""
    cost, same = extra_bytes(original, moe)
    if restorable or cost <= max(FREE_BYTES, same // 100):
        stand_in.__dict__[ORIGINAL] = original
        stand_in.__dict__[KEPT_COST] = cost
        if carry is not None:
            stand_in.__dict__[CARRY] = carry
        if flags:
            stand_in.__dict__[FLAGS] = [(WeakTensor(t), old) for t, old in flags]  # (the layer's, or the original's)
    else:
        stand_in.__dict__[DROPPED] = cost


def weaken_kept(model) -> None:
    """Hold the parameters and buffers of every kept original of ``model`` (:func:`keep_original`; not done before)
    that are its moekit layer's own objects by weak reference (:func:`._weak.weaken_shared`, :data:`WEAK`): called
    once ``patch()`` succeeded (a failed one puts the blocks back as they were)."""
    for stand_in in model.modules():
        original, moe = stand_in.__dict__.get(ORIGINAL), stand_in._modules.get("moe")
        if original is not None and moe is not None and WEAK not in stand_in.__dict__:
            stand_in.__dict__[WEAK] = weaken_shared(original, moe)


def adapter_layers(module) -> list[str]:
    """The paths of PEFT adapter layers inside ``module`` (a LoRA layer wrapping its ``base_layer``, a
    ``modules_to_save`` wrapper): modules that neither transformers nor moekit built (round 69)."""
    return [n for n, m in module.named_modules() if callable(getattr(type(m), "get_base_layer", None))
            or "base_layer" in m._modules or ("original_module" in m._modules and "modules_to_save" in m._modules)]


def check_restorable(model) -> None:
    """Raise ``ValueError`` before anything is put back (:func:`restore_blocks` then restores all or nothing) when a
    stand-in of ``model`` dropped its original (:func:`keep_original`), or kept one that the moekit layer no longer
    shares (its weights replaced after :func:`patch`: ``load_state_dict(assign=True)``, ``load_expert_weights``,
    accelerate's offloading, ...; putting the original back would restore the weights it had at patch time, or
    weights no longer there: those it held by weak reference, :data:`WEAK`, freed)."""
    dropped, stale = [], []
    adapted = [f"{n}.moe.{a}" for n, m in model.named_modules() if ORIGINAL in m.__dict__ and hasattr(m, "moe")
               for a in adapter_layers(m.moe)]
    if adapted:  # (round 69: unpatch() put the blocks back without them, silently dropping what they trained)
        raise ValueError(f"unpatch(): PEFT adapter layers were added inside moekit layers after patch(): "
                         f"{_few(adapted)}; putting the blocks back would drop them and what they learned. Merge "
                         "them first (merge_and_unload()), or save the adapter while patched "
                         "(PeftModel.save_pretrained); nothing was changed")
    for n, m in model.named_modules():
        if DROPPED in m.__dict__:
            dropped.append(f"{n or '<model>'} ({_size(m.__dict__[DROPPED])})")
        elif ORIGINAL in m.__dict__ and hasattr(m, "moe"):
            now, lost = extra_bytes(m.__dict__[ORIGINAL], m.moe)[0], lost_bytes(m.__dict__.get(WEAK, ()), m.moe)
            if now > m.__dict__.get(KEPT_COST, now) or lost:
                stale.append(f"{n or '<model>'} ({_size(now + lost)} no longer shared)")
    if dropped:
        raise ValueError(
            f"unpatch(): {len(dropped)} block(s) were patched with converted copies of their weights and their "
            f"originals were not kept: {_few(dropped)}; patch a freshly loaded model with patch(model, "
            f"restorable=True) to keep them (at that memory cost) for unpatch(); nothing was changed")
    if stale:
        raise ValueError(
            f"unpatch(): the moekit layers of {len(stale)} block(s) no longer share the tensors of the blocks they "
            f"replaced (their weights were replaced after patch(): load_state_dict(assign=True), load_expert_weights, "
            f"or accelerate's offloading, e.g. cpu_offload / disk_offload / dispatch_model with offload, which "
            f"replaces the parameters): {_few(stale)}; putting the blocks back would restore the weights they had at "
            f"patch time, or weights no longer in memory; nothing was changed. To get transformers' blocks back, "
            f"load the model again (unpatch() before replacing or offloading its weights)")


def _few(items: list) -> str:
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def restore_blocks(model, stand_in_types: tuple[type, ...]) -> list[str]:
    """Put back in ``model`` every module a stand-in holding its original replaced; returns the paths restored (the
    block's, or the decoder layer's for a layer-level MoE) in module order. Stand-ins without an original (built by
    hand) stay. A restored module takes its stand-in's train/eval mode where they differ."""
    restored = []
    for name, module in list(model.named_modules()):
        original = module.__dict__.get(ORIGINAL)
        if original is None or not name:  # not a stand-in of patch(), or ``model`` itself (nothing to put it in)
            continue
        strengthen(original, module.__dict__.pop(WEAK, ()))  # (all alive and the layer's: check_restorable)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(original, dict):  # layer-level: the layer's MoE attributes, the layer's path
            for member, old in original.items():
                _put_back(parent, member, old)
            restored.append(parent_name)
        else:
            _put_back(parent, attr, original)
            restored.append(name)
        del module.__dict__[ORIGINAL]  # the stand-in, if still referenced elsewhere, no longer pins the original
        module.__dict__.pop(KEPT_COST, None)
        module.__dict__.pop(CARRY, None)
        for t, old in module.__dict__.pop(FLAGS, ()):  # (quantised weights patch() froze: the block's own again)
            t = t() if isinstance(t, WeakTensor) else t  # (a model patched before round 69 holds the parameter)
            if t is not None:
                t.requires_grad_(old)
    _remove_guards(model, stand_in_types)
    return restored


def _size(nbytes: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes} bytes"


def _put_back(parent, attr: str, original) -> None:
    hand_back_device_hook(getattr(parent, attr), original)  # (accelerate's device hook: the stand-in's, ._hooks)
    mode = getattr(parent, attr).training
    if getattr(original, "training", mode) != mode:
        original.train(mode)  # the model's mode changed while patched
    setattr(parent, attr, original)  # same key of ``parent._modules``: the module order is unchanged


def _remove_guards(model, stand_in_types: tuple[type, ...]) -> None:
    """Remove the router-logits pre-hook of every guarded module of ``model`` that holds no stand-in any more."""
    for module in model.modules():
        handle = module.__dict__.get(GUARD)
        if handle is None or any(isinstance(m, stand_in_types) for m in module.modules()):
            continue
        if hasattr(handle, "remove"):  # a model patched before round 50 (then pickled) holds True, not a handle
            handle.remove()
        del module.__dict__[GUARD]
