"""Hugging Face ``quantization_config`` dicts -> moekit format objects (see :func:`parse_quant_config`).

Forms read (as the checkpoints' config.json hold them):

- ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]}``
  with optional ``"scale_fmt": "ue8m0"`` and ``"modules_to_not_convert"`` (DeepSeek-V3/V3.1, Qwen3-FP8;
  MiniMax-M2 writes ``"fmt": "float8_e4m3fn"``). ``"expert_dtype": "fp4"`` (DeepSeek-V4; transformers'
  ``FineGrainedFP8Config``) with ``"scale_fmt": "ue8m0"``: the routed experts are e2m1 codes two per byte
  ``[N, K/2]`` (low nibble = even k) with one e8m0 scale per 32 along k ``[N, K/32]``, i.e. mxfp4; the other
  linears (the shared experts) stay fp8 block. :func:`parse_hf_formats` gives both formats;
  :func:`parse_quant_config` the routed experts' one (what a layer built with the dict runs).
- ``{"quant_method": "mxfp4", "modules_to_not_convert": [...]}`` (gpt-oss).
- ``{"quant_method": "compressed-tensors", "format": ..., "config_groups": {"group_0": {"targets": [...],
  "weights": {...}, "input_activations": {...} | None, "output_activations": None}}, "ignore": [...], ...}``
  where the group's ``QuantizationArgs`` (compressed-tensors ``quant_args.py``) give ``num_bits``, ``type``
  (``int``/``float``), ``symmetric``, ``strategy`` (``tensor``/``channel``/``group``/``block``/``token``),
  ``group_size``, ``block_structure``, ``dynamic``, ``actorder``. Presets this maps: FP8_DYNAMIC
  (channel weights, dynamic token inputs), FP8 (tensor weights, static tensor inputs), FP8_BLOCK
  (``[128, 128]`` blocks, dynamic group-128 inputs), W4A16 (``pack-quantized`` int4 groups) and MXFP4A16
  (``mxfp4-pack-quantized``: float 4-bit, group 32, no input quantisation).
"""

from __future__ import annotations

from .formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format, WeightFormat, str_tuple

_FP8_KEYS = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "modules_to_not_convert",
             "expert_dtype"}
_MXFP4_KEYS = {"quant_method", "modules_to_not_convert"}
# compressed-tensors metadata that does not change the expert math (kv_cache_scheme concerns attention)
_CT_KEYS = {
    "quant_method", "format", "config_groups", "ignore", "kv_cache_scheme", "quantization_status",
    "global_compression_ratio", "version", "sparsity_config", "transform_config", "provider",
}
_CT_ARG_KEYS = {
    "num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic", "actorder",
    "observer", "observer_kwargs", "scale_dtype", "zp_dtype", "format",
}


def _unsupported(option: str, value, why: str = "") -> NotImplementedError:
    tail = f": {why}" if why else ""
    return NotImplementedError(f"quant_config option {option}={value!r} is not supported by moekit{tail}")


def _names(cfg: dict, key: str) -> tuple[str, ...]:
    names = str_tuple(cfg.get(key) or ())
    if names is None:
        raise ValueError(f"quant_config[{key!r}] must be a list of module names, got {cfg.get(key)!r}")
    return names


def _no_unknown(cfg: dict, known: set, where: str) -> None:
    extra = sorted(set(cfg) - known)
    if extra:
        raise _unsupported(f"{where}{extra[0]}", cfg[extra[0]], "unknown key (never ignored)")


def parse_hf_dict(cfg: dict) -> WeightFormat:
    """The routed experts' format of a ``quantization_config`` dict (:func:`parse_hf_formats`'s first)."""
    return parse_hf_formats(cfg)[0]


def parse_hf_formats(cfg: dict) -> tuple[WeightFormat, WeightFormat]:
    """``(routed experts' format, format of every other quantised linear)`` of a ``quantization_config`` dict: one
    format twice, except fp8 with ``expert_dtype "fp4"`` (DeepSeek-V4): (mxfp4, fp8 block)."""
    cfg = _as_saved(cfg)
    if cfg.get("quant_method") == "fp8":
        dense = _parse_fp8(cfg)
        return _fp8_experts(cfg, dense), dense
    fmt = _parse_one(cfg)
    return fmt, fmt


def _as_saved(cfg: dict) -> dict:
    """``cfg`` in config.json's form. A transformers quantisation config's ``to_dict()`` (what ``patch()`` reads off a
    model ``from_pretrained`` loaded, and what ``save_pretrained`` writes) holds an enum ``quant_method`` and, for
    fp8 (``FineGrainedFP8Config``), its load options and defaults: ``dequantize`` (how transformers loads the weights,
    not their format: a dequantised model's stacks are float and are read as such), ``modules_to_convert: None``
    and ``scale_fmt: "float"`` (float32 scales, the default). Round 51: these were refused as unknown keys, so
    ``patch()`` failed on every fp8 model loaded by transformers. A ``modules_to_convert`` list is kept (refused:
    moekit reads ``modules_to_not_convert`` only)."""
    out = dict(cfg)
    method = out.get("quant_method")
    if not isinstance(method, str) and isinstance(getattr(method, "value", None), str):
        out["quant_method"] = method.value
    if out.get("quant_method") == "fp8":
        if isinstance(out.get("dequantize"), bool):
            del out["dequantize"]
        if "modules_to_convert" in out and out["modules_to_convert"] is None:
            del out["modules_to_convert"]
        if out.get("scale_fmt") == "float":
            del out["scale_fmt"]
    return out


def _parse_one(cfg: dict) -> WeightFormat:
    method = cfg.get("quant_method")
    if method == "mxfp4":
        _no_unknown(cfg, _MXFP4_KEYS, "")
        return Mxfp4Format(ignore=_names(cfg, "modules_to_not_convert"))
    if method == "compressed-tensors":
        return _parse_ct(cfg)
    raise _unsupported("quant_method", method, "expected 'fp8', 'mxfp4' or 'compressed-tensors'")


def _parse_fp8(cfg: dict) -> Fp8BlockFormat:
    _no_unknown(cfg, _FP8_KEYS, "")
    if cfg.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
        raise _unsupported("fmt", cfg["fmt"], "only e4m3 fp8 weights")
    if cfg.get("activation_scheme", "dynamic") != "dynamic":
        raise _unsupported("activation_scheme", cfg["activation_scheme"], "block fp8 runs dynamic activations only")
    scale_fmt = cfg.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise _unsupported("scale_fmt", scale_fmt, "expected 'ue8m0' or absent")
    block = cfg.get("weight_block_size")
    if block is None:
        raise _unsupported("weight_block_size", None, "per-tensor 'fp8' checkpoints (no block size)")
    bn, bk = _block_pair(block, "quant_config['weight_block_size']")
    return Fp8BlockFormat(bn, bk, scale_fmt == "ue8m0", ignore=_names(cfg, "modules_to_not_convert"))


def _fp8_experts(cfg: dict, dense: Fp8BlockFormat) -> WeightFormat:
    """The routed experts' format of an fp8 config: ``dense`` itself, or mxfp4 for ``expert_dtype "fp4"``
    (DeepSeek-V4: ``W[n, k] = e2m1(code[n, k]) · 2^(S[n, k // 32] − 127)``, the scales e8m0 as ``scale_fmt
    "ue8m0"`` stores them; transformers' ``FP8Experts`` allocates the same ``[N, K/2]`` / ``[N, K/32]`` tensors)."""
    expert_dtype = cfg.get("expert_dtype", "fp8")
    if expert_dtype == "fp8":
        return dense
    if expert_dtype != "fp4":
        raise _unsupported("expert_dtype", expert_dtype, "expected 'fp8' or 'fp4' (DeepSeek-V4's packed e2m1 experts)")
    if not dense.ue8m0:
        raise _unsupported("scale_fmt", cfg.get("scale_fmt"), "fp4 experts (expert_dtype 'fp4') run as mxfp4, whose "
                           "scales are e8m0 bytes: scale_fmt must be 'ue8m0'")
    return Mxfp4Format(ignore=dense.ignore)


def _block_pair(block, where: str) -> tuple[int, int]:
    """``[block_n, block_k]`` as two positive ints; anything else (floats, bools, strings, one value) is refused,
    not rounded by ``int()`` into another block size."""
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)):
        raise ValueError(f"{where} must be two positive ints [block_n, block_k], got {block!r}")
    return block[0], block[1]


def _args(group: dict, key: str, gname: str) -> dict | None:
    a = group.get(key)
    if a is None:
        return None
    if not isinstance(a, dict):
        raise ValueError(f"config_groups[{gname!r}][{key!r}] must be a dict or None, got {a!r}")
    _no_unknown(a, _CT_ARG_KEYS, f"config_groups.{gname}.{key}.")
    if a.get("symmetric", True) is not True:
        raise _unsupported(f"{key}.symmetric", a.get("symmetric"), "asymmetric quantisation")
    if a.get("actorder") not in (None, False):
        raise _unsupported(f"{key}.actorder", a.get("actorder"), "activation-ordered groups (g_idx)")
    return a


def _parse_ct(cfg: dict) -> WeightFormat:
    _no_unknown(cfg, _CT_KEYS, "")
    groups = cfg.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _unsupported("config_groups", sorted(groups) if isinstance(groups, dict) else groups,
                           "exactly one config group (mixed-precision checkpoints are not supported)")
    if cfg.get("sparsity_config") not in (None, {}):
        raise _unsupported("sparsity_config", cfg["sparsity_config"])
    if cfg.get("transform_config") not in (None, {}):
        raise _unsupported("transform_config", cfg["transform_config"])
    (gname, group), = groups.items()
    if not isinstance(group, dict):
        raise ValueError(f"quant_config['config_groups'][{gname!r}] must be a dict (targets, weights, "
                         f"input_activations, format), got {group!r}")
    _no_unknown(group, {"targets", "weights", "input_activations", "output_activations", "format"},
                f"config_groups.{gname}.")
    if group.get("output_activations") is not None:
        raise _unsupported("output_activations", group["output_activations"])
    fmt_name = group.get("format") or cfg.get("format")
    w, x = _args(group, "weights", gname), _args(group, "input_activations", gname)
    if w is None:
        raise _unsupported("weights", None, "a config group without weight quantisation")
    if w.get("dynamic", False) is not False:
        raise _unsupported("weights.dynamic", w["dynamic"])
    sel = dict(ignore=_names(cfg, "ignore"), targets=_names(group, "targets") or ("Linear",))
    key = (w.get("type"), w.get("num_bits"))
    if key == ("float", 8):
        if fmt_name != "float-quantized":
            raise _unsupported("format", fmt_name, "fp8 weights ship as 'float-quantized'")
        return _ct_fp8(w, x, sel)
    if key not in (("float", 4), ("int", 4)):  # the weights first: an int8 W8A8 config names its weights
        raise _unsupported("weights", {"type": key[0], "num_bits": key[1]},
                           "expected float 8-bit, float 4-bit (mxfp4) or int 4-bit weights")
    if x is not None:
        raise _unsupported("input_activations", x, "4-bit formats are weight-only")
    strategy, g = w.get("strategy"), w.get("group_size")
    if key == ("float", 4):
        if fmt_name != "mxfp4-pack-quantized" or strategy != "group" or g != 32:
            raise _unsupported("weights", {"format": fmt_name, "strategy": strategy, "group_size": g},
                               "4-bit float weights run as mxfp4 (group 32) only; nvfp4 is not supported")
        return Mxfp4Format(**sel)
    if key == ("int", 4):
        if fmt_name != "pack-quantized":
            raise _unsupported("format", fmt_name, "int4 weights ship as 'pack-quantized'")
        if strategy != "group" or not isinstance(g, int):
            raise _unsupported("weights.strategy", strategy, "int4 runs with strategy 'group' and a group_size")
        return Int4GroupFormat(g, **sel)


def _ct_fp8(w: dict, x: dict | None, sel: dict) -> WeightFormat:
    if x is None:
        raise _unsupported("input_activations", None, "fp8 weight-only (w8a16) experts")
    if (x.get("type"), x.get("num_bits")) != ("float", 8):
        raise _unsupported("input_activations", {"type": x.get("type"), "num_bits": x.get("num_bits")},
                           "fp8 weights run with fp8 activations")
    strategy, xs, dyn = w.get("strategy"), x.get("strategy"), x.get("dynamic")
    if strategy == "block":
        block = _block_pair(w.get("block_structure"), "weights.block_structure")
        if not (dyn is True and xs == "group" and x.get("group_size") == block[1]):
            raise _unsupported("input_activations", {"strategy": xs, "dynamic": dyn, "group_size": x.get("group_size")},
                               f"block fp8 needs dynamic per-group activations with group_size {block[1]}")
        return Fp8BlockFormat(block[0], block[1], False, **sel)
    if strategy not in ("channel", "tensor"):
        raise _unsupported("weights.strategy", strategy, "fp8 weights: 'channel', 'tensor' or 'block'")
    if dyn is True and xs == "token":
        static = False
    elif dyn is False and xs == "tensor":
        static = True
    else:
        raise _unsupported("input_activations", {"strategy": xs, "dynamic": dyn},
                           "expected dynamic per-token or static per-tensor fp8 inputs")
    return Fp8ChannelFormat(strategy == "tensor", static, **sel)


def parse_quant_config(quant_config) -> WeightFormat | None:
    """``quant_config``: ``None`` | a format object | a Hugging Face ``quantization_config`` dict ->
    format or None.

    Accepted dicts: ``quant_method "fp8"`` (block fp8, dynamic activations, optional
    ``scale_fmt "ue8m0"``, ``modules_to_not_convert``; with ``expert_dtype "fp4"``, DeepSeek-V4's experts:
    mxfp4, see :func:`parse_hf_formats` for the format of its other linears), ``"mxfp4"`` (gpt-oss) and
    ``"compressed-tensors"`` with one config group (fp8 channel / tensor / block, mxfp4, symmetric
    int4 groups). Anything else raises ``NotImplementedError`` naming the option and its value.
    """
    if quant_config is None or isinstance(quant_config, WeightFormat):
        return quant_config
    if not isinstance(quant_config, dict):
        raise TypeError(f"quant_config must be None, a dict or a moekit format object, got {type(quant_config).__name__}")
    return parse_hf_dict(quant_config)
