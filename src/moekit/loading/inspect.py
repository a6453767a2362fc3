"""``moekit inspect <dir>``: a table of the MoE blocks of a checkpoint (config.json and the ``.safetensors`` headers;
no weights read).

Consecutive MoE blocks whose plans are identical (shape, routing, activation and its limit, shared experts,
transforms...) are grouped into one row; the layers column lists their decoder layers (``3-60``; ``1,3,...,47``
where dense layers alternate with MoE ones). Each row's layer is built on the meta device (no memory, no weights),
so a config that :func:`moekit.load_moe_layers` would refuse at construction (``top_k`` above the experts, invalid
expert groups, a format whose block sizes do not divide H or I...) is refused here too. Sizes are at the dtype
the routed experts' tensors have in the ``.safetensors`` headers (the quant column: ``fp32``, ``bf16``...; config.json's
``dtype`` / ``torch_dtype`` where no header is there to read, e.g. a directory holding config.json alone, else bf16;
a declared dtype other than the stored one is noted), or for quantised checkpoints (``quantization_config``) the
routed experts in their format (``fmt.bytes_per_expert``: packed weights + scales, biases at bf16): one routed expert
(w13 + w2), and the expert weights one token touches (K routed experts + shared experts + router; the
shared experts in the format they load in: fp8 where the checkpoint is fp8 and its format applies to
them, as :func:`moekit.load_moe_layers` keeps them, else bf16; in a full-precision checkpoint at the experts' dtype;
the router's weight and bias as the loaded layer holds them, float32 where transformers keeps the gate so).
A ``.safetensors`` file or index that cannot be read, and experts stored quantised (``F8_E4M3``, ``U8``, ``I32``)
without a ``quantization_config``, are refused as :func:`moekit.load_moe_layers` refuses them (round 67); so is one
tensor under two names (a routed expert's, round 68; one of the layer's own whose two copies differ, round 69: those
two are read). Shard files the index names that are not on disk are told on stderr after the table, exit 1 where
load_moe_layers would refuse the folder for them (:func:`~.inspect_files.missing_shards`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields, replace

import torch

from .._argparse import OneLineParser
from ..ops.activation import is_gated
from .architectures import checkpoint_block_key, plan_layers, raw_text_config, text_config
from .files import config_dtype, path_hint, read_config
from .inspect_files import block_keys, check_float_experts, missing_shards, stored_dtypes
from .modules import build_layer
from .plan import LayerPlan
from .quant import checkpoint_formats, experts_format, quantization_dict
from .quant_shared import shared_format


#: a safetensors dtype -> (the name inspect shows, bytes per element); other names: lower case, 1 byte for F8_*
_ST_DTYPES = {"BF16": ("bf16", 2), "F16": ("fp16", 2), "F32": ("fp32", 4), "F64": ("fp64", 8), "I8": ("int8", 1),
              "U8": ("uint8", 1), "I16": ("int16", 2), "I32": ("int32", 4), "I64": ("int64", 8), "U16": ("uint16", 2),
              "U32": ("uint32", 4), "U64": ("uint64", 8)}
#: the names of :data:`_ST_DTYPES` -> bytes per element
_DTYPE_BYTES = dict(_ST_DTYPES.values())


def _dtype_name(st: str) -> str:
    """Returns the name inspect shows for a safetensors dtype (``"F32"`` -> ``"fp32"``)."""
    return _ST_DTYPES[st][0] if st in _ST_DTYPES else st.lower()


def _element_bytes(name: str) -> int:
    """Returns the bytes per element of a dtype name of :func:`_dtype_name` (``"bf16+fp32"``: the widest)."""
    return max(_DTYPE_BYTES.get(n, 1 if n.startswith("f8") else 2) for n in name.split("+"))


#: a float torch dtype -> the name inspect shows
_TORCH_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _declared(config: dict) -> tuple[str, str] | None:
    """Returns (field, dtype name) config.json declares for the weights (``dtype``, else ``torch_dtype``, as
    :func:`moekit.load_moe_layers` reads them; then its text tower's), or None (also for a name that is no float
    dtype moekit runs)."""
    text = raw_text_config(config)
    if not (config.get("dtype") or config.get("torch_dtype")) and isinstance(text, dict):
        config = text  # (round 65: a wrapper declaring it in its text tower only, as load_moe_layers now reads)
    key = "dtype" if config.get("dtype") else "torch_dtype"
    if not config.get(key):
        return None
    try:
        return key, _TORCH_NAMES[config_dtype({key: config[key]}, "config.json")]
    except ValueError:
        return None


def _expert_bytes(p: LayerPlan, fmt, el: int = 2) -> int:
    """One routed expert as stored: the format's bytes (+ biases at bf16), or at ``el`` bytes per element."""
    if fmt is None:
        return p.expert_bytes(el)
    gated = is_gated(p.activation)
    bias = 2 * ((2 if gated else 1) * p.intermediate_size + p.hidden_size) if p.has_bias else 0
    return fmt.bytes_per_expert(p.intermediate_size, p.hidden_size, gated) + bias


def _shared_bytes(p: LayerPlan, sfmt, el: int = 2) -> int:
    """The shared MLP as it loads: fp8 (``sfmt``: weights + scales) or at ``el`` bytes per element."""
    if sfmt is None:
        return p.shared_bytes(el)
    return sfmt.bytes_per_expert(p.shared_intermediate_size, p.outer_hidden_size, is_gated(p.shared_activation))


def _token_bytes(p: LayerPlan, fmt, sfmt=None, el: int = 2, gate_el: int | None = None) -> int:
    """The expert weights one token reads (:meth:`LayerPlan.active_bytes_per_token`), the full-precision ones at
    ``el`` bytes per element, the router gate (and its bias) at ``gate_el`` (default ``el``)."""
    routed = p.top_k * (p.expert_bytes(el) - _expert_bytes(p, fmt, el))
    return p.active_bytes_per_token(el, gate_el) - routed - (p.shared_bytes(el) - _shared_bytes(p, sfmt, el))


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ranges(idx: list[int]) -> str:
    """Layer indices, compact: runs of consecutive layers as ``3-60``, every n-th layer as ``1,3,...,47``."""
    out, i = [], 0
    while i < len(idx):
        j = i + 1
        step = idx[j] - idx[i] if j < len(idx) else 1
        while j < len(idx) and idx[j] - idx[j - 1] == step:
            j += 1
        if j - i >= 2 and step == 1:
            out.append(f"{idx[i]}-{idx[j - 1]}")
        elif j - i >= 4:
            out.append(f"{idx[i]},{idx[i + 1]},...,{idx[j - 1]}")
        else:
            out.append(str(idx[i]))
            j = i + 1
        i = j
    return ",".join(out)


def _ckpt_name(spec, p: LayerPlan, rel: str) -> str:
    """A block-relative moekit name -> the checkpoint module name (the spec's renames undone)."""
    return (p.ckpt_prefixes[0] + checkpoint_block_key(spec, rel + "."))[:-1]


_PLACE = ("name", "layer_idx", "ckpt_prefixes")  # where a block is; every other plan field is what it computes


def _signature(p: LayerPlan, layer_level: bool):
    """What a row shows and a layer computes: every plan field but the block's place (and the module name, unless
    the MoE is made of decoder-layer attributes, Gemma 4, whose block path is the layer itself)."""
    module = None if layer_level else p.name.rsplit(".", 1)[-1]
    return (module, *(getattr(p, f.name) for f in fields(p) if f.name not in _PLACE))


def _num_layers(config: dict):
    """The decoder layers of the model (of its text tower), or ``"?"``."""
    try:
        text = text_config(config)
    except ValueError:  # (a wrapper without its text tower: the plans refuse it first)
        return "?"
    for key in ("num_hidden_layers", "num_layers", "n_layers"):
        try:
            return int(text[key])  # as the plans read it (a number written as a string too)
        except (KeyError, TypeError, ValueError):
            pass
    types = text.get("layers_block_type") or text.get("layer_types")  # Nemotron-H: one entry per layer
    return len(types) if isinstance(types, list) else "?"


def _load_dtype(config: dict) -> torch.dtype:
    """The dtype :func:`moekit.load_moe_layers` loads ``config``'s checkpoint in by default (config.json's; bf16
    where it names no float dtype)."""
    try:
        return config_dtype(config, "config.json", raw_text_config(config))
    except ValueError:  # load_moe_layers(path, dtype=...) would take another: not the layout's business
        return torch.bfloat16


def _gate_bytes(p: LayerPlan, dtype: str | None, config: dict) -> int:
    """Bytes per element of ``p``'s router gate as the loaded layer holds it (:meth:`LayerPlan.gate_dtype`: float32
    where transformers keeps it so) in a layer loaded in the row's full-precision ``dtype`` (a name of
    :func:`_dtype_name`, the widest of ``"bf16+fp32"``), else (quantised experts) in :func:`_load_dtype`."""
    names = {v: k for k, v in _TORCH_NAMES.items()}
    floats = [names[n] for n in (dtype or "").split("+") if n in names]
    load = max(floats, key=lambda d: d.itemsize) if floats else _load_dtype(config)
    return p.gate_dtype(load).itemsize


def _check_builds(p: LayerPlan, fmt, config: dict):
    """Build ``p``'s layer on the meta device, as :func:`moekit.load_moe_layers` builds it (its construction checks:
    top-k, expert groups, format sizes...), and return it; an error names the block."""
    dtype = _load_dtype(config)
    tensors = {}
    if p.has_score_bias:
        tensors["router.e_score_correction_bias"] = torch.zeros(
            p.num_experts + p.num_zero_experts - p.routed_shared_experts)
    # a hash table's values are checked on the host (no meta tensor): the same layer routed by its scores instead
    plan = replace(p, hash_routing=False) if p.hash_routing else p
    try:
        return build_layer(plan, device="meta", dtype=dtype, backend="torch", tensors=tensors, quant_config=fmt)
    except (ValueError, TypeError, NotImplementedError) as err:
        kind = next(k for k in (NotImplementedError, TypeError, ValueError) if isinstance(err, k))
        raise kind(f"{p.name}: {err} (load_moe_layers would refuse this checkpoint)") from None


def rows(config: dict, path: str | None = None) -> tuple[str, list[dict]]:
    """(architecture name, one dict per group of identical consecutive MoE blocks). ``path``: the checkpoint
    directory, whose ``.safetensors`` headers give the full-precision experts' dtype (:func:`stored_dtypes`; without
    it, or where no header is read: config.json's dtype, else bf16); ``_dtype_from`` says which (None: quantised)."""
    spec, plans = plan_layers(config)
    fmt, dense_fmt, _ = checkpoint_formats(config, None)  # routed experts; other linears (shared experts)
    # each block's formats and stored dtype before grouping (round 63: a group took its first block's, so an fp8
    # block beside a full-precision one, or bf16 experts beside fp32 ones, showed as one row of the first's)
    fmts = {p.name: experts_format(fmt, p) for p in plans}
    shared_fmts = {p.name: shared_format(dense_fmt, p, lambda rel, p=p: _ckpt_name(spec, p, rel)) for p in plans}
    full = [p for p in plans if fmts[p.name] is None]
    keys = block_keys(path, spec, plans) if path is not None else None
    stored = stored_dtypes(keys, full) if keys is not None and full else {}
    check_float_experts(stored, config)
    on_disk = {b: "+".join(sorted({_dtype_name(st) for st in found})) for b, found in stored.items()}

    def row_key(p: LayerPlan):
        return _signature(p, spec.layer_level), fmts[p.name], shared_fmts[p.name], on_disk.get(p.name)

    groups: list[list[LayerPlan]] = []
    for p in plans:
        if groups and row_key(groups[-1][-1]) == row_key(p):
            groups[-1].append(p)
        else:
            groups.append([p])
    declared = _declared(config)
    out = []
    for g in groups:
        p = g[0]
        f = fmts[p.name]
        dtype, source = (declared[1], "config.json") if declared else ("bf16", "assumed")
        if p.name in on_disk:
            dtype, source = on_disk[p.name], "safetensors"
        el = 2 if f is not None else _element_bytes(dtype)
        gate_el = _gate_bytes(p, None if f is not None else dtype, config)  # (round 67: counted at el)
        layer = _check_builds(p, f, config)
        for q in g if keys is not None else ():  # (one tensor of the layer's own under two names: as load refuses it)
            keys.check_own_copies(q, layer)
        sf = shared_fmts[p.name]
        shared = f"1 x {p.shared_intermediate_size}" if p.shared_intermediate_size else "-"
        if p.shared_expert_gate:
            shared += " (gated)"
        if sf is not None:
            shared += f" {sf.name}"
        out.append(
            {
                "layers": _ranges([q.layer_idx for q in g]),
                "module": "(layer)" if spec.layer_level else p.name.rsplit(".", 1)[-1],
                "experts": f"{p.num_experts}" + (f" + {p.num_zero_experts} zero" if p.num_zero_experts else ""),
                "shared": shared,
                "top_k": str(p.top_k),
                "routing": p.routing,
                "H": str(p.hidden_size),
                "I": str(p.intermediate_size),
                "act": p.activation + (f" (limit {p.swiglu_limit:g})" if p.swiglu_limit else ""),
                "quant": f.name if f is not None else dtype,
                "bytes/expert": _fmt_bytes(_expert_bytes(p, f, el)),
                "bytes/token": _fmt_bytes(_token_bytes(p, f, sf, el, gate_el)),
                "_bytes": _expert_bytes(p, f, el),
                "_token_bytes": _token_bytes(p, f, sf, el, gate_el),
                "_dtype_from": None if f is not None else source,
                "_count": len(g),
                "_plan": p,
            }
        )
    return spec.name, out


def _full_precision(table: list[dict], config: dict) -> str:
    """Returns the footer's words for the full-precision rows' dtype: ``"at fp32 (as stored in the .safetensors
    files; config.json's torch_dtype says bf16)"``, ``"at bf16 (config.json's dtype; no .safetensors header read)"``,
    ``"at bf16 (assumed: ...)"``."""
    full = [r for r in table if r["_dtype_from"] is not None]
    dtypes = ", ".join(dict.fromkeys(r["quant"] for r in full)) or "bf16"
    sources = {r["_dtype_from"] for r in full}
    declared = _declared(config)
    if sources == {"safetensors"}:
        differs = declared is not None and any(r["quant"] != declared[1] for r in full)
        note = f"; config.json's {declared[0]} says {declared[1]}" if differs else ""
        return f"at {dtypes} (as stored in the .safetensors files{note})"
    if sources == {"config.json"}:
        return f"at {dtypes} (config.json's {declared[0]}; no .safetensors header read)"
    if sources == {"assumed"}:
        return f"at {dtypes} (assumed: no .safetensors header read and no dtype in config.json)"
    return f"at {dtypes}"


def render(arch: str, table: list[dict], config: dict) -> str:
    cols = ["layers", "module", "experts", "shared", "top_k", "routing", "H", "I", "act", "quant", "bytes/expert",
            "bytes/token"]
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols} if table else {c: len(c) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(r[c].ljust(widths[c]) for c in cols) for r in table]
    n_moe = sum(r["_count"] for r in table)
    total = sum(r["_count"] * r["_plan"].num_experts * r["_bytes"] for r in table)
    per_token = sum(r["_count"] * r["_token_bytes"] for r in table)
    head = (
        f"{arch} (model_type={config.get('model_type')!r}): {n_moe} MoE block{'' if n_moe == 1 else 's'} of "
        f"{_num_layers(config)} layers"
    )
    q = quantization_dict(config)
    quants = ", ".join(dict.fromkeys(r["quant"] for r in table if r["_dtype_from"] is None))  # DeepSeek-V4 fp8: mxfp4
    stored = _full_precision(table, config)
    if isinstance(q, dict) and quants:  # (round 65: "as stored", though fp8 / int4 scales load as fp32; and said
        # of a checkpoint whose experts are all left full precision)
        stored = f"as loaded ({q.get('quant_method')}: {quants}; scales as the layer holds them)"
    foot = (f"routed expert weights: {_fmt_bytes(total)} {stored}; "
            f"expert weights read per token: {_fmt_bytes(per_token)}")
    return "\n".join([head, *lines, foot])


def inspect_main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="moekit inspect", description="Show the MoE blocks of a HF checkpoint directory.")
    ap.add_argument("path", help="checkpoint directory (with config.json)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.path):
        print(f"moekit inspect: error: argument path: expected a checkpoint directory, got {args.path!r} "
              f"(not a directory){path_hint(args.path)}", file=sys.stderr)
        return 2
    try:
        config = read_config(args.path)
        arch, table = rows(config, args.path)
        text = render(arch, table, config)
        shards = missing_shards(args.path, config)  # (round 69: an index's missing shards went unsaid)
    except (NotImplementedError, OSError, KeyError, ValueError, TypeError) as err:  # OSError: e.g. unreadable
        # one line (an unsupported model_type's error goes on with every supported type: its first line points there)
        first = str(err).partition("\n")[0]
        print(f"moekit inspect: error: {first}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a malformed config.json value (a 0 step, a -1 size, Infinity, nesting
        # past the recursion limit) escaped the planner's checks as a traceback: one line, exit 1, as its own errors
        why = str(err).partition("\n")[0]
        where = os.path.join(args.path, "config.json")
        print(f"moekit inspect: error: {where}: a malformed value? {type(err).__name__}: {why}", file=sys.stderr)
        return 1
    # the table is printed outside the checks (round 67: a failing stdout, `> /dev/full`, was blamed on config.json;
    # its OSError goes to the caller, `moekit`'s one line)
    print(text)
    if shards is not None:  # (after the table: a refused checkpoint's layout is still shown, exit 1)
        print(f"moekit inspect: {shards[0]}", file=sys.stderr)
    return 1 if shards is not None and shards[1] else 0


if __name__ == "__main__":
    raise SystemExit(inspect_main())
