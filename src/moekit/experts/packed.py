"""Packed 4-bit words a :class:`~moekit.experts.routed.RoutedExperts` stores re-laid (``packed_layout == "rega"``,
:mod:`moekit.ops.w4_layout`) against state dicts, which hold SPEC §8's packing both ways: a load re-lays what it
wrote, a save writes SPEC §8's packing (whatever the layer stores)."""

from __future__ import annotations

import torch

from ..ops.w4_layout import relay_rega, unrelay_rega

#: the parameters a re-laid layer stores re-laid
RELAID_WEIGHTS = ("w13_weight", "w2_weight")


def relay_loaded(experts: torch.nn.Module, names, state_dict, prefix: str, local_metadata: dict) -> None:
    """After ``_load_from_state_dict``: re-lay each of ``names`` the state dict held. With ``assign=True`` the
    parameter is the caller's tensor: replaced by a re-laid copy, the caller's left as given."""
    for name in names:
        if prefix + name not in state_dict:
            continue
        relaid = relay_rega(getattr(experts, name).detach())
        if local_metadata.get("assign_to_params_buffers"):
            setattr(experts, name, torch.nn.Parameter(relaid, requires_grad=False))
        else:
            with torch.no_grad():
                getattr(experts, name).copy_(relaid)


def spec_packed_saved(names, destination: dict, prefix: str) -> None:
    """After ``_save_to_state_dict``: each of ``names`` in SPEC §8's packing."""
    for name in names:
        if prefix + name in destination:
            destination[prefix + name] = unrelay_rega(destination[prefix + name].detach())
