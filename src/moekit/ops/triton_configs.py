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
where that measured faster) or ``"gluon_ws": slots`` the warp-specialised, persistent form
(:mod:`moekit.ops._gluon.w4_ws`; measured slower, in no table); all give the Triton kernels' bits.

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
buckets of a shape share their reduction order). Shapes in no file use :func:`heuristic_config`.
Every entry of a file is checked when the file is read (:func:`.config_keys.check_config`: ``ValueError`` naming the
file, shape, bucket and key for an unknown key or a value of the wrong kind). Files are read once per process
(:func:`clear_config_cache` re-reads them); returned configs are shared: do not mutate them.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from .._checks import DTYPE_SHORT
from .config_keys import check_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def device_key(device_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in device_name.replace(" ", "_"))


def shape_key(num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype, gated: bool,
              quant: str | None = None) -> str:
    """``quant``: a quantised weight format's key (e.g. ``fp8_block128x128``, ``mxfp4``), appended as
    ``,quant=...`` (``dtype`` stays the activations' dtype)."""
    key = f"E={num_experts},H={hidden},I={inter},K={top_k},dtype={DTYPE_SHORT[dtype]},gated={int(gated)}"
    return key if quant is None else f"{key},quant={quant}"


@functools.lru_cache(maxsize=16)
def load_config_file(path: str) -> dict:
    """Entries of one JSON config file ({} when absent), every config checked (:func:`.config_keys.check_config`:
    ``ValueError`` naming the file, shape, bucket and key). Cached: see :func:`clear_config_cache`."""
    p = Path(path)
    if not p.is_file():
        return {}
    with open(p) as f:
        data = json.load(f)
    entries = data.get("entries", {})
    if not isinstance(entries, dict):
        raise ValueError(f'{p}: "entries" = {type(entries).__name__}, expected {{shape_key: {{bucket: config}}}}')
    for key, table in entries.items():
        if not isinstance(table, dict):
            raise ValueError(f"{p}: shape {key}: {type(table).__name__}, expected {{bucket: config}}")
        for bucket, cfg in table.items():
            if not (isinstance(bucket, str) and bucket.isdigit() and int(bucket) > 0):
                raise ValueError(f"{p}: shape {key}: bucket {bucket!r}, expected a token count >= 1")
            check_config(cfg, f"{p}: shape {key}, bucket {bucket} (fix or delete the entry, or re-run `moekit tune`)")
    return entries


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


def heuristic_config(
    num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype,
    num_sms: int = 132, quant: str | None = None, capability: tuple[int, int] | None = None,
) -> dict:
    """A sound config for any shape: block rows from the expected rows per touched expert, tile
    widths so that the memory-bound small-T launches still fill the SMs. ``quant``: a quantised format's
    key; fp8 formats take :func:`fp8_heuristic`'s tiles, fp8 block with bf16 activations on an sm_90 GPU
    (``capability`` (9, x): the device's compute capability, None when unknown or on ROCm) the Gluon decode GEMMs up to
    :data:`FP8_DEC_SM90_MAX_ROWS` rows per expert (:func:`fp8_sm90_decode`); mxfp4 / int4 with bf16 activations on
    sm_90 take the register-operand Gluon GEMMs of the H200 tables (:func:`w4_sm90_tiles`), elsewhere they swap
    their decode tiles (:func:`swap_tiles`)."""
    slots = max(num_tokens * top_k, 1)
    touched = min(num_experts, slots)
    rows = slots / touched
    if quant and not quant.startswith("fp8") and dtype == torch.bfloat16 and capability and capability[0] == 9:
        return w4_sm90_tiles(rows)
    small_elt = dtype != torch.float32
    # Memory-bound below ~150 rows per expert: then padding rows cost only idle MMA, while an expert
    # split over two blocks streams its weights twice, so BLOCK_M covers the expected rows with room.
    if rows <= 6:
        bm = 16
    elif rows <= 14:
        bm = 32
    elif rows <= 36:
        bm = 64
    else:
        bm = 128
    if bm <= 32:  # weight streaming: wide K tiles, narrow N tiles so that enough programs run
        bk = 128 if small_elt else 64
        w13_bn = 64
        while w13_bn > 16 and touched * math.ceil(inter / w13_bn) < 2 * num_sms:
            w13_bn //= 2
        w2_bn = 64
        while w2_bn > 16 and touched * math.ceil(hidden / w2_bn) < 2 * num_sms:
            w2_bn //= 2
        stages = 4 if small_elt else 3
        w13 = dict(BN=w13_bn, BK=bk, GROUP_M=8, num_warps=4, num_stages=stages)
        w2 = dict(BN=w2_bn, BK=bk, GROUP_M=8, num_warps=4, num_stages=stages)
    elif bm == 64 or rows <= 160:
        bk = 64 if small_elt else 32
        w13 = dict(BN=64, BK=bk, GROUP_M=8, num_warps=4, num_stages=4 if small_elt else 3)
        w2 = dict(BN=128, BK=bk, GROUP_M=8, num_warps=4, num_stages=4 if small_elt else 3)
    else:  # compute-bound: big tiles (w13 holds two accumulators: gate and up)
        bk = 64 if small_elt else 32
        w13 = dict(BN=128, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
        w2 = dict(BN=256 if small_elt else 128, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
    for c, n in ((w13, inter), (w2, hidden)):  # never wider than the problem (BN stays a power of two >= 16)
        while c["BN"] > 16 and c["BN"] // 2 >= n:
            c["BN"] //= 2
    # weight tiles by tensor descriptor won every compute-bound point tuned on H100 (T = 16384, five
    # shapes); the wrapper falls back to pointer loads where descriptors cannot describe the weights
    tma = small_elt and rows > 400
    cfg = {"BLOCK_M": bm, "w13": w13, "w2": w2, "tma": tma}
    if quant and quant.startswith("fp8"):
        out = fp8_heuristic(cfg, num_tokens, num_experts, top_k, inter)
        if (quant.startswith("fp8_block") and dtype == torch.bfloat16 and capability and capability[0] == 9
                and rows <= FP8_DEC_SM90_MAX_ROWS):
            return fp8_sm90_decode(out)
        return out
    if quant and dtype == torch.bfloat16 and rows <= SWAP_4BIT_MAX_ROWS:  # mxfp4 / int4 decode (measured: bf16)
        return swap_tiles(cfg, rows, bm16_rows=SWAP_4BIT_BM16_ROWS)
    return cfg


def heuristic_capability(props) -> tuple[int, int] | None:
    """The compute capability :func:`heuristic_config` keys on for a device with properties ``props``: ``(major,
    minor)`` on an NVIDIA build, None on a ROCm build (its gfx9 devices report major 9, and they are not Hopper)."""
    return None if torch.version.hip is not None else (props.major, props.minor)


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


def fp8_heuristic(cfg: dict, num_tokens: int, num_experts: int, top_k: int, inter: int | None = None) -> dict:
    """The fp8 kernels' untuned config, from the H200 tuning of four shapes x seven token counts (moekit
    tune): every winner at T <= 4096 ran BLOCK_M 64, 4 warps, 4 stages, w13 BN 32-64, w2 BN 64-128, weight
    tiles by descriptor; BLOCK_M 128 with 8 warps (the fresh fp8 dot beside two accumulators) measured
    about 2x slower (DeepSeek-V3 T = 16384: 54.7 vs 26.2 ms; LongCat-Flash T = 4096: 39.4 ms vs bf16 14.2).
    Unswapped tiles ask for the Gluon GEMMs (``"gluon": 1``, the same bits; the launcher runs them on sm_90 with
    an align kernel): H200 round 9, experts step, T = 1024 / 4096 / 16384, 4-19 % faster in all four
    shapes (DeepSeek-V3 T = 16384: 24.5 -> 20.5 ms). A Gluon w2 with few K steps (``inter`` <= 8 blocks of 128)
    computes 4 column tiles per program (``"gluon_nt"``): H200 round 12, Qwen3-30B-A3B (6 steps) w2 at T = 1024
    / 4096 / 16384 86.4 -> 80.4, 234.6 -> 202.4, 881 -> 778 µs; at 16+ steps no gain (DeepSeek-V3, gpt-oss,
    Mixtral)."""
    slots = max(num_tokens * top_k, 1)
    rows = slots / min(num_experts, slots)
    w13 = dict(cfg["w13"], BN=min(max(int(cfg["w13"]["BN"]), 32), 64), num_warps=4, num_stages=4)
    w2 = dict(cfg["w2"], BN=64 if rows <= 36 else 128, num_warps=4, num_stages=4)
    out = {**cfg, "BLOCK_M": 64, "w13": w13, "w2": w2, "tma": True}
    if rows <= SWAP_MAX_ROWS:
        return swap_tiles(out, rows)
    w13["gluon"] = w2["gluon"] = 1
    if inter is not None and -(-inter // 128) <= GLUON_NT_MAX_STEPS:
        w2["gluon_nt"] = 4
    return out


#: at most this many K steps of 128 in w2 (I / 128), the fp8 heuristic's Gluon w2 computes 4 column tiles per
#: program (:func:`fp8_heuristic`): the row block's setup, slots and router weights are read once, and the next
#: tile's loads fly while a tile is stored
GLUON_NT_MAX_STEPS = 8


# fp8 decode: swapped tiles (weights on wgmma's M side) up to this many expected rows per touched expert,
# BLOCK_M 16 up to SWAP_BM16_ROWS, 32 above (:func:`swap_tiles`)
SWAP_MAX_ROWS = 16
SWAP_BM16_ROWS = 6
# mxfp4 / int4 decode with bf16 activations: swapped tiles up to this many rows per expert, BLOCK_M 16 up to
# SWAP_4BIT_BM16_ROWS, 32 above. H200 tuning (moekit tune, whole tables of three shapes x two formats, round 6):
# from 2 to 16 rows per expert the swapped tiles won all 11 tuned buckets (T = 64 and 256 of DeepSeek-V3,
# gpt-oss-120b and Qwen3-30B-A3B; DeepSeek-V3 mxfp4 T = 256 was filled, not tuned); at 8 rows BLOCK_M 16 beat 32
# (DeepSeek-V3 int4 T = 256: 3696 µs, the unswapped BLOCK_M 32 heuristic 5313 in the sweep), at 16 rows BLOCK_M
# 32 (Qwen3 T = 256). At one row (T = 1 and 8 there) it is mixed: swapped won 7 of 12 buckets (all four of
# DeepSeek-V3), unswapped BLOCK_M 16 the rest (Qwen3 and gpt-oss T = 1, gpt-oss int4 T = 8; round 5's probe:
# swapped 0.93-1.12x); the heuristic keeps swapping there. fp16 / fp32 activations and pre-Hopper GPUs were not
# measured.
SWAP_4BIT_MAX_ROWS = 16
SWAP_4BIT_BM16_ROWS = 8


#: fp8 block on sm_90 (:func:`fp8_sm90_decode`): the Gluon decode GEMMs up to this many expected rows per touched
#: expert (the range measured: 1-2 rows; the swapped tiles run BLOCK_M 16 up to :data:`SWAP_BM16_ROWS`)
FP8_DEC_SM90_MAX_ROWS = 2


def fp8_sm90_decode(cfg: dict) -> dict:
    """The untuned fp8 block decode config on sm_90: :func:`fp8_heuristic`'s swapped ``BLOCK_M`` 16 tiles ``cfg`` with
    both GEMMs on the Gluon decode kernels (``"gluon_dec": 1`` on 64-row weight tiles, the Triton tiles' bits) launched
    as programmatic dependents (``"pdl"``: each requests its first weight tiles before waiting on the kernel before
    it), the form four of the five H200 fp8 tables run at T = 1 (Mixtral's: the decode w2 only). H200 round 37,
    experts step in a CUDA graph, best of two alternations, T = 1 to 32 (``benchmarks/heuristic_ab.py --probe``, 1-2
    rows per expert), against the Triton tiles: geometric mean 1.034x over 42 points of seven shapes (LongCat-Flash,
    DeepSeek-V3, Qwen3-30B-A3B and the untuned Kimi-K2, GLM-4.5, MiniMax-M2, Qwen3-235B shapes), 1.03-1.17x at T = 1,
    0.99x at worst (Qwen3-30B-A3B T = 8), outputs bit-identical; Mixtral-8x7B and gpt-oss-120b at T = 1-8, 0.99-1.10x.
    DeepSeek-V3's T = 1 tiles (w13 BN 128, 8 warps) were faster only at H 7168 (4 % at T = 1) and slower elsewhere (up
    to 9 %), so the form keeps one tile. The launcher runs the Triton kernels with the same tiles (and bits) wherever
    a Gluon decode kernel cannot run (:func:`moekit.ops.gluon_experts.fp8_w13_dec_ok` / ``fp8_w2_dec_ok``)."""
    w13 = dict(cfg["w13"], BN=64, gluon_dec=1)
    w2 = dict(cfg["w2"], BN=64, gluon_dec=1)
    return {**cfg, "BLOCK_M": 16, "w13": w13, "w2": w2, "tma": True, "pdl": True}


#: mxfp4 / int4 on sm_90 (:func:`w4_sm90_tiles`): 64-row token blocks up to this many expected rows per expert, 128 above
W4_SM90_BM64_ROWS = 96


def w4_sm90_tiles(rows: float) -> dict:
    """The untuned mxfp4 / int4 config for bf16 activations on sm_90, ``rows`` expected rows per touched expert: the
    forms that won the H200 tables' 4-bit buckets (``moekit tune``; DeepSeek-V3, gpt-oss-120b, Qwen3-30B-A3B since
    rounds 13-20, Mixtral-8x7B in round 36). Both GEMMs swapped on the register-operand Gluon kernels (the decoded
    weights as wgmma's A fragment, the ring refilled a step early: ``"gluon_rega"``, ``"gluon_early"``) with the top-k
    sum in its own pass and w13 unsplit (as they need), in 64-row weight tiles over 16 / 32 token rows up to 16 rows per expert; over 64 token rows
    up to :data:`W4_SM90_BM64_ROWS`, w2 on 128-row weight tiles (8 warps); above, 128 token rows with w13's ring two
    slots deep and the unswapped Triton w2 on BN 256 tiles. Against the Triton tiles the other devices keep
    (:func:`swap_tiles` up to 16 rows, then the unquantised tiles), H200 round 36, experts step in a CUDA graph, T = 1
    to 16384 (``benchmarks/heuristic_ab.py``): 1.14-1.63x faster at all 42 points of Mixtral-8x7B, LongCat-Flash and
    Kimi-K2's shape (E 384) in mxfp4 and int4, outputs bit-identical; Mixtral's tuned table is 1.0-1.27x faster again
    (most at 256 rows per expert, T = 1024). The launcher runs the Triton kernels with the same tiles (and bits)
    wherever a Gluon form cannot run (:func:`moekit.ops.gluon_w4.w4_ok`)."""
    def rega(bn: int, warps: int) -> dict:
        return dict(BN=bn, BK=128, GROUP_M=8, num_warps=warps, num_stages=3, SWAP=1, gluon=1, gluon_rega=1,
                    gluon_early=1)
    flags = {"sum_pass": True, "w13_split": False}
    if rows <= SWAP_4BIT_MAX_ROWS:
        return {"BLOCK_M": 16 if rows <= SWAP_4BIT_BM16_ROWS else 32, "w13": rega(64, 4), "w2": rega(64, 4), **flags}
    if rows <= W4_SM90_BM64_ROWS:
        return {"BLOCK_M": 64, "w13": rega(64, 4), "w2": rega(128, 8), **flags}
    return {"BLOCK_M": 128, "w13": dict(rega(64, 4), gluon_stages=2),
            "w2": dict(BN=256, BK=128, GROUP_M=8, num_warps=8, num_stages=3), **flags}


def swap_tiles(cfg: dict, rows: float, bm16_rows: float = SWAP_BM16_ROWS) -> dict:
    """``cfg`` with both GEMMs swapped (``"SWAP": 1``: the weight tile is wgmma's M side, 64 weight rows per
    warpgroup, the tokens its N side) and ``BLOCK_M`` 16 (<= ``bm16_rows`` expected rows per expert: 6 for fp8,
    8 for mxfp4 / int4) or 32. With fp8 the
    token rows no longer pad to 64: H200, experts step, fp8 block, T = 1 / 8 / 64 against BLOCK_M 64
    unswapped: DeepSeek-V3 1.14 / 1.13 / 1.12x, gpt-oss-120b 1.16 / 1.20 / 1.17x, Qwen3-30B-A3B
    1.17 / 1.34 / 1.30x, every output bit-identical (``benchmarks/swap_probe.py``); at 8-16 rows (BLOCK_M
    32) 1.06-1.10x (DeepSeek-V3 and gpt-oss T = 256, Qwen3 T = 256, Mixtral T = 64), while at 64 rows and
    more unswapped won (0.72-0.98x). bf16 gained nothing (0.95-1.04x), so it never swaps. mxfp4 / int4 swap
    up to 16 rows (:data:`SWAP_4BIT_MAX_ROWS`, round 6's whole-table tuning; round 5's probe measured up to 6
    rows): H200, T = 1 / 8 / 64 against the unswapped BLOCK_M 16 tiles,
    DeepSeek-V3 mxfp4 1.05 / 1.13 / 1.14x, int4 1.12 / 1.17 / 1.15x, Qwen3-30B-A3B mxfp4 1.03 / 1.15 / 1.11x,
    int4 1.12x at T = 1, gpt-oss-120b mxfp4 0.93 / 1.09 / 1.08x (gpt-oss int4 was timed only on a build with
    misaligned weight loads: not counted), all 65 probed outputs bit-identical once the decoded tile kept the
    bf16 k order (``_k_order_barrier``; before it, 4-bit mma.sync tiles changed low bits)."""
    w13 = dict(cfg["w13"], SWAP=1, BN=max(64, int(cfg["w13"]["BN"])), num_warps=4)
    w2 = dict(cfg["w2"], SWAP=1, BN=max(64, int(cfg["w2"]["BN"])), num_warps=4)
    return {**cfg, "BLOCK_M": 16 if rows <= bm16_rows else 32, "w13": w13, "w2": w2}
