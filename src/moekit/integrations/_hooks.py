"""Hugging Face accelerate's hooks on the modules :func:`moekit.integrations.transformers.patch` replaces (round 69).

accelerate does not use torch's hooks: ``add_hook_to_module`` wraps the module's ``forward`` and stores the hook in
``module._hf_hook`` (``dispatch_model``, ``cpu_offload``, ``disk_offload`` and ``from_pretrained(device_map=...)`` put
one on every module holding tensors). A replaced block's hook would stop running, silently. The rule:

- a *device hook* (accelerate's ``AlignDevicesHook`` without offloading, or a ``SequentialHook`` of those: it moves the
  inputs to the block's execution device, and with ``io_same_device`` the outputs back; it holds nothing of the
  block's structure) moves with the block: ``patch()`` puts the block's on its stand-in (the same hook object; a
  layer-level MoE's members' on theirs), so a model dispatched over devices keeps sending the block's inputs to its
  device; ``unpatch()`` puts the stand-in's hook of then (the same, another one, or none: removed while patched)
  back on the block. The device hooks of the modules inside a block (those ``dispatch_model`` adds to every
  submodule) only repeat the block's: the moekit layer runs on the block's device.
- any other accelerate hook (``CpuOffload`` of ``cpu_offload_with_hook``, hooks of one's own) is named in
  ``patch()``'s warning, as torch's forward hooks are: it does not run while patched, ``unpatch()`` brings it back.
- an offloading hook leaves the block's weights on the meta device, which ``patch()`` refuses.

accelerate is imported only where a module holds such a hook (it is installed then).
"""

from __future__ import annotations

#: the attribute accelerate's ``add_hook_to_module`` stores a module's hook in
HF_HOOK = "_hf_hook"


def is_device_hook(hook) -> bool:
    """Whether ``hook`` only aligns devices: accelerate's ``AlignDevicesHook`` without offloading (its class exactly:
    a subclass may do more), or a ``SequentialHook`` of such hooks."""
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:
        return False
    if type(hook) is SequentialHook:
        return all(is_device_hook(h) for h in hook.hooks)
    return type(hook) is AlignDevicesHook and not hook.offload


def other_hf_hook(module) -> str | None:
    """The class name of the accelerate hook on ``module`` if it is not a device hook (it stops running while the
    module is replaced), else None."""
    hook = module.__dict__.get(HF_HOOK)
    return type(hook).__name__ if hook is not None and not is_device_hook(hook) else None


def move_device_hook(block, stand_in) -> None:
    """Put the device hook of ``block`` (if it has one) on ``stand_in``, which replaces it; the block keeps it too (for
    ``unpatch()``). Its ``init_hook`` places the stand-in's tensors on the execution device, where the block's (the
    same tensors) are already."""
    hook = vars(block).get(HF_HOOK)
    if hook is not None and is_device_hook(hook):
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(stand_in, hook)


def hand_back_device_hook(stand_in, original) -> None:
    """``unpatch()``: give the replaced module the device hook its stand-in has now in place of its own device hook
    (none: removed). A hook of another kind on it stays."""
    theirs, mine = original.__dict__.get(HF_HOOK), stand_in.__dict__.get(HF_HOOK)
    mine = mine if mine is not None and is_device_hook(mine) else None
    if theirs is mine or (theirs is not None and not is_device_hook(theirs)):
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    if theirs is not None:
        remove_hook_from_module(original)
    if mine is not None:
        add_hook_to_module(original, mine)
