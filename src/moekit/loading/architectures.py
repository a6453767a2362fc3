"""The architecture registry: config.json (a dict) -> the MoE blocks' :class:`LayerPlan`.

Each spec mirrors the transformers 5.x modeling file of its architecture (module names, routing math,
defaults of its config class) and names the keys its checkpoints use on disk. No transformers import.
Specs live in family modules under :mod:`moekit.loading.archs`; add a family module to ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import replace

from .archs import core
from .archs.common import ArchSpec
from .plan import LayerPlan

FAMILIES = (core,)
SPECS: tuple[ArchSpec, ...] = tuple(s for family in FAMILIES for s in family.SPECS)
BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def spec_for(config: dict) -> ArchSpec:
    """The spec of a config.json dict; unsupported architectures raise ``NotImplementedError``."""
    mt = config.get("model_type")
    if mt not in BY_MODEL_TYPE and not (mt == "llama4" and "text_config" in config):
        names = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in SPECS)
        raise NotImplementedError(f"model_type={mt!r} is not supported; supported architectures: {names}")
    return BY_MODEL_TYPE[mt]


def plan_layers(config: dict) -> tuple[ArchSpec, list[LayerPlan]]:
    """(spec, the MoE blocks of the model in layer order); ``quantization_config`` is read by the loader."""
    if config.get("model_type") == "llama4" and isinstance(config.get("text_config"), dict):
        # the multimodal wrapper: its text tower is Llama4ForCausalLM at ``language_model``
        text = dict(config["text_config"], model_type="llama4_text")
        spec = spec_for(text)
        plans = [
            replace(
                p,
                name="language_model." + p.name,
                ckpt_prefixes=tuple("language_model." + c for c in p.ckpt_prefixes if c.startswith("model.")),
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
