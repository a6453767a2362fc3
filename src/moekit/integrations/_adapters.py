"""The modules :func:`moekit.integrations.transformers.patch` puts in a transformers model: :class:`MoEBlockAdapter`
(in place of an MoE block), :class:`LayerMoEAdapter` and ``_NoRouting`` (a decoder layer whose MoE is made of its
attributes, Gemma 4). Each may hold a router-logits record (:mod:`._record`) for ``output_router_logits``.
"""

from __future__ import annotations

import warnings

import torch

from ..loading.plan import LayerPlan
from ._blocks import refuse_train_routing
from ._record import collecting
from ._restore import DROPPED


def _warn_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """A patched block's ``state_dict`` holds moekit's names, which ``from_pretrained`` does not read: say so, and
    what ``unpatch`` needs (round 68: for a block patched with converted copies and no original kept, gpt-oss's, the
    advice to unpatch led to unpatch's refusal)."""
    how = ("call moekit.integrations.transformers.unpatch(model) before save_pretrained (a PEFT adapter: save it "
           "while patched, PeftModel.save_pretrained, or merge_and_unload() before unpatch)" if DROPPED not in
           module.__dict__ else "unpatch(model) cannot restore this block (patched with converted copies of its "
           "weights, its original not kept): patch a freshly loaded model with patch(model, restorable=True) to save "
           "it in transformers' format later, or save moekit's state_dict")
    warnings.warn("a model patched by moekit has moekit's state_dict keys for its MoE blocks (e.g. "
                  f"'moe.routed_experts.w13_weight'), which transformers' from_pretrained does not read: {how}",
                  UserWarning, stacklevel=2)


class _Recording(torch.nn.Module):
    """What both adapters share: the router-logits record (a child under the replaced router's name, or none)."""

    def _init_record(self, record) -> None:
        """record: ``(child name, record module)`` from :func:`._record.make_record`, ``(None, why)`` (the model
        records router logits, this block cannot), ``(None, None)`` (the model records none) or None (an adapter built
        by hand: it records none, and a forward asking for them refuses)."""
        name, rec = record if record is not None else (None, f"{type(self).__name__} built without a record")
        self.record_name = name  # None: nothing recorded here; ``unrecorded`` then says why, if anything is missed
        self.unrecorded = None if name is not None else rec
        if name is not None:
            self.add_module(name, rec)

    @property
    def record(self):
        """The record module, or None."""
        return self._modules[self.record_name] if self.record_name is not None else None

    def _recorded_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, H_in] -> the layer's router logits [T, E + Z] the forward routes with, recorded while transformers'
        collector gathers them (:func:`._record.collecting`); also computed (and transformed as the record would,
        unrecorded) in training with grad enabled, so that a gradient-checkpointed layer's recomputation in the
        backward (no collector then) builds the forward's autograd graph; else None (the layer's own gate)."""
        rec = self.record
        if rec is None:
            return None
        now = collecting(rec)
        if not now and not (self.training and torch.is_grad_enabled()):
            return None
        logits = self.moe.compute_router_logits(x)
        recorded = rec.transform(logits)
        if now:
            rec(logits, recorded)
        return logits


class MoEBlockAdapter(_Recording):
    """Wraps a moekit layer so it is called like the transformers block it replaces.

    forward(hidden_states [..., H], input_ids=None) -> same as the original block (see
    :mod:`moekit.integrations.transformers`). Its ``state_dict`` warns (``UserWarning``) that its keys are moekit's:
    :func:`~moekit.integrations.transformers.unpatch` before ``save_pretrained``. In a forward that records router
    logits (``output_router_logits``) it records the logits it routes with through its record (:mod:`._record`).
    """

    def __init__(self, moe, plan: LayerPlan, train_routing: str | None = None, record=None):
        super().__init__()
        self._register_state_dict_hook(_warn_state_dict)
        self.moe = moe
        self.plan = plan
        self.output = plan.output
        self.needs_input_ids = plan.needs_input_ids
        self.train_routing = train_routing  # what the original block routes differently in training mode (None: no)
        self._init_record(record)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None, **_unused):
        if self.training and self.train_routing is not None:
            refuse_train_routing(self.train_routing)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids = input_ids.reshape(-1) if (self.needs_input_ids and input_ids is not None) else None
        logits = self._recorded_logits(x)  # None unless this forward records them (then the layer routes with them)
        if self.output == "hidden":
            return self.moe(x, logits, input_ids=ids).reshape(shape)
        if self.output == "hidden_logits":  # Llama 4: flattened output and the router logits
            logits = self.moe.gate(x) if logits is None else logits  # (the hot path: no second input check)
            return self.moe(x, logits, input_ids=ids), logits
        # gpt-oss: (hidden, router_scores [T, K]), the weights of the forward's own routing (one routing, the gate
        # inside the layer's internal graphs where they serve the call)
        out, weights = self.moe.forward_with_scores(x, logits, input_ids=ids)
        if self.output == "hidden_scores_over_k":  # OpenAI privacy filter: router_scores / K
            weights = weights / weights.shape[-1]
        return out.reshape(shape), weights.to(hidden_states.dtype)


class LayerMoEAdapter(_Recording):
    """Stands in for the ``experts`` of a decoder layer whose MoE is made of its attributes (Gemma 4):
    called as ``experts(hidden_states [T, H], top_k_index, top_k_weights)`` with the layer's input (the
    router and the pre-experts norm are pass-throughs), it returns the complete moekit layer output."""

    def __init__(self, moe, record=None):
        super().__init__()
        self._register_state_dict_hook(_warn_state_dict)
        self.moe = moe
        self._init_record(record)

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self._recorded_logits(x)
        return self.moe(hidden_states) if logits is None else self.moe(hidden_states, logits)


class _NoRouting(torch.nn.Module):
    """A router made redundant by :class:`LayerMoEAdapter`: returns ``(None, None, None)``."""

    def forward(self, hidden_states):
        return None, None, None
