"""The replaced modules :func:`moekit.integrations.transformers.patch` keeps for ``unpatch()`` hold the tensors their
moekit layer holds itself by weak reference (round 69).

Kept strongly, a block's tensors outlived the layer's: accelerate's offloading of a patched model (``cpu_offload``,
``disk_offload``, ``dispatch_model`` with offload) puts new parameter objects in the moekit layers (on the meta device
between calls), and the kept blocks went on holding the old ones: ``patch()`` then ``disk_offload`` freed no memory.
Now each parameter or buffer of a kept module that is one of its layer's own objects is held in the module's
``_parameters`` / ``_buffers`` as a :class:`WeakTensor`, in a :class:`WeakSlots` dict that reads it as the tensor: the
kept module reads and runs as before while the layer holds its tensors (the same objects), and does not keep them
alive. A tensor the layer no longer holds (replaced, offloaded) is freed with it, and reads as None; ``unpatch()``
then refuses the model (:func:`lost_bytes`). Views and other storage sharing stay held strongly, as before.
"""

from __future__ import annotations

import copy
import weakref

import torch


class WeakTensor:
    """A tensor held by weak reference: ``holder()`` is the tensor, or None once it was freed. A deep copy or a pickle
    holds the copied / unpickled tensor (through the memo, the same object as the copied layer's)."""

    __slots__ = ("ref", "nbytes")

    def __init__(self, t: torch.Tensor | None, nbytes: int | None = None):
        self.ref = weakref.ref(t) if t is not None else None
        self.nbytes = nbytes if nbytes is not None else t.untyped_storage().nbytes() if t is not None else 0

    def __call__(self) -> torch.Tensor | None:
        return self.ref() if self.ref is not None else None

    def __reduce__(self):
        return WeakTensor, (self(), self.nbytes)

    def __deepcopy__(self, memo):
        t = self()
        return WeakTensor(copy.deepcopy(t, memo) if t is not None else None, self.nbytes)


def strong(value):
    """A :class:`WeakTensor`'s tensor (None once freed); anything else as it is."""
    return value() if isinstance(value, WeakTensor) else value


class WeakSlots(dict):
    """A kept module's ``_parameters`` or ``_buffers``, some of whose values are :class:`WeakTensor`: read (``[]``,
    ``get``, ``items``, ``values``, ``pop``: what ``torch.nn.Module`` uses) as their tensors. Values set afterwards
    are held as given (strongly)."""

    __slots__ = ()

    def __getitem__(self, key):
        return strong(dict.__getitem__(self, key))

    def get(self, key, default=None):
        return strong(dict.get(self, key, default))

    def items(self):
        return [(k, strong(v)) for k, v in dict.items(self)]

    def values(self):
        return [strong(v) for v in dict.values(self)]

    def pop(self, key, *default):
        return strong(dict.pop(self, key, *default))

    def copy(self):
        return dict(self.items())

    def __reduce__(self):  # (pickles and copies hold the holders, not the tensors: weak there too)
        return WeakSlots, (), None, None, iter(dict.items(self))


def _submodule(original, path: str):
    """The module at ``path`` in a kept original (for ``{member: module}``: its first part names the member)."""
    if isinstance(original, dict):
        member, _, rest = path.partition(".")
        return original[member].get_submodule(rest)
    return original.get_submodule(path)


def weaken_shared(original, moe) -> list[tuple[str, str, str, WeakTensor]]:
    """Hold the parameters and buffers of ``original`` (a module, or ``{member: module}``) that are ``moe``'s own
    objects by weak reference (:class:`WeakSlots`); returns ``[(module path, "_parameters" | "_buffers", name,
    holder)]`` of them. Modules ``moe`` holds itself are left alone."""
    mine = {id(t) for t in list(moe.parameters()) + list(moe.buffers())}
    layer_modules = {id(m) for m in moe.modules()}
    entries = []
    for member, top in original.items() if isinstance(original, dict) else [("", original)]:
        for rel, m in top.named_modules():
            if id(m) in layer_modules:
                continue
            for kind in ("_parameters", "_buffers"):
                slots = m.__dict__[kind]
                held = {k: WeakTensor(t) for k, t in slots.items() if t is not None and id(t) in mine}
                if not held:
                    continue
                weak = WeakSlots(slots)  # (same keys, same order)
                for k, h in held.items():
                    dict.__setitem__(weak, k, h)
                    entries.append((".".join(p for p in (member, rel) if p), kind, k, h))
                m.__dict__[kind] = weak
    return entries


def lost_bytes(entries, moe) -> int:
    """Bytes of the weakly held tensors of ``entries`` (:func:`weaken_shared`) that ``moe`` no longer holds: freed,
    or no longer its own objects (replaced, or offloaded by accelerate)."""
    mine = {id(t) for t in list(moe.parameters()) + list(moe.buffers())} if entries else set()
    return sum(h.nbytes for *_, h in entries if h() is None or id(h()) not in mine)


def strengthen(original, entries) -> None:
    """Hold the tensors of ``entries`` (:func:`weaken_shared`) strongly again: plain dicts in ``original``'s modules."""
    for path, kind, _, _ in entries:
        m = _submodule(original, path)
        if isinstance(m.__dict__[kind], WeakSlots):
            m.__dict__[kind] = dict(m.__dict__[kind].items())
