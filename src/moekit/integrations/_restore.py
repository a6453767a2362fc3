"""What :func:`moekit.integrations.transformers.patch` keeps so that
:func:`~moekit.integrations.transformers.unpatch` can go back: each stand-in holds, by reference, the module(s) it
replaced, outside the module tree (not in ``parameters()``, ``state_dict()`` or ``modules()``: no tensor is counted
twice, ``model.to()`` does not reach them); each guarded model holds the handle of its ``output_router_logits``
pre-hook.
"""

from __future__ import annotations

#: attribute (in the stand-in's ``__dict__``) holding what a stand-in replaced: the block (a ``MoEBlockAdapter``) or,
#: for a layer-level MoE (Gemma 4), ``{member: module}`` of the decoder layer's MoE attributes (a ``LayerMoEAdapter``)
ORIGINAL = "_moekit_original"
#: attribute of a guarded model holding the ``RemovableHandle`` of its router-logits forward pre-hook
GUARD = "_moekit_router_logits_guard"


#: what a stand-in holds instead when ``patch(restorable=False)`` dropped an original that would cost memory
DROPPED = "_moekit_dropped_bytes"


def extra_bytes(original, moe) -> int:
    """Bytes of ``original``'s tensors (a module, or ``{member: module}``) that ``moe`` does not share: what keeping
    ``original`` costs beyond the moekit layer (0 where the layer's parameters are the block's own tensors)."""
    shared = {t.untyped_storage().data_ptr() for t in list(moe.parameters()) + list(moe.buffers())}
    mods = original.values() if isinstance(original, dict) else [original]
    seen, total = set(), 0
    for m in mods:
        for t in list(m.parameters()) + list(m.buffers()):
            st = t.untyped_storage()
            if t.device.type == "meta" or st.data_ptr() in shared or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def keep_original(stand_in, original, moe, restorable: bool) -> None:
    """Keep ``original`` (a module, or ``{member: module}``) on ``stand_in`` by reference, outside the module tree,
    when that costs no memory (``moe`` shares its tensors) or ``restorable``; else record the bytes dropped."""
    cost = extra_bytes(original, moe)
    if cost == 0 or restorable:
        stand_in.__dict__[ORIGINAL] = original
    else:
        stand_in.__dict__[DROPPED] = cost


def check_restorable(model) -> None:
    """Raise ``ValueError`` naming the stand-ins of ``model`` whose originals :func:`keep_original` dropped (before
    anything is put back: :func:`restore_blocks` then restores all or nothing)."""
    dropped = [(n or "<model>", m.__dict__[DROPPED]) for n, m in model.named_modules() if DROPPED in m.__dict__]
    if dropped:
        names = ", ".join(f"{n} ({_size(b)})" for n, b in dropped[:4]) + (" ..." if len(dropped) > 4 else "")
        raise ValueError(
            f"unpatch(): {len(dropped)} block(s) were patched with converted copies of their weights and their "
            f"originals were not kept: {names}; patch(model, restorable=True) keeps them (at that memory cost) "
            f"so that unpatch() can restore them; nothing was changed")


def restore_blocks(model, stand_in_types: tuple[type, ...]) -> list[str]:
    """Put back in ``model`` every module a stand-in holding its original replaced; returns the paths restored (the
    block's, or the decoder layer's for a layer-level MoE) in module order. Stand-ins without an original (built by
    hand) stay. A restored module takes its stand-in's train/eval mode where they differ."""
    restored = []
    for name, module in list(model.named_modules()):
        original = module.__dict__.get(ORIGINAL)
        if original is None or not name:  # not a stand-in of patch(), or ``model`` itself (nothing to put it in)
            continue
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
    _remove_guards(model, stand_in_types)
    return restored


def _size(nbytes: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def _put_back(parent, attr: str, original) -> None:
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
        handle.remove()
        del module.__dict__[GUARD]
