"""The config.json fields behind a layer's arguments, for the loader's error messages (round 55).

A layer's construction checks (:func:`moekit.FusedMoE`, its router, :class:`moekit.MoEConfig`) name moekit's
arguments (``num_expert_group``, ``topk_group``, ``top_k``...); a checkpoint's config.json names them after its
architecture (``n_group``, ``topk_group``, ``num_experts_per_tok``...). :func:`construction_error` rewords such an
error with the file, the block and the fields; :func:`check_plan_numbers` refuses the sizes no layer can have
(``hidden_size`` -1, a negative shared-expert width) before torch meets them; :func:`non_finite` names the fields
holding ``Infinity`` / ``NaN``.

Their messages say who gave the fields (:func:`giver`): ``config.json`` where the loader (or ``moekit inspect``) read
the file, ``model.config`` where :func:`moekit.integrations.transformers.patch` planned a live transformers model.
"""

from __future__ import annotations

import math
import re

from .archs.common import E_KEYS

#: a moekit argument -> the config.json fields the architectures read it from (most common first)
ARG_FIELDS: dict[str, tuple[str, ...]] = {
    "num_experts": (*E_KEYS, "moe_num_experts"),
    "top_k": ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "moe_top_k"),
    "num_expert_group": ("n_group", "num_expert_group"),
    "topk_group": ("topk_group",),
    "hidden_size": ("hidden_size", "moe_hidden_size", "moe_latent_size", "d_model"),
    "intermediate_size": ("moe_intermediate_size", "expert_ffn_hidden_size", "intermediate_size", "ffn_hidden_size"),
    "shared_intermediate_size": ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
                                 "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                                 "shared_experts_intermediate_size", "shared_intermediate_size", "share_expert_dim",
                                 "moe_intermediate_size"),
    "routed_scaling_factor": ("routed_scaling_factor", "moe_routed_scaling_factor", "router_scaling_factor",
                              "route_scale"),
    "swiglu_limit": ("swiglu_limit",),
    "num_zero_experts": ("zero_expert_num",),
    "block_hidden_size": ("hidden_size",),
}
#: how construction errors spell an argument besides its name
_PHRASES = {"number of experts": "num_experts", "global_num_experts": "num_experts", "hidden size": "hidden_size"}
#: the arguments of :data:`ARG_FIELDS` that are real numbers (the others are counts and sizes)
_REAL_ARGS = ("routed_scaling_factor", "swiglu_limit")
#: the arguments a MoE block cannot do without: an explicit null for all their fields is refused, not defaulted
_NEEDED = ("num_experts", "top_k")
#: the plan's sizes and their least value (top_k and the expert groups: the construction checks)
_MINIMA = (("hidden_size", 1), ("intermediate_size", 1), ("num_experts", 1), ("shared_intermediate_size", 0),
           ("num_zero_experts", 0), ("routed_shared_experts", 0), ("block_hidden_size", 1))


def giver(source: str | None) -> str:
    """Returns who gave the fields an error names: ``"config.json"`` for a file (a path ending in ``.json``; None and
    the planner's default ``"config.json"``), ``"model.config"`` for anything else (``patch()`` passes
    ``"the model's config"``: the fields of the model's config object, read from no file)."""
    return "config.json" if source is None or source.endswith(".json") else "model.config"


def _same(v, value) -> bool:
    try:
        return float(v) == float(value)
    except (TypeError, ValueError):
        return False


def fields_of(text: dict | None, arg: str, value) -> str:
    """The config.json field(s) behind the layer argument ``arg`` of value ``value``: the first field of
    :data:`ARG_FIELDS` in ``text`` (the file's dict holding the blocks' fields) equal to it (``"n_group"``), else
    those present with their values (``"from n_shared_experts = -1, moe_intermediate_size = 8"``); ``""`` if none."""
    present = [f for f in ARG_FIELDS.get(arg, (arg,)) if isinstance(text, dict) and text.get(f) is not None]
    exact = [f for f in present if _same(text[f], value)]
    if exact:
        return exact[0]
    return "from " + ", ".join(f"{f} = {text[f]!r}" for f in present) if present else ""


def gives(text: dict | None, plan, args, source: str | None = None) -> str:
    """``"config.json gives topk_group = 5 (topk_group), num_expert_group = 4 (n_group)"`` for the ``args`` of
    ``plan`` (``model.config gives ...`` for a ``source`` that is no file: :func:`giver`); one the file lacks is the
    default of the architecture's config class (``"num_expert_group = 8 (the default: config.json has no n_group /
    num_expert_group)"``); ``""`` if no arg is a config.json field."""
    who, parts = giver(source), []
    for arg in args:
        value = getattr(plan, arg, None)
        if value is None or arg not in ARG_FIELDS:
            continue
        where = fields_of(text, arg, value) or f"the default: {who} has no {' / '.join(ARG_FIELDS[arg])}"
        parts.append(f"{arg} = {value} ({where})")
    return f"{who} gives " + ", ".join(parts) if parts else ""


def mentioned(message: str) -> list[str]:
    """The layer arguments of :data:`ARG_FIELDS` a construction error names, in the order it names them."""
    found = {}
    for word in list(ARG_FIELDS) + list(_PHRASES):
        m = re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", message)
        if m is not None:
            found.setdefault(_PHRASES.get(word, word), m.start())
    return sorted(found, key=found.get)


def construction_error(err: ValueError, plan, source: str, text: dict | None) -> ValueError:
    """``err`` (raised while the loader built ``plan``'s layer) naming ``source`` (the config.json path), the block
    and the config.json fields behind the arguments it names: ``"…/config.json: model.layers.1.mlp: topk_group must
    be <= num_expert_group (4), got 5; config.json gives topk_group = 5 (topk_group), num_expert_group = 4
    (n_group)"``. The caller chains ``err``."""
    message = str(err.args[0]) if err.args else str(err)
    clause = gives(text, plan, mentioned(message), source)
    return ValueError(f"{source}: {plan.name}: {message}" + (f"; {clause}" if clause else ""))


def check_plan_numbers(plans, text: dict | None, source: str) -> None:
    """``ValueError`` naming ``source``, the block and the fields for a size no layer can have (a width below 1,
    a negative shared-expert width...): torch raised ``RuntimeError`` (a negative dimension) at allocation before;
    for a count or size the file gives as a fraction (``num_experts: 8.5`` was read as 8); for a bool or a string in
    any of the fields (``num_experts_per_tok: true`` was read as 1); and for an expert count or top-k whose fields are
    all null (``num_local_experts: null`` was read as the class default, round 62). The fields are
    said to come from :func:`giver` of ``source`` (config.json, or a live model.config)."""
    who = giver(source)
    for arg, names in ARG_FIELDS.items() if isinstance(text, dict) else ():
        for f in names:
            v = text.get(f)
            if isinstance(v, (bool, str)):  # round 62: true was read as 1 expert per token, "2" as 2
                raise ValueError(f"{source}: {who} gives {f} = {v!r} ({arg}); expected a number")
            if arg not in _REAL_ARGS and isinstance(v, float) and math.isfinite(v) and not v.is_integer():
                raise ValueError(f"{source}: {who} gives {f} = {v!r} ({arg}); expected a whole number")
        nulls = [f for f in names if f in text and text[f] is None]
        # (only where the config plans MoE blocks: a dense Gemma 4 writes num_experts / top_k_experts null, review)
        if arg in _NEEDED and plans and nulls and all(text.get(f) is None for f in names):
            raise ValueError(f"{source}: {who} gives {nulls[0]} = null ({arg}); expected a whole number >= 1 "
                             "(a null count was read as the architecture's default)")
    for p in plans:
        for arg, least in _MINIMA:
            value = getattr(p, arg)
            if value is not None and value < least:
                where = fields_of(text, arg, value)
                raise ValueError(f"{source}: {p.name}: {who} gives {arg} = {value}"
                                 + (f" ({where})" if where else "") + f"; expected >= {least}")


def non_finite(text: dict | None) -> list[str]:
    """``"hidden_size = inf"`` for each number of ``text`` (and of its dict fields, one level down) that is not
    finite."""
    out = []
    for k, v in (text or {}).items():
        for name, x in ([(f"{k}.{k2}", v2) for k2, v2 in v.items()] if isinstance(v, dict) else [(k, v)]):
            if isinstance(x, float) and not math.isfinite(x):
                out.append(f"{name} = {x!r}")
    return out
