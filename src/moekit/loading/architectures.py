"""The architecture registry: config.json (a dict) -> the MoE blocks' :class:`LayerPlan`.

Each spec mirrors the transformers 5.x modeling file of its architecture (module names, routing math,
defaults of its config class) and names the keys its checkpoints use on disk. No transformers import.
Specs live in family modules under :mod:`moekit.loading.archs`; add a family module to ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import replace

from .archs import core, ds3, gemma4, sigmoid_bias
from .archs.common import ArchSpec
from .plan import LayerPlan

FAMILIES = (core, ds3, sigmoid_bias, gemma4)
SPECS: tuple[ArchSpec, ...] = tuple(s for family in FAMILIES for s in family.SPECS)
BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}
#: multimodal model types -> the spec of their text tower (``config["text_config"]``)
WRAPPERS = {w: s for s in SPECS for w in s.wrappers}


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def spec_for(config: dict) -> ArchSpec:
    """The spec of a config.json dict; unsupported architectures raise ``NotImplementedError``."""
    mt = config.get("model_type")
    if mt not in BY_MODEL_TYPE:
        names = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in SPECS)
        raise NotImplementedError(f"model_type={mt!r} is not supported; supported architectures: {names}")
    return BY_MODEL_TYPE[mt]


def plan_layers(config: dict) -> tuple[ArchSpec, list[LayerPlan]]:
    """(spec, the MoE blocks of the model in layer order). Quantised checkpoints raise NotImplementedError."""
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method", q) if isinstance(q, dict) else q
        raise NotImplementedError(f"quantised checkpoints (quantization_config={method!r}) are not supported yet")
    wrapped = WRAPPERS.get(config.get("model_type"))
    if wrapped is not None and isinstance(config.get("text_config"), dict):
        # a multimodal wrapper: its text tower's decoder layers live at ``wrapper_prefix + "layers.N"``
        text = dict(config["text_config"])
        text["model_type"] = text.get("model_type") or wrapped.model_types[0]
        spec = spec_for(text)
        pre = spec.wrapper_prefix
        plans = [
            replace(
                p,
                name=pre + p.name.removeprefix("model."),
                ckpt_prefixes=tuple(pre + c.removeprefix("model.") for c in p.ckpt_prefixes if c.startswith("model.")),
            )
            for p in spec.plan(text, spec)
        ]
        return spec, plans
    spec = spec_for(config)
    return spec, spec.plan(config, spec)


def rename_block_key(spec: ArchSpec, rest: str) -> str:
    """A block-relative checkpoint key -> the moekit layer's name for it."""
    for old, new in spec.renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest
