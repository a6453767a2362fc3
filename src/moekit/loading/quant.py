"""Quantised checkpoints in :func:`moekit.load_moe_layers` (SPEC §8).

- The format: config.json's ``quantization_config`` (parsed by :func:`moekit.parse_quant_config`),
  or the ``quant_config=`` asked for when loading a full-precision checkpoint (then every expert
  weight is quantised as it is read). Asking to re-quantise a quantised checkpoint raises.
- Routed experts are quantised when the format applies to them (``fmt.applies_to`` of the block's
  ``experts.0.gate_proj`` / fused ``experts.gate_up_proj``: ``modules_to_not_convert`` / ``ignore``
  honoured); they then load through :func:`moekit.experts.mapping.load_layer_weights`.
- Shared experts of an fp8 checkpoint (DeepSeek-V3: ``weight`` e4m3 + ``weight_scale_inv``;
  compressed-tensors fp8 channel / tensor: ``weight_scale`` [+ ``input_scale``]) stay fp8: a
  :class:`~.quant_shared.QuantSharedMLP`, one expert with K = 1 through the routed experts' quantised
  op (:mod:`.quant_shared`); with ``quant_config=`` an fp8 format quantises them on load too, unless it
  ignores them. Decision and cost: docs/architecture.md.
- Everything else in the block stays in full precision: routers, gates and selection biases are read
  as they are (the selection bias in float32, never rounded); any other quantised dense linear of the
  block (``weight`` / ``weight_packed`` + a scale [+ ``input_scale``, ``weight_shape``]; shared experts of
  mxfp4 / int4 checkpoints) is dequantised once at load into its module's dtype (:func:`dense_groups`,
  :func:`dequantize_dense`).
"""

from __future__ import annotations

import re

import torch

from ..experts.mapping import EXPERT_KEY_RE, FUSED_KEY_RE, KIND_OF_SUFFIX
from ..ops.formats import Int4GroupFormat, Mxfp4Format, WeightFormat
from ..ops.quant_config import parse_quant_config
from ..ops.quantize import dequantize_weight
from .plan import LayerPlan

_DENSE_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>weight|weight_packed|weight_scale_inv|weight_scale|scale|input_scale|"
                       r"weight_shape)$")


def checkpoint_format(config: dict, quant_config) -> tuple[WeightFormat | None, bool]:
    """(the experts' format, whether the checkpoint ships quantised) for a config.json dict and the
    ``quant_config`` asked for (None: as the checkpoint is)."""
    shipped = parse_quant_config(config.get("quantization_config") or None)
    asked = parse_quant_config(quant_config)
    if shipped is not None and asked is not None and asked != shipped:
        raise NotImplementedError(
            f"quant_config={asked} asked for, but the checkpoint is already quantised ({shipped}); moekit does not "
            "re-quantise quantised weights: load it without quant_config"
        )
    return (shipped or asked), shipped is not None


def experts_format(fmt: WeightFormat | None, plan: LayerPlan) -> WeightFormat | None:
    """``fmt`` when it applies to the routed experts of ``plan``'s block, else None (full precision)."""
    if fmt is None:
        return None
    names = [f"{pre}experts.0.gate_proj" for pre in plan.ckpt_prefixes] + [f"{plan.name}.experts.gate_up_proj"]
    return fmt if all(fmt.applies_to(n) for n in names) else None


def dense_groups(keys: dict[str, str]) -> dict[str, dict[str, str]]:
    """The quantised dense linears among a block's ``{relative name: checkpoint key}``: ``{module:
    {part: key}}`` for modules outside the routed experts with a scale (parts ``weight``, ``scale``,
    and the ignored ``input_scale`` / ``weight_shape``)."""
    by_mod: dict[str, dict[str, str]] = {}
    for rel, key in keys.items():
        m = _DENSE_RE.match(rel)
        if m is None or EXPERT_KEY_RE.search(rel) or FUSED_KEY_RE.search(rel):
            continue
        by_mod.setdefault(m.group("mod"), {})[m.group("part")] = key
    return {mod: parts for mod, parts in by_mod.items() if any(KIND_OF_SUFFIX[p] == "scale" for p in parts)}


#: the checkpoint parts that hold a quantised linear's scale, in the order they are looked for
SCALE_PARTS = ("weight_scale_inv", "weight_scale", "scale")


def dequantize_dense(parts: dict[str, torch.Tensor], fmt: WeightFormat, what: str) -> torch.Tensor:
    """One quantised linear's checkpoint parts (``weight`` or ``weight_packed``, a scale) -> its weight
    [N, K] float32: ``W = Wq · S`` by ``fmt``'s rule for one matrix."""
    wq = parts.get("weight", parts.get("weight_packed"))
    scale = next((parts[p] for p in SCALE_PARTS if p in parts), None)
    if wq is None or scale is None:
        raise KeyError(f"{what}: a quantised linear needs a weight and its scale, got {sorted(parts)}")
    if isinstance(fmt, Mxfp4Format) and wq.dtype == torch.int8:
        wq = wq.view(torch.uint8)
    if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        scale = scale.view(torch.uint8) if isinstance(fmt, Mxfp4Format) else scale.float()
    if not isinstance(fmt, (Mxfp4Format, Int4GroupFormat)) and scale.dim() == 2 and scale.shape[1] == 1:
        scale = scale[:, 0]  # compressed-tensors per-channel scales are [N, 1]
    return dequantize_weight(wq, scale, fmt)
