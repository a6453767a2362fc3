"""Kernel configs of the Triton experts path: tuned JSON files per GPU, and a heuristic for the rest.

A config is a dict::

    {"BLOCK_M": 64,                                   # rows per expert block (shared by both GEMMs)
     "w13": {"BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
     "w2":  {"BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
     "tma": False,                                     # optional: weight tiles by tensor descriptor
     "pdl": False}                                     # optional: programmatic dependent launch (sm_90+)

Optional keys besides: ``"fp8_acc"`` (fp8 dot instruction, one value per shape), ``"w13_split"`` (one accumulator per
w13 program, then an epilogue pass; the same bits), ``"sum_pass"`` (true / false: the top-k sum in its own pass after
w2, or fused into w2's tail; the same bits; absent: by the slot count, :data:`moekit.ops.triton_plan.SUM_PASS_SLOTS`),
``"gather_pass"`` (true: a pass copies each live slot's input row into the sorted layout first, and the Triton w13 reads
its activation tiles from there by tensor descriptor instead of gathering them by pointers; unquantised weights with
``"tma"`` after an align kernel, unswapped w13 tiles, elsewhere the gather in w13 runs; the same bits),
and per GEMM ``"SWAP": 1`` (the weight tile as the MMA's left operand, tokens on its narrow side: see
:func:`swap_tiles`); ``"w2": {"gluon": 1}`` (fp8 block weights with the sum pass on sm_90: the Gluon w2 of
:mod:`moekit.ops._gluon.fp8_w2`, the same bits with the scale promotion overlapped; see
:func:`moekit.ops.gluon_experts.fp8_w2_ok`), with ``"gluon_nt": n`` (that Gluon w2 computes n neighbouring column tiles
per program, one after the other through one ring: the same bits) or ``"gluon_ws": n`` (n = 1 or 2: its
warp-specialised, persistent form, :mod:`moekit.ops._gluon.fp8_w2_ws`, n consumer warpgroups each fed by a TMA producer
warp, one program per SM, ``"gluon_nt"`` unused; BLOCK_M 64, or 128 with n = 1; elsewhere the one-warpgroup Gluon w2
runs, see :func:`moekit.ops.gluon_experts.fp8_w2_ws_ok`; the same bits; measured on the H200: faster only for gpt-oss,
in its fp8 table's buckets 4096 (round 14) and 16384 (round 16), slower at DeepSeek-V3 and Qwen3). ``"w13": {"gluon": 1,
"gluon_ws": n}`` likewise runs the warp-specialised, persistent fp8 block w13 (:mod:`moekit.ops._gluon.fp8_w13_ws`: n
consumer warpgroups fed by one-warp TMA producers, the input quantised into the sorted rows; BLOCK_M 64 (each consumer
its own tiles) or 128 (one 8-warp consumer, or with n = 2 both on each tile), BN <= 64; elsewhere the one-warpgroup
Gluon w13, see :func:`moekit.ops.gluon_experts.fp8_w13_ws_ok`; the same bits; in the H200 fp8 table at gpt-oss T = 16384
only), and ``"w13": {"gluon": 1, "gluon_stack": 1}`` the one-warpgroup Gluon w13 with the gate and up rows as one tile
and one wgmma (the same bits; in no table: no faster on the H200, round 16); the tuner tries both. ``"gluon_ws"`` must
be an int >= 0 (:func:`.config_keys.gluon_ws_value`), ``"gluon_stack"`` 0 or 1 (:func:`.config_keys.gluon_flag_value`).
``"w2": {"gluon_dec": 1}`` (0, 1 or 2) runs the Gluon fp8 block decode w2 where the plan has the fused top-k sum and
swapped tiles (:mod:`moekit.ops._gluon.fp8_w2_dec`, :func:`moekit.ops.gluon_experts.fp8_w2_dec_ok`: the Triton w2's
bits, each K step's wgmma in flight while the one before is promoted; over the inline layout or, past it, the align
kernel's; ``"gluon_nt": n`` column tiles per program), ``2`` its warp-specialised form (:mod:`moekit.ops._gluon.
fp8_w2_dec_ws`: the loads in a producer warp, one column tile per program; :func:`.config_keys.gluon_dec_value`),
elsewhere the Triton w2. ``"w13": {"gluon_dec": 1}`` likewise runs the Gluon fp8 block decode w13 with swapped tiles
(:mod:`moekit.ops._gluon.fp8_w13_dec`, :func:`moekit.ops.gluon_experts.fp8_w13_dec_ok`: the Triton w13's bits, the
loads in a producer warp; with ``"pdl"`` its first weight tiles before its grid wait). For mxfp4 / int4 weights, ``"gluon": 1``
runs the Gluon 4-bit GEMMs of :mod:`moekit.ops._gluon.w4` (the decoded tile through shared memory; see
:func:`moekit.ops.gluon_w4.w4_ok`), and with swapped tiles ``"gluon_rega": 1`` their register-operand form
(:mod:`moekit.ops._gluon.w4_rega`: the decoded weights as the wgmma's A fragment, in the H200 4-bit table's decode
buckets; w13 ``2``: gate, then up, one fragment live, fewer registers, :func:`.config_keys.gluon_rega_value`; beside it
``"gluon_early": 1``, :func:`.config_keys.gluon_early_value`: the ring slot refilled a step earlier, in the buckets
where that measured faster; ``"gluon_maxnreg": n``, :func:`.config_keys.gluon_maxnreg_value`: compiled for ``n``
registers per thread, e.g. to keep two 8-warp programs per SM) or ``"gluon_ws": slots`` the warp-specialised,
persistent form (:mod:`moekit.ops._gluon.w4_ws`; measured slower, in no table); all give the Triton kernels' bits.

``"tail_bm": BS`` (a power of two, 16 <= BS < BLOCK_M; :func:`.config_keys.tail_bm_value`): an expert's last rows, when
at most BS of them are left past its last whole BLOCK_M block, run in a BS-row tile of the same Triton GEMMs and grid
instead of a padded BLOCK_M tile (:mod:`moekit.ops._triton.align`; the same bits; not with swapped or Gluon GEMMs, fp8
wgmma dots need BS >= 64). In the H200 bf16 table at the 128-row buckets where it measured faster (round 17).

Files are ``<dir>/<device>.json`` (``<device>`` = the CUDA device name with spaces as ``_``),
``{"device": ..., "entries": {shape_key: {token_bucket: config}}}`` with
``shape_key = "E=..,H=..,I=..,K=..,dtype=..,gated=.."``. The lookup searches, in order (:func:`config_dirs`):

    $MOEKIT_CONFIG_DIR            (when set)
    ~/.cache/moekit/configs       (where ``moekit tune`` writes by default)
    <moekit>/configs              (shipped with the package)

and the first file holding the shape key decides that shape: its entry for the bucket nearest the
token count (in log scale). Files merge per shape key, never per bucket: the buckets of one shape
always come from one file, so one tuning run's tiles are never mixed with another's (SPEC §9: the
buckets of a shape share their reduction order). Shapes in no file use :func:`heuristic_config`
(:mod:`moekit.ops.config_heuristic`).
Every entry of a file is checked when the file is read (:func:`.config_keys.check_config`: ``ValueError`` naming the
file, shape, bucket and key for an unknown key or a value of the wrong kind). Files are read once per process
(:func:`clear_config_cache` re-reads them); returned configs are shared: do not mutate them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

import torch

from .._checks import DTYPE_SHORT
from .config_heuristic import (  # noqa: F401 (the heuristic and its forms, re-exported: their home is config_heuristic)
    FP8_DEC_SM90_MAX_ROWS, GLUON_NT_MAX_STEPS, SWAP_4BIT_BM16_ROWS, SWAP_4BIT_MAX_ROWS, SWAP_BM16_ROWS, SWAP_MAX_ROWS,
    W4_SM90_BM64_ROWS, fp8_heuristic, fp8_sm90_decode, heuristic_capability, heuristic_config, swap_tiles, w4_sm90_tiles)
from .config_keys import check_config
from .quant_spec import FP8_ROW_BLOCK_K, fp8_acc_run

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def device_key(device_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in device_name.replace(" ", "_"))


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype, gated: bool,
              quant: str | None = None) -> str:
    """``quant``: a quantised weight format's key (e.g. ``fp8_block128x128``, ``mxfp4``), appended as
    ``,quant=...`` (``dtype`` stays the activations' dtype)."""
    key = f"E={num_experts},H={hidden},I={inter},K={top_k},dtype={DTYPE_SHORT[dtype]},gated={int(gated)}"
    return key if quant is None else f"{key},quant={quant}"


class ConfigFileError(ValueError):
    """A config file that is not one ``moekit tune`` writes (the message names the file and what is wrong)."""


#: a shape key as :func:`shape_key` writes it (round 65: a misspelt key was read, matched no lookup, and the user's
#: table was silently unused)
_KEY_RE = re.compile(r"E=\d+,H=\d+,I=\d+,K=\d+,dtype=(bf16|fp16|fp32),gated=[01]"
                     r"(,quant=(fp8_block(\d+)x(\d+)|fp8_channel|fp8_tensor|mxfp4|int4_g\d+))?")


def _check_shape(p: Path, key, table: dict) -> None:
    """``key`` is a shape key and, for fp8, its buckets run one dot instruction (``fp8_acc`` as the launcher reads
    it: default 128, at most the K step; SPEC §9: round 65, a hand-edited file mixing them was used)."""
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise ConfigFileError(f"{p}: shape key {key!r}: expected E=..,H=..,I=..,K=..,dtype=bf16|fp16|fp32,gated=0|1"
                              "[,quant=...] (what `moekit tune` writes)")
    if m.group(3) is None or not m.group(3).startswith("fp8"):
        return
    step = int(m.group(5)) if m.group(5) else FP8_ROW_BLOCK_K  # (the K step QuantSpec.fix_config gives the format)
    accs = {str(b): fp8_acc_run(c, step) for b, c in table.items() if isinstance(c, dict)}
    if len(set(accs.values())) > 1:
        raise ConfigFileError(f"{p}: shape {key}: the buckets disagree on fp8_acc {accs}: a token's output would "
                              "depend on its batch (SPEC §9); make them one value, or re-run `moekit tune`")


def read_config_file(path) -> dict:
    """One JSON config file, ``{"device": name, "entries": {shape key: {bucket: config}}}`` ({} when absent), every
    config checked (:func:`.config_keys.check_config`); ``ConfigFileError`` naming the file, shape, bucket and key.
    Uncached (``moekit tune`` re-reads what it merges into); the lookup reads through :func:`load_config_file`."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:  # not JSON, not UTF-8 (round 51: the error named no file)
        raise ConfigFileError(f"{p}: not valid JSON ({exc}); fix or delete it, or re-run `moekit tune`") from None
    # round 51: a file without the {"device", "entries"} wrapper, or with a misspelt key, was read as empty and the
    # user's tuning silently ignored; every top-level key is checked
    if not isinstance(data, dict) or "entries" not in data or set(data) - {"device", "entries"}:
        got = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)}"
        raise ConfigFileError(f'{p}: expected {{"device": name, "entries": {{shape_key: {{bucket: config}}}}}} '
                              f"(what `moekit tune` writes), got {got}")
    entries = data["entries"]
    if not isinstance(entries, dict):
        raise ConfigFileError(f'{p}: "entries" = {type(entries).__name__}, expected {{shape_key: {{bucket: config}}}}')
    for key, table in entries.items():
        if not isinstance(table, dict):
            raise ConfigFileError(f"{p}: shape {key}: {type(table).__name__}, expected {{bucket: config}}")
        for bucket, cfg in table.items():
            if not (isinstance(bucket, str) and bucket.isascii() and bucket.isdigit() and int(bucket) > 0):
                raise ConfigFileError(f"{p}: shape {key}: bucket {bucket!r}, expected a token count >= 1")
            try:
                check_config(cfg, f"{p}: shape {key}, bucket {bucket} (fix or delete the entry, or re-run "
                                  "`moekit tune`)")
            except ValueError as err:
                raise ConfigFileError(str(err)) from None
        _check_shape(p, key, table)
    return data


@functools.lru_cache(maxsize=16)
def load_config_file(path: str) -> dict:
    """Entries of one JSON config file ({} when absent), checked (:func:`read_config_file`). Cached: see
    :func:`clear_config_cache`."""
    return read_config_file(path).get("entries", {})


def user_config_dir() -> Path:
    """``~/.cache/moekit/configs``: where ``moekit tune`` writes unless told otherwise."""
    return Path.home() / ".cache" / "moekit" / "configs"


def config_dirs() -> list[Path]:
    """The folders the lookup searches, first match per shape wins: ``$MOEKIT_CONFIG_DIR`` (if
    set), ``~/.cache/moekit/configs``, the shipped ``moekit/configs``."""
    return _config_dirs(os.environ.get("MOEKIT_CONFIG_DIR"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)
def _config_dirs(env_dir: str | None, home: str | None) -> list[Path]:
    dirs = [Path(env_dir)] if env_dir else []
    return [*dirs, user_config_dir(), CONFIG_DIR]


def config_path(device_name: str) -> Path:
    """The first existing ``<device>.json`` of :func:`config_dirs` (the shipped path when none exists)."""
    name = f"{device_key(device_name)}.json"
    for d in config_dirs():
        if (d / name).is_file():
            return d / name
    return CONFIG_DIR / name


def shape_table(device_name: str, key: str, dirs=None) -> tuple[Path | None, dict]:
    """(the file that decides shape ``key`` on this device, its ``{bucket: config}``); (None, {}) if
    none. ``dirs``: the folders to search (default :func:`config_dirs`)."""
    name = f"{device_key(device_name)}.json"
    for d in config_dirs() if dirs is None else dirs:
        table = load_config_file(str(d / name)).get(key)
        if table:
            return d / name, table
    return None, {}


def lookup_config(device_name: str, key: str, num_tokens: int) -> dict | None:
    """Tuned config for ``key`` at the bucket nearest ``num_tokens`` (log scale), or None."""
    return _lookup(config_dirs(), device_name, key, max(num_tokens, 1))


def _lookup(dirs, device_name: str, key: str, t: int) -> dict | None:
    return nearest_bucket(shape_table(device_name, key, dirs)[1], t)


def nearest_bucket(table: dict, num_tokens: int) -> dict | None:
    """The config of ``table`` (``{bucket: config}``, string or int buckets) whose bucket is nearest
    ``num_tokens`` on a log scale (ties: the smaller bucket); None for an empty table."""
    if not table:
        return None
    t = max(int(num_tokens), 1)
    best = min(table, key=lambda b: (abs(math.log2(int(b)) - math.log2(t)), int(b)))
    return table[best]


def merge_config(cfg: dict, patch: dict | None) -> dict:
    """A new config: ``cfg`` with ``patch`` merged in (top-level keys replaced, the ``w13`` / ``w2`` kernel dicts
    updated key by key), e.g. ``{"BLOCK_M": 16, "w13": {"SWAP": 1}}``; ``cfg`` is not mutated."""
    out = dict(cfg)
    for key, val in (patch or {}).items():
        out[key] = {**out[key], **val} if key in ("w13", "w2") else val
    return out


def clear_config_cache() -> None:
    """Forget every file read and config looked up (after a config file changed in this process)."""
    load_config_file.cache_clear()
    _get_config.cache_clear()


@functools.lru_cache(maxsize=8)
def _device_props(index: int) -> tuple[str, int, tuple[int, int] | None]:
    p = torch.cuda.get_device_properties(index)
    return p.name, p.multi_processor_count, heuristic_capability(p)


def get_config(
    device: torch.device, num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
    dtype: torch.dtype, gated: bool, quant: str | None = None,
) -> dict:
    """Tuned config for this GPU and shape (and quantised format ``quant``) if a config file has it (see
    the module docstring), else :func:`heuristic_config` (the quantised launchers then impose their format's
    K step / tile constraints). Cached per argument set and search path (do not mutate the result)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = None
    return _get_config(index, num_tokens, num_experts, hidden, inter, top_k, dtype, gated, quant,
                       os.environ.get("MOEKIT_CONFIG_DIR"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=4096)
def _get_config(index, num_tokens, num_experts, hidden, inter, top_k, dtype, gated, quant, env_dir, home) -> dict:
    if index is None:
        return heuristic_config(num_tokens, num_experts, hidden, inter, top_k, dtype, 4, quant)
    name, sms, cap = _device_props(index)
    cfg = _lookup(_config_dirs(env_dir, home), name, shape_key(num_experts, hidden, inter, top_k, dtype, gated, quant),
                  max(num_tokens, 1))
    if cfg is not None:
        return cfg
    return heuristic_config(num_tokens, num_experts, hidden, inter, top_k, dtype, sms, quant, cap)
