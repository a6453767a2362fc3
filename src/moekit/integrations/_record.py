"""transformers' ``output_router_logits`` on a patched model (round 59): the router logits its load-balancing loss
reads, recorded from the logits moekit routed with.

transformers records them with forward hooks it puts on every module of one class per model,
``_can_record_outputs["router_logits"]`` (an ``OutputRecorder``: e.g. Mixtral's ``MixtralTopKRouter``, output
``[0]``; Llama 4's ``Llama4Router``, output ``[1]``; a ``layer_name`` may restrict it, MiniMax's ``mlp.gate``), into
the collector its capturing model forward sets for its own context (a ``ContextVar``: per thread; a global while
compiling). A patched block no longer holds that router, so each adapter holds a *record* in its place: an instance
of a subclass of the router's class (transformers' hooks find it by class, and by path: it sits under the router's
name) with no parameters, whose forward takes ``router_logits [T, E + Z]`` and returns what the router returned at
the recorded index. The adapter calls it only while transformers' collector gathers ``router_logits``
(:func:`collecting`: transformers' own switch, so the innermost capturing model decides, per thread, as for its own
routers). The logits are moekit's own (the gate of the moekit layer, in the layer's ``router_logits_dtype``), the
ones that routed: the loss's gradient reaches the router weights through them, and the layer's output is the same
with and without recording. Capture hooks move with the blocks: a model hooked before :func:`~.transformers.patch`
gets its routers' hooks copied onto the records, and :func:`~.transformers.unpatch` copies the records' back
(transformers installs them once per model).
"""

from __future__ import annotations

import functools
import warnings

import torch

from ._hooks import other_hf_hook

#: routers whose recorded output is their softmax probabilities in float32, not their logits (by class name)
PROBABILITIES = frozenset({"Gemma4TextRouter", "DiffusionGemmaTextRouter"})
#: attribute (in a guarded model's ``__dict__``) holding the records its forward marked asked (:func:`mark_asked`)
ASKED = "_moekit_records_asked"
#: module of transformers' output-capture hooks and collector
_CAPTURE_MODULE = "transformers.utils.output_capturing"


class _Record:
    """The record's own behaviour, first in the MRO of ``Record<RouterClass>`` (see :func:`record_class`).
    ``router_rel``: the router's path in the replaced block (for a layer-level MoE: in the decoder layer)."""

    def __init__(self, columns: int, index: int, router_rel: str, keep: int | None = None, probs: bool = False):
        torch.nn.Module.__init__(self)
        self.columns, self.index, self.router_rel = columns, index, router_rel
        self.keep = columns if keep is None else keep  # the leading columns recorded (Inkling: not its shared slot)
        self.probs = probs  # record softmax(logits) in float32 (Gemma 4's router returns its probabilities there)
        self._is_hf_initialized = True  # (transformers' weight initialisation skips it: it has no weights)
        self.asked = False  # a forward of its model asks for router logits (its pre-hook; read where compiled only)
        if isinstance(self, torch.nn.Linear):  # (Llama 4's and PhiMoE's routers are nn.Linear: no weight here)
            self.in_features, self.out_features, self.weight, self.bias = None, columns, None, None

    def transform(self, router_logits: torch.Tensor) -> torch.Tensor:
        """router_logits: [T, columns] float -> what transformers' router returned at ``index``:
        ``router_logits[:, :keep]``, or their softmax in float32 with ``probs``."""
        if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2 or \
                router_logits.shape[-1] != self.columns:
            shape = list(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits)
            raise ValueError(
                f"{type(self).__name__} is moekit's recorder of router logits (it stands where transformers' router "
                f"{self.router_rel!r} of the block was); it takes router_logits [T, {self.columns}], got {shape}. The "
                "router of a patched block is its moekit layer's: adapter.moe.gate / adapter.moe.compute_router_logits")
        out = router_logits[:, :self.keep] if self.keep != self.columns else router_logits
        return torch.softmax(out, dim=-1, dtype=torch.float32) if self.probs else out

    def forward(self, router_logits: torch.Tensor, transformed: torch.Tensor | None = None):
        """A tuple holding :meth:`transform` of ``router_logits`` [T, columns] (or ``transformed``, computed already)
        at ``index``: what transformers' capture hook reads."""
        return (None,) * self.index + (self.transform(router_logits) if transformed is None else transformed,)

    def extra_repr(self) -> str:
        what = f"softmax(router_logits[:, :{self.keep}])" if self.probs else f"router_logits[:, :{self.keep}]"
        return f"records {what} as output [{self.index}]"

    def __reduce_ex__(self, protocol):  # (the class is made at run time: rebuilt from the router's class)
        return _rebuild, (type(self).__mro__[2], self.columns, self.index, self.router_rel), self.__dict__


@functools.cache
def record_class(router_cls: type) -> type:
    """``Record<RouterClass>``: :class:`_Record` over transformers' router class (one per class)."""
    return type(f"Record{router_cls.__name__}", (_Record, router_cls), {"__module__": __name__})


def _rebuild(router_cls: type, columns: int, index: int, router_rel: str):
    return record_class(router_cls)(columns, index, router_rel)


@functools.cache
def _collector():
    """transformers' active output collector (a ``ContextVar``-like object with ``get()``), or None where this
    transformers has none (then router logits cannot be recorded: :func:`make_record` says so)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector if callable(getattr(_active_collector, "get", None)) else None


def collecting(record) -> bool:
    """transformers' collector gathers ``router_logits`` in this forward (its context's: per thread). In a region
    torch.compile traces inside an eager model forward (a decoder layer compiled on its own) the collector's
    ``ContextVar`` cannot be read: there ``record.asked``, set by the model's pre-hook (:func:`mark_asked`)."""
    c = _collector()
    if c is None:
        return False
    if torch.compiler.is_compiling() and not getattr(c, "compiling", True):
        return record.asked
    out = c.get()
    return out is not None and "router_logits" in out


def mark_asked(model, asked: bool, records=()) -> None:
    """Mark ``records`` (those below ``model``) asked for this forward of ``model``, or unmark those its previous
    forward marked (:func:`collecting`'s compiled case)."""
    for r in model.__dict__.pop(ASKED, ()):
        r.asked = False
    if asked:
        for r in records:
            r.asked = True
        model.__dict__[ASKED] = list(records)


def _recorder_specs(pm) -> list:
    """The ``router_logits`` recorders of transformers model ``pm``: ``[(target_class | None, index, layer_name |
    None, class_name | None)]`` (a plain class spec records output [1], as transformers reads it)."""
    specs = (getattr(type(pm), "_can_record_outputs", None) or {}).get("router_logits")
    out = []
    for s in specs if isinstance(specs, (list, tuple)) else [specs] if specs is not None else []:
        if isinstance(s, type):
            out.append((s, 1, None, None))
        elif isinstance(s, str):
            out.append((None, 1, None, s))
        else:
            out.append((getattr(s, "target_class", None), getattr(s, "index", 0), getattr(s, "layer_name", None),
                        getattr(s, "class_name", None)))
    return out


def innermost_model(model, path: str):
    """The innermost transformers ``PreTrainedModel`` holding the module at ``path`` of ``model`` (``model`` itself
    if it is one and none is deeper), and the path below it; (None, path) if there is none."""
    from transformers import PreTrainedModel

    parts = path.split(".")
    found = (model, path) if isinstance(model, PreTrainedModel) else (None, path)
    mod = model
    for i, part in enumerate(parts[:-1]):
        mod = getattr(mod, part)
        if isinstance(mod, PreTrainedModel):
            found = (mod, ".".join(parts[i + 1:]))
    return found


def _named(layer_name: str, path: str) -> bool:
    """transformers' ``layer_name`` rule: ``.layer_name.`` occurs in ``.path.``."""
    return f".{layer_name.strip('.')}." in f".{path}."


def make_record(model, path: str, block, columns: int, shared: int = 0, parent: str = ""):
    """(child name, record) for the block at ``path`` of ``model`` (``block``: the transformers module about to be
    replaced, or the decoder layer of a layer-level MoE; ``columns``: the moekit layer's logit columns, E + Z;
    ``shared``: the last of them that are shared experts transformers' router does not score, Inkling's
    ``routed_shared_experts``; ``parent``: where the record sits below ``path``, "experts" for a layer-level MoE);
    (None, None) where transformers records nothing from the block (its model records no router logits, or from no
    module the block holds: DeepSeek-V4's hash-routed layers); (None, why) where it records what a record cannot
    stand for (two routers in one block, a ``layer_name`` the record's path misses, a spec by class name) or this
    transformers has no collector moekit knows."""
    pm, below = innermost_model(model, path)
    at = f"{below}.{parent}" if parent else below
    for target, index, layer_name, class_name in _recorder_specs(pm) if pm is not None else []:
        mods = [(rel, m) for rel, m in block.named_modules() if rel]
        if target is None:
            if class_name and any(f".{below}.{rel}".endswith(class_name) for rel, _ in mods):
                return None, f"{type(pm).__name__} records router logits from modules named *{class_name}"
            continue
        found = [(rel, m) for rel, m in mods
                 if isinstance(m, target) and (not layer_name or _named(layer_name, f"{below}.{rel}"))]
        if not found:
            continue
        rel, router = found[0]
        name = rel.rpartition(".")[2]
        if len(found) > 1 or (layer_name and not _named(layer_name, f"{at}.{name}")):
            return None, (f"{type(pm).__name__} records router logits from {len(found)} {target.__name__} module(s) "
                          f"of the block at {path} ({', '.join(r for r, _ in found)}), which moekit's record (one, "
                          f"at {path}.{f'{parent}.' if parent else ''}{name}) cannot stand for")
        if _collector() is None:
            return None, "this transformers version has no output collector moekit knows (transformers >= 5.17 has)"
        record = record_class(target)(columns, index, rel, columns - shared, target.__name__ in PROBABILITIES)
        carry_hooks(router, record)  # (a model hooked before patch(): transformers installs its hooks only once)
        return name, record
    return None, None


def carry_hooks(src, dst) -> None:
    """Copy transformers' output-capture forward hooks of module ``src`` onto ``dst`` (those it lacks)."""
    have = {id(h) for h in dst._forward_hooks.values()}
    for hook in list(src._forward_hooks.values()):
        if getattr(hook, "__module__", None) == _CAPTURE_MODULE and id(hook) not in have:
            dst.register_forward_hook(hook)


def warn_user_hooks(name: str, block, members=None) -> None:
    """A ``UserWarning`` naming the modules of the block ``name`` (a layer-level MoE: its decoder layer's ``members``)
    that hold forward or forward-pre hooks other than transformers' capture hooks, or an accelerate hook other than a
    device hook (:mod:`._hooks`; round 69: ``_hf_hook`` was not looked at): :func:`~.transformers.patch` replaces
    them, so they do not run while patched (round 63: they stopped silently); unpatch brings them back."""
    hooked = [(f"{name}.{rel}" if rel else name) + (f" (accelerate {other_hf_hook(m)})" if other_hf_hook(m) else "")
              for rel, m in block.named_modules()
              if (members is None or rel.split(".")[0] in members) and (m._forward_pre_hooks or any(
                  getattr(h, "__module__", None) != _CAPTURE_MODULE for h in m._forward_hooks.values())
                  or other_hf_hook(m))]
    if hooked:
        warnings.warn(f"patch(): forward hooks on {hooked} do not run while the block is patched (moekit replaces "
                      f"the module; unpatch() brings them back); register them on the patched module instead",
                      UserWarning, stacklevel=3)


def original_router(original, rel: str):
    """The router at ``rel`` in what a stand-in replaced (:data:`~._restore.ORIGINAL`): the block, or for a
    layer-level MoE ``{member: module}`` of the decoder layer (``rel``'s first part names the member)."""
    if isinstance(original, dict):
        member, _, rest = rel.partition(".")
        return original[member].get_submodule(rest) if rest else original[member]
    return original.get_submodule(rel)
