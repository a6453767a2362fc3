"""The untuned kernel config (:func:`heuristic_config`): what the lookup of :mod:`moekit.ops.triton_configs` returns for
a GPU and shape no config file holds, and what ``moekit tune`` starts a new shape from.

Block rows follow the expected rows per touched expert (``rows = T·K / min(E, T·K)``); tile widths keep the
memory-bound small-T launches filling the SMs; quantised formats then take their own forms: fp8 the tuned fp8 tiles
(:func:`fp8_heuristic`), swapped for decode (:func:`swap_tiles`) and on sm_90 the Gluon decode GEMMs
(:func:`fp8_sm90_decode`); mxfp4 / int4 swapped decode tiles, on sm_90 the register-operand Gluon GEMMs
(:func:`w4_sm90_tiles`). The device's compute capability enters through :func:`heuristic_capability`.

BLOCK_K (SPEC §9 asks one per shape): the quantised forms keep one for all token counts of a shape; the unquantised
bf16 / fp16 form takes 128 for the decode tiles (BLOCK_M <= 32) and 64 above (fp32: 64 / 32), as the shipped H100
file, which predates the rule, does. A row's bits still do not depend on its batch: every GEMM passes its
accumulator into ``tl.dot`` (``tiles.dot``), which accumulates K in the MMA's 16-wide steps in order whatever
BLOCK_K, and the GPU tests check rows alone against the same rows in batches of every bucket for these configs
(``tests/ops/test_batch_invariance_gpu.py``: the H100 file on the H200, 20 passed in round 21; the bf16 heuristic,
``test_rows_alone_and_in_batches_bf16_heuristic``). Decision (round 48): kept, not re-tiled to one BLOCK_K,
because one value would change the untuned decode or compute-bound tiles without a GPU to measure them. Round 62:
under ``TRITON_INTERPRET`` (numpy's dot sums each BLOCK_K step apart, then adds it) fp32 / fp16 rows alone and in a
batch differ in their last bits; the interpreter is a test vehicle (the CPU path is the torch backend), and a GPU test
of the fp16 / fp32 heuristic (``test_rows_alone_and_in_batches_fp16_fp32_heuristic``) waits for a device.
"""

from __future__ import annotations

import math

import torch


def heuristic_capability(props) -> tuple[int, int] | None:
    """The compute capability :func:`heuristic_config` keys on for a device with properties ``props``: ``(major,
    minor)`` on an NVIDIA build, None on a ROCm build (its gfx9 devices report major 9, and they are not Hopper)."""
    return None if torch.version.hip is not None else (props.major, props.minor)


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
    sm90_bf16 = dtype == torch.bfloat16 and capability is not None and capability[0] == 9  # the measured sm_90 forms
    if quant and not quant.startswith("fp8") and sm90_bf16:
        return w4_sm90_tiles(rows)
    small_elt = dtype != torch.float32
    # Memory-bound below ~150 rows per expert: then padding rows cost only idle MMA, while an expert
    # split over two blocks streams its weights twice, so BLOCK_M covers the expected rows with room —
    # except narrow experts (their weights are few bytes), which run BLOCK_M 64 up to 127 rows.
    if rows <= 6:
        bm = 16
    elif rows <= 14:
        bm = 32
    elif rows <= 36 or (rows < 128 and inter <= 1024 and not quant):
        # round 57 (H100): narrow experts (I <= 1024) at 37-127 rows ran BLOCK_M 64 faster than 128 (Granite-3.0 T = 256
        # 98 vs 112 µs, Qwen3-30B-A3B T = 1024 503 vs 519, I = 352 fp16 146 vs 190); wider ones the other way
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
    elif bm == 64 or (quant and rows <= 160):  # (quantised formats there: not re-measured, kept)
        bk = 64 if small_elt else 32
        w13 = dict(BN=64, BK=bk, GROUP_M=8, num_warps=4, num_stages=4 if small_elt else 3)
        w2 = dict(BN=128, BK=bk, GROUP_M=8, num_warps=4, num_stages=4 if small_elt else 3)
    else:  # BLOCK_M 128: big tiles on 8 warps (w13 holds two accumulators: gate and up). Round 57: the 4-warp tiles
        # this regime took up to 160 rows held 128 x 128 float32 accumulators on 128 threads and spilled (~2 KB per
        # thread); on an H100 these tiles ran 1-9 % faster at every probed untuned point of 64-128 rows and 3.4x on a
        # small-H fp16 shape (benchmarks/heuristic_probe.py; the same bits: BLOCK_K unchanged). float32 takes the
        # same tiles (its 4-warp ones held the same accumulators), not measured
        bk = 64 if small_elt else 32
        w13 = dict(BN=128, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
        w2 = dict(BN=256 if small_elt else 128, BK=bk, GROUP_M=8, num_warps=8, num_stages=3)
    for c, n in ((w13, inter), (w2, hidden)):  # never wider than the problem (BN stays a power of two >= 16)
        while c["BN"] > 16 and c["BN"] // 2 >= n:
            c["BN"] //= 2
    # weight tiles by tensor descriptor won every compute-bound point tuned on H100 (T = 16384, five
    # shapes) and the BLOCK_M 128 points of round 57's probe; the wrapper falls back to pointer loads where
    # descriptors cannot describe the weights
    tma = small_elt and (rows > 400 or (rows > 36 and not quant))
    cfg = {"BLOCK_M": bm, "w13": w13, "w2": w2, "tma": tma}
    if quant and quant.startswith("fp8"):
        out = fp8_heuristic(cfg, num_tokens, num_experts, top_k, inter)
        if quant.startswith("fp8_block") and sm90_bf16 and rows <= FP8_DEC_SM90_MAX_ROWS:
            return fp8_sm90_decode(out)
        return out
    if quant and dtype == torch.bfloat16 and rows <= SWAP_4BIT_MAX_ROWS:  # mxfp4 / int4 decode (measured: bf16)
        return swap_tiles(cfg, rows, bm16_rows=SWAP_4BIT_BM16_ROWS)
    return cfg


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
