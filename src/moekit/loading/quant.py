"""Quantised checkpoints in :func:`moekit.load_moe_layers` (SPEC §8).

- The format: config.json's ``quantization_config`` (parsed by :func:`moekit.ops.quant_config.parse_hf_formats`;
  where transformers finds it, :func:`quantization_dict`), or the ``quant_config=`` asked for when loading a
  full-precision checkpoint (then every expert weight is quantised as it is read). Asking to re-quantise a
  quantised checkpoint raises, and so does asking for a static-input fp8 format (its input scales are
  calibrated, not made on load). A checkpoint may hold two formats: DeepSeek-V4's fp8 config with
  ``expert_dtype "fp4"`` ships mxfp4 routed experts and fp8 block dense linears (the shared experts).
- Routed experts are quantised when the format applies to them (``fmt.applies_to`` of every expert's
  projections / the fused ``experts.gate_up_proj``: ``modules_to_not_convert`` / ``ignore`` honoured, some
  experts of a block excluded: ``NotImplementedError``, :func:`experts_format`); they then load through
  :func:`moekit.experts.mapping.load_layer_weights`, a shipped format's expert weights checked for their storage
  dtype first (:func:`check_shipped_weight`).
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


import math
import re
from dataclasses import replace

import torch

from ..experts.mapping import EXPERT_KEY_RE, FUSED_KEY_RE, KIND_OF_SUFFIX
from ..ops.formats import Fp8ChannelFormat, Mxfp4Format, WeightFormat
from ..ops.quant_config import parse_hf_formats, parse_quant_config
from ..ops.quantize import dequantize_weight
from .architectures import TOWERS
from .plan import LayerPlan

_DENSE_RE = re.compile(r"^(?P<mod>.+)\.(?P<part>weight|weight_packed|weight_scale_inv|weight_scale|scale|input_scale|"
                       r"weight_shape)$")


#: model types whose transformers config class moves a top-level ``expert_dtype`` into ``quantization_config``
_FOLDS_EXPERT_DTYPE = ("deepseek_v4",)


def quantization_dict(config: dict) -> dict | None:
    """config.json's ``quantization_config`` where transformers reads it: at the top level, else in a multimodal
    wrapper's text sub-config (Kimi-K2.5 keeps it in ``text_config``). DeepSeek-V4 ships ``"expert_dtype": "fp4"``
    at the top level of config.json (V4.1 inside the dict): it is folded in, as ``DeepseekV4Config`` does (the dict's
    own ``expert_dtype`` wins; other config classes never read a top-level one)."""
    holder, q = config, config.get("quantization_config")
    if not q and config.get("model_type") in TOWERS:
        text = config
        for part in TOWERS[config["model_type"]][1].split("."):
            text = text.get(part) if isinstance(text, dict) else None
        if isinstance(text, dict) and text.get("quantization_config"):
            holder, q = text, text["quantization_config"]
    if not q:
        return None
    if not isinstance(q, dict):
        raise TypeError(f"config.json's quantization_config must be a dict (the Hugging Face form), got "
                        f"{type(q).__name__}: {q!r}")
    if holder.get("model_type") in _FOLDS_EXPERT_DTYPE and holder.get("expert_dtype") is not None \
            and "expert_dtype" not in q:
        q = {**q, "expert_dtype": holder["expert_dtype"]}
    return q


def checkpoint_formats(config: dict, quant_config) -> tuple[WeightFormat | None, WeightFormat | None, bool]:
    """(the routed experts' format, the format of the other quantised linears, whether the checkpoint ships
    quantised) for a config.json dict and the ``quant_config`` asked for (None: as the checkpoint is)."""
    q = quantization_dict(config)
    shipped, dense = _shipped_formats(q) if q is not None else (None, None)
    asked = parse_quant_config(quant_config)
    if shipped is not None and asked is not None and type(asked) is type(shipped) \
            and replace(asked, ignore=shipped.ignore, targets=shipped.targets) == shipped:
        asked = shipped  # the shipped format asked with another module list: loaded as it ships (round 66)
    if shipped is not None and asked is not None and asked != shipped:
        raise NotImplementedError(
            f"quant_config={asked} asked for, but the checkpoint is already quantised ({shipped}); moekit does not "
            "re-quantise quantised weights: load it without quant_config"
        )
    if shipped is None and getattr(asked, "static_input", False):
        raise ValueError(
            f"quant_config={asked} has static input scales: they are calibrated (the checkpoint's input_scale "
            "tensors), so a full-precision checkpoint cannot be quantised to it on load; use dynamic activations "
            "(static_input=False) or a checkpoint that ships the format"
        )
    if shipped is None:
        return asked, asked, False
    return shipped, dense, True


#: the ``quant_method`` values config.json may hold that moekit reads
_READ_METHODS = ("fp8", "mxfp4", "compressed-tensors")


def _shipped_formats(q: dict) -> tuple[WeightFormat, WeightFormat]:
    """:func:`parse_hf_formats` of config.json's ``quantization_config``, its errors naming that (round 68: an AWQ /
    GPTQ / bitsandbytes checkpoint was refused as "quant_config option quant_method='awq' is not supported", an
    argument never passed)."""
    method = q.get("quant_method")
    method = getattr(method, "value", method)  # (a transformers enum)
    shown = f"quant_method {method!r}"
    if method is None and (flag := next((k for k in ("load_in_4bit", "load_in_8bit") if q.get(k)), None)):
        shown = f"{flag} (a bitsandbytes checkpoint)"  # (older bitsandbytes configs hold no quant_method)
    if method not in _READ_METHODS:
        raise NotImplementedError(
            f"config.json's quantization_config has {shown}: moekit reads checkpoints quantised as "
            f"{', '.join(_READ_METHODS)} only (and full-precision ones); load the model's full-precision checkpoint "
            "instead (quant_config= quantises its experts on load)")
    try:
        return parse_hf_formats(q)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise type(err)(f"config.json's quantization_config: {err}") from None


def checkpoint_format(config: dict, quant_config) -> tuple[WeightFormat | None, bool]:
    """(the routed experts' format, whether the checkpoint ships quantised): :func:`checkpoint_formats`."""
    experts, _, shipped = checkpoint_formats(config, quant_config)
    return experts, shipped


def _may_match(pattern: str, vocab: set) -> bool:
    """False when ``pattern`` (``ops.formats`` matching: ``re:`` regexes, else dotted fnmatch windows) cannot match a
    name made of ``vocab``'s components: a literal component (no wildcard) outside it; regexes may match anything."""
    return pattern.startswith("re:") or all(any(c in w for c in "*?[") or w in vocab for w in pattern.split("."))


def experts_format(fmt: WeightFormat | None, plan: LayerPlan) -> WeightFormat | None:
    """``fmt`` when it applies to the routed experts of ``plan``'s block, else None (full precision).

    Decided from every expert's projections (``experts.{e}.{gate,up,down}_proj`` / ``w1, w3, w2`` under each key
    prefix), not expert 0's alone: a block whose experts are partly excluded by ``modules_to_not_convert`` /
    ``ignore`` (one layer holds one format) raises ``NotImplementedError`` naming the block and those experts
    (round 56's audit: ``experts.3`` listed was re-quantised silently; ``experts.0`` listed built the whole layer full
    precision, then blamed expert 1's scale). A fused ``experts.gate_up_proj`` excluded: the whole block."""
    fused = f"{plan.name}.experts.gate_up_proj"
    if fmt is None or fmt.is_ignored(fused):
        return None
    # each projection under both of its names (gate_proj / w1 ...): a checkpoint holds one of them
    roles = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
    projs = tuple(n for role in roles for n in role)
    # only patterns that can match one of these names count (a compressed-tensors ignore list names every layer's
    # other modules: E x 6 names x 60 patterns took 25 s over DeepSeek-V3's blocks; review of round 56)
    vocab = {w for pre in plan.ckpt_prefixes for w in pre.split(".")} | {"experts", *projs} | {
        str(e) for e in range(plan.num_experts)}
    fit = replace(fmt, ignore=tuple(p for p in fmt.ignore if _may_match(p, vocab)),
                  targets=tuple(t for t in fmt.targets if t == "Linear" or _may_match(t, vocab)))
    if not fit.ignore and "Linear" in fit.targets:
        return fmt
    # a projection is quantised when a target matches one of its names (or the fused stack's: round 63, targets
    # naming the per-expert modules, as compressed-tensors matches them, built the layer full precision and the
    # load blamed the checkpoint) and no ignore pattern matches any
    every = fmt.applies_to(fused)
    kept: dict[int, list[str]] = {}  # expert -> its projections left in full precision
    for e in range(plan.num_experts):
        names = [[f"{pre}experts.{e}.{p}" for pre in plan.ckpt_prefixes for p in role] for role in roles]
        out = [role[0] for role, ns in zip(roles, names) if any(fit.is_ignored(n) for n in ns) or not (
            every or any(fit.targets_match(n) for n in ns))]
        if out:
            kept[e] = out
    if not kept:
        return fmt
    if len(kept) == plan.num_experts and all(len(v) == len(roles) for v in kept.values()):
        return None
    ids = sorted(kept)
    shown = ", ".join(f"{e}" + ("" if len(kept[e]) == len(roles) else f" ({'/'.join(kept[e])})") for e in ids[:16])
    more = f" and {len(ids) - 16} more" if len(ids) > 16 else ""
    raise NotImplementedError(
        f"{plan.name}: the quantization config (targets, modules_to_not_convert / ignore) keeps routed experts "
        f"{shown}{more} ({len(ids)} of "
        f"{plan.num_experts}) in full precision and the others in {fmt.name}: moekit holds one format per layer "
        "(exclude all of the block's experts or none)")


#: storage dtypes a shipped format's expert weights may have besides ``weight_dtype`` (the same bytes)
_SAME_BYTES = {torch.uint8: (torch.int8,) + tuple(d for d in (getattr(torch, "float4_e2m1fn_x2", None),) if d)}


def stored_dtypes(fmt: WeightFormat) -> tuple[torch.dtype, ...]:
    """The dtypes a shipped weight of ``fmt`` may be stored in: ``weight_dtype`` and the same bytes."""
    return (fmt.weight_dtype,) + _SAME_BYTES.get(fmt.weight_dtype, ())


def check_shipped_weight(layer, rel: str, t: torch.Tensor, key: str, file: str, shipped: bool) -> None:
    """Refuse a routed-expert weight of a quantised checkpoint that is not in its format's storage dtype; anything
    else (a full-precision checkpoint, scales, biases) passes.

    ``rel``: the block-relative name the tensor loads as; ``key`` / ``file``: where it was read. The layer
    quantises a float weight it is given (quantise-on-load), so a shipped-quantised checkpoint's expert weight
    stored up-cast (bf16 / fp32 e4m3 values, its ``weight_scale_inv`` kept) loaded silently, its scale replaced
    or not depending on the storage order (round 56's audit: 86x off): ``TypeError`` naming the file, key and
    both dtypes. (e4m3 NaN codes in a weight are not looked for: a pass over every expert byte costs ~2 ms per 29 MB
    on the loading thread, 45 s over DeepSeek-V3's experts, for a damaged file whose outputs are NaN, not wrong.)"""
    fmt = layer.routed_experts.quant
    if not shipped or fmt is None:
        return
    m = EXPERT_KEY_RE.search(rel)
    f = FUSED_KEY_RE.search(rel) if m is None else None
    if m is not None:
        if KIND_OF_SUFFIX[m.group(4)] != "weight" or int(m.group(2)) >= layer.moe_config.num_experts:
            return  # (zero experts' rows are dropped)
    elif f is None or KIND_OF_SUFFIX[f.group(2) or ""] != "weight":
        return
    want = stored_dtypes(fmt)
    if t.dtype not in want:
        raise TypeError(f"{file}: checkpoint key {key!r} has dtype {t.dtype}, expected {' or '.join(map(str, want))}: "
                        f"the checkpoint ships its routed experts in {fmt.name} (config.json's quantization_config), "
                        "and a weight stored in another dtype would lose or replace its shipped scale")


def dense_groups(keys: dict[str, str]) -> dict[str, dict[str, str]]:
    """The quantised dense linears among a block's ``{relative name: checkpoint key}``: ``{module:
    {part: key}}`` for modules outside the routed experts with a weight and a scale (parts ``weight``, ``scale``,
    ``weight_shape`` (checked) and the ignored ``input_scale``)."""
    by_mod: dict[str, dict[str, str]] = {}
    for rel, key in keys.items():
        m = _DENSE_RE.match(rel)
        if m is None or EXPERT_KEY_RE.search(rel) or FUSED_KEY_RE.search(rel):
            continue
        by_mod.setdefault(m.group("mod"), {})[m.group("part")] = key
    # (a module with a weight beside its scale: Gemma 4's router has a learned ``scale`` vector and no quantised weight;
    # round 61: it was taken for a quantised linear, and every shipped-quantised Gemma 4 checkpoint failed to load)
    return {mod: parts for mod, parts in by_mod.items()
            if any(KIND_OF_SUFFIX[p] == "scale" for p in parts) and ("weight" in parts or "weight_packed" in parts)}


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
    if isinstance(fmt, Fp8ChannelFormat) and scale.dim() == 2 and scale.shape[1] == 1:
        scale = scale[:, 0]  # compressed-tensors per-channel scales are [N, 1] (not a block grid of one column)
    _check_dense(wq, scale, parts.get("weight_shape"), fmt, what)
    return dequantize_weight(wq, scale, fmt)


def _check_dense(wq: torch.Tensor, scale: torch.Tensor, shape, fmt: WeightFormat, what: str) -> None:
    """A quantised dense linear's weight in ``fmt``'s stored dtype, its scale in the format's grid for that weight and
    compressed-tensors' ``weight_shape`` (``shape``, [out, in] or None) its size (round 61: a bf16 weight beside a
    stale scale was multiplied by it, a grid of too many blocks was cut to fit: 97 % off, one of too few failed inside
    torch naming no key)."""
    want = stored_dtypes(fmt)
    if wq.dtype not in want:
        raise TypeError(f"{what}: a quantised linear's weight has dtype {wq.dtype}, expected "
                        f"{' or '.join(map(str, want))} ({fmt.name}, the checkpoint's quantization_config)")
    if wq.dim() != 2:
        raise ValueError(f"{what}: a quantised linear's weight must be 2-D [N, K/{fmt.pack}], got {list(wq.shape)}")
    n, k = wq.shape[0], wq.shape[1] * fmt.pack
    grid = tuple(fmt.w2_scale_shape(1, k, n, gated=False)[1:])  # (w2 is [H, I]: one matrix of N rows, K columns)
    if tuple(scale.shape) != grid and not (len(grid) <= 1 and scale.dim() <= 1 and scale.numel() == math.prod(grid)):
        raise ValueError(f"{what}: the scale has shape {list(scale.shape)}, expected {list(grid)} for a [{n}, {k}] "
                         f"weight in {fmt.name}")
    if shape is not None and [int(v) for v in shape.reshape(-1).tolist()] != [n, k]:
        raise ValueError(f"{what}: weight_shape = {shape.tolist()}, expected [{n}, {k}] (its weight's shape)")
