"""Expert parameters put on a :class:`~moekit.RoutedExperts` by an assignment that bypasses its loaders: transformers'
``from_pretrained`` (``setattr(module, name, Parameter(loaded))``) and accelerate's ``load_checkpoint_and_dispatch`` /
``set_module_tensor_to_device`` (``module._parameters[name] = ...``). Round 69's audit: a user's own
``PreTrainedModel`` holding a moekit layer loaded by ``from_pretrained`` was refused as "not loaded" (the loaded-record
never saw the writes), so the standard loading path of such a model could not run.

The rule (:func:`assigned_whole`): the parameters the layer allocated itself are noted (:func:`remember_own`); each
expert tensor is either one of those, whose slots and shards the loaded-record must have seen written, or a parameter put
there from outside, read as a whole-tensor load with ``load_state_dict(assign=True)``'s checks: storage dtypes,
scale values and float16's range (:func:`~.params.check_state_tensors`, :func:`~.range16.check_named`), and no slot
or shard holding what a never-loaded layer holds (:func:`~.loaded_record.unset_slices`: NaN weights, NaN or 255
scales). Nothing is recorded: the answer is cached for these tensor objects (held weakly), so a parameter swapped
back (``functional_call`` restoring the layer's own) is judged again. A layer storing its 4-bit codes re-laid
(``packed_layout == "rega"``) refuses assigned codes (they come in SPEC §8's packing): ``RuntimeError``."""

from __future__ import annotations

import weakref

import torch
from torch.nn.utils import parametrize

from .._checks import values_checkable
from .loaded_record import unset_slices
from .packed import RELAID_WEIGHTS
from .params import check_state_tensors
from .placement_state import Transient
from .range16 import check_named

def remember_own(experts, names=None) -> None:
    """Note the current expert parameters of ``names`` (all when None) as the layer's own (held weakly; a copy or a
    pickle of the layer starts without: every tensor is then its own, judged by the loaded-record alone)."""
    held = experts.__dict__.get("_own_tensors")
    own = {} if held is None or held.value is None else dict(held.value)
    if names is not None and not own:  # (unknown stays unknown)
        return
    for name in experts.specs if names is None else names:
        t = experts._parameters.get(name)
        if t is not None:
            own[name] = weakref.ref(t)
    experts.__dict__["_own_tensors"] = Transient(own)


def own_names(experts) -> list[str]:
    """The expert parameters that are the layer's own now (for :func:`remember_own` after an ``_apply`` that may
    replace them: ``torch.__future__.set_overwrite_module_params_on_conversion``)."""
    own = experts.__dict__.get("_own_tensors")
    own = own.value if own is not None and own.value is not None else {}
    return [n for n, r in own.items() if r() is experts._parameters.get(n)]


def _foreign(experts, own: dict, name: str, t) -> bool:
    r = own.get(name)
    return isinstance(t, torch.nn.Parameter) and (r is None or r() is not t) and \
        not parametrize.is_parametrized(experts, name)


def assigned_whole(experts) -> bool:
    """Whether ``experts`` may run although its loaded-record is incomplete: some expert parameters were assigned from
    outside (module docstring) and hold loaded values, and every one of its own has every slot and shard written.
    ``ValueError`` / ``TypeError`` where an assigned tensor has the wrong shape, dtype or scale values (as
    ``load_state_dict(assign=True)`` would say); ``RuntimeError`` on a re-laid 4-bit layer."""
    own = experts.__dict__.get("_own_tensors")
    if own is None or own.value is None:  # (a copy or a pickle: the loaded-record alone)
        return False
    tensors = experts.expert_tensors()
    foreign = {n: t for n, t in tensors.items() if _foreign(experts, own.value, n, t)}
    if not foreign:
        return False
    written, slots = experts._record.written, range(experts.placement.num_local)
    for name, spec in experts.specs.items():
        if name not in foreign and any((slot, s, spec.kind) not in written for slot in slots for s in spec.shards):
            return False
    seen = experts.__dict__.get("_assigned_seen")
    if seen is not None and seen.value is not None and [r() for r in seen.value] == list(foreign.values()):
        return True
    if not all(values_checkable(t) for t in foreign.values()):
        return False  # (compile or capture: an eager call judges them first)
    relaid = sorted(set(foreign) & set(RELAID_WEIGHTS)) if experts.packed_layout == "rega" else []
    if relaid:
        raise RuntimeError(f"{relaid} of layer {experts.layer_name!r} were replaced by an assignment (transformers' "
                           "from_pretrained, accelerate), but this layer stores its 4-bit codes re-laid for its "
                           "kernels; load them with load_state_dict(), load_expert_weights() or "
                           "moekit.load_moe_layers()")
    for name, t in foreign.items():
        want = tuple(experts.specs[name].local_shape(experts.placement.num_local, experts.tp_rows))
        if tuple(t.shape) != want:
            raise ValueError(f"{name} of layer {experts.layer_name!r} was replaced by an assignment with shape "
                             f"{list(t.shape)}; the layer holds {list(want)}")
    check_state_tensors(experts, dict(foreign), "", assign=True)
    quantised = experts.quant is not None
    if any(unset_slices(experts.specs[n], t.detach(), quantised) for n, t in foreign.items()):
        return False
    check_named(experts, {n: t.detach() for n, t in tensors.items()}, "", "assigned ")
    experts.__dict__["_assigned_seen"] = Transient([weakref.ref(t) for t in foreign.values()])
    return True


def check_on_meta(experts, x: torch.Tensor) -> None:
    """``RuntimeError`` when the expert weights are on the meta device at the experts' call (the layer's own device
    check lets meta weights pass, for an offloading hook on the routed experts to bring them: accelerate's
    ``cpu_offload`` / ``disk_offload`` / ``dispatch_model``; round 69: every offloaded forward was refused)."""
    w = experts._parameters.get("w13_weight")
    if w is not None and w.is_meta and not x.is_meta:
        raise RuntimeError(f"the expert weights of layer {experts.layer_name!r} are on the meta device (offloaded with "
                           "no hook bringing them back, or never materialised: to_empty(), then load them); "
                           f"hidden_states is on {x.device}")
