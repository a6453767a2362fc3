"""The architecture registry: config.json (a dict) -> the MoE blocks' :class:`LayerPlan`.

Each spec mirrors the transformers 5.x modeling file of its architecture (module names, routing math,
defaults of its config class) and names the keys its checkpoints use on disk. No transformers import.
Specs live in family modules under :mod:`moekit.loading.archs`; add a family module to ``FAMILIES``.
A family module may also list ``REFUSED`` model types (why the layer contract cannot express them).
"""

from __future__ import annotations

import difflib
import textwrap
from dataclasses import replace

from .archs import core, ds3, gemma4, granite, mixtral_like, qwen_like, sigmoid_bias, singletons
from .archs.common import ArchSpec, block_path, prefixes
from .archs.config_defaults import complete
from .archs.gate_dtypes import gate_fp32_dtypes
from .fields import check_plan_numbers, non_finite
from .plan import LayerPlan

FAMILIES = (core, mixtral_like, granite, qwen_like, singletons, ds3, sigmoid_bias, gemma4)
SPECS: tuple[ArchSpec, ...] = tuple(s for family in FAMILIES for s in family.SPECS)
BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}
#: multimodal wrapper model_type -> (spec of its text tower, sub-config key, layer stack in the wrapper)
TOWERS = {w: (s, key, stack) for s in SPECS for w, key, stack, _ in s.towers}
#: wrapper model_type -> its checkpoints' other roots of that stack (Kimi-K2.5's ``language_model.model.blocks``)
TOWER_CKPT_STACKS = {w: disk for s in SPECS for w, _, _, disk in s.towers if disk}
#: model types moekit refuses on purpose, and why (what the layer contract is missing)
REFUSED = {t: why for family in FAMILIES for t, why in getattr(family, "REFUSED", {}).items()}


def supported_model_types() -> list[str]:
    """Returns every config.json ``model_type`` moekit loads and patches (wrappers of a text tower included), sorted."""
    return sorted(set(BY_MODEL_TYPE) | set(TOWERS))


#: the architectures an unsupported model_type's error names on its first line (the rest: counted)
_NAMED = 13


def close_model_type(mt: str) -> str | None:
    """Returns the supported model_type ``mt`` is likely a misspelling of (``'qwen3moe'`` -> ``'qwen3_moe'``; case and
    ``-`` ignored), or None. A supported type that merely extends ``mt`` (``'llama'`` -> ``'llama4'``, ``'qwen3'`` ->
    ``'qwen3_moe'``) is not offered: ``mt`` is then most likely that family's dense model, not a typo."""
    types = supported_model_types()
    norm = mt.lower().replace("-", "_")
    if norm in types:
        return norm
    return next((t for t in difflib.get_close_matches(norm, types, n=3, cutoff=0.75) if not t.startswith(norm)), None)


def unsupported_message(mt) -> str:
    """Returns the error for a ``model_type`` moekit has no spec for: a first line naming it (and a close supported
    one), the first architectures, how many model types there are and the function listing them (``moekit inspect``
    prints this line alone); then every supported model type, wrapped (<= 100 characters a line)."""
    types = supported_model_types()
    close = close_model_type(mt) if isinstance(mt, str) else None
    hint = f" (did you mean {close!r}?)" if close else ""
    names = ", ".join(s.name for s in SPECS[:_NAMED])
    more = f" and {len(SPECS) - _NAMED} more" if len(SPECS) > _NAMED else ""
    listed = textwrap.fill(", ".join(types), width=100, initial_indent="  ", subsequent_indent="  ",
                           break_long_words=False, break_on_hyphens=False)
    return (f"model_type={mt!r} is not supported{hint}; supported architectures: {names}{more} ({len(types)} model "
            f"types in all: moekit.loading.supported_model_types())\nsupported model types:\n{listed}")


def spec_for(config: dict) -> ArchSpec:
    """The spec of a config.json dict; unsupported architectures raise ``NotImplementedError``
    (:func:`unsupported_message`)."""
    mt = config.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise ValueError(f"config.json's model_type must be a string, e.g. 'deepseek_v3', got {mt!r}")
    if mt in REFUSED:
        raise NotImplementedError(f"model_type={mt!r} is not supported by moekit: {REFUSED[mt]}")
    if mt in TOWERS:
        return TOWERS[mt][0]
    if mt not in BY_MODEL_TYPE:
        raise NotImplementedError(unsupported_message(mt))
    return BY_MODEL_TYPE[mt]


def restack(plan: LayerPlan, spec: ArchSpec, stack: str, ckpt_stacks: tuple[str, ...] = ()) -> LayerPlan:
    """``plan`` with its block at ``{stack}.{i}.{block}`` (a tower inside a multimodal wrapper), its keys also under
    the wrapper's other on-disk stacks ``ckpt_stacks``."""
    i = plan.layer_idx
    return replace(plan, name=block_path(spec, i, stack), ckpt_prefixes=prefixes(spec, i, stack, ckpt_stacks))


def plan_layers(config: dict, source: str = "config.json") -> tuple[ArchSpec, list[LayerPlan]]:
    """(spec, the MoE blocks of the model in layer order); ``quantization_config`` is read by the loader.
    A multimodal wrapper (``ArchSpec.towers``) plans its text tower's config at the tower's stack.
    A field the architecture needs that is missing, or of the wrong type or length, raises ``ValueError``
    naming ``source`` (the file), the model type and the field, not a bare ``KeyError`` from inside a plan; so does a
    number that is not finite (``Infinity``, ``NaN``) or a size a block cannot have (``hidden_size`` -1, a negative
    shared expert width), which raised ``OverflowError`` / ``RuntimeError`` from torch before (round 55)."""
    spec = spec_for(config)
    try:
        spec, plans = _plan_layers(config, spec)
    except KeyError as err:
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} ({spec.name}) needs the field "
                         f"{err.args[0]!r}, which is missing") from None
    except (ArithmeticError, IndexError, TypeError, ValueError) as err:  # ArithmeticError: int(inf), a 0 divisor
        # the non-finite fields are to blame only for the errors they raise (int(inf), int(nan)): not for another
        # field's bad value (review)
        nan = isinstance(err, ValueError) and "NaN" in str(err)
        bad = non_finite(raw_text_config(config)) if isinstance(err, OverflowError) or nan else []
        why = (f"{', '.join(bad)}: not a finite number ({err})" if bad
               else f"a field has a wrong value, type or length: {err}")
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} ({spec.name}): {why}") from None
    check_plan_numbers(plans, raw_text_config(config), source)
    return spec, plans


def _plan_layers(config: dict, spec: ArchSpec) -> tuple[ArchSpec, list[LayerPlan]]:
    """The plans of ``config`` read as its transformers config class reads it (:func:`.archs.config_defaults.complete`:
    the class's aliases and defaults for the fields the file lacks). A model type whose router gate weight transformers
    keeps in float32 (:mod:`.archs.gate_dtypes`) plans it so."""
    plans = spec.plan(text_config(config), spec)
    mt = config.get("model_type")
    if keep := gate_fp32_dtypes(mt):  # (every such gate computes in float32 in transformers: router_fp32 too)
        plans = [replace(p, gate_fp32_dtypes=keep, router_fp32=True) for p in plans]
    if mt not in TOWERS:
        return spec, plans
    return spec, [restack(p, spec, TOWERS[mt][2], TOWER_CKPT_STACKS.get(mt, ())) for p in plans]


def text_config(config: dict) -> dict:
    """The config of the model the MoE blocks live in (a multimodal wrapper's text tower, :data:`TOWERS`), read as
    its transformers config class reads it (:func:`.archs.config_defaults.complete`: the class's aliases and defaults
    for the fields the file lacks). ``ValueError`` for a wrapper without its text tower."""
    mt = config.get("model_type")
    if mt not in TOWERS:
        return complete(config, mt)
    spec, key, _ = TOWERS[mt]
    text = raw_text_config(config)
    if text is None:
        raise ValueError(f"model_type={mt!r}: config.json has no {key!r} (the text tower holding the MoE blocks)")
    text_type = text.get("model_type") or tower_text_type(mt, spec)
    return complete(dict(text, model_type=text_type), text_type)


def raw_text_config(config: dict) -> dict | None:
    """The dict of config.json holding the MoE blocks' fields as the file has them (a wrapper's text tower, no
    defaults added); None for a wrapper without its text tower."""
    mt = config.get("model_type")
    if mt not in TOWERS:
        return config
    text = config
    for part in TOWERS[mt][1].split("."):
        text = text.get(part) if isinstance(text, dict) else None
    return text if isinstance(text, dict) else None


def tower_text_type(wrapper: str, spec: ArchSpec) -> str:
    """The model type of a wrapper's text tower when its sub-config does not say: ``{wrapper}_text`` where the
    spec has it (Inkling-2-Loop's tower is ``inkling2_loop_text``), else the spec's first model type."""
    return f"{wrapper}_text" if f"{wrapper}_text" in spec.model_types else spec.model_types[0]


def rename_block_key(spec: ArchSpec, rest: str) -> str:
    """A block-relative checkpoint key (or transformers tensor name) -> the moekit layer's name for it."""
    for old, new in spec.renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def checkpoint_block_key(spec: ArchSpec, name: str) -> str:
    """The inverse of :func:`rename_block_key`: a block-relative moekit name -> the checkpoint's."""
    for old, new in spec.renames:
        if name.startswith(new):
            return old + name[len(new) :]
    return name
