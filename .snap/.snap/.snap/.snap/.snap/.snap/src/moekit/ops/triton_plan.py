"""The launch plan of one chunk of the Triton experts path (:mod:`.triton_experts`): scratch sizes, grids and the
constexpr keywords of every kernel, a pure function of shapes, flags and the kernel config (never of tensor data
or addresses), cached."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from .config_keys import (gluon_dec_value, gluon_early_value, gluon_flag_value, gluon_maxnreg_value, gluon_nt_value,
                          gluon_rega_value, gluon_ws_value, tail_bm_value, tail_conflicts)

#: the top-k sum runs as its own pass after w2 from this many slots on, unless the config says ("sum_pass": true /
#: false), instead of in the tail of w2's last program per (token, column block). The same bits either way. H200
#: experts step µs fused / pass (round 7 kernel_profile): Qwen3 bf16 T = 8 (64 slots) 137.0 / 135.1, 1024 403.9 /
#: 375.5, 16384 2754 / 2437; fp8 T = 1024 360.8 / 314.0; DeepSeek-V3 bf16 T = 4096 8475 / 8206; Mixtral (K = 2)
#: T = 8 (16 slots) 585.3 / 585.1. The pass: 1024 columns per program (8 bf16 per thread of 4 warps).
SUM_PASS_SLOTS, SUM_BH = 64, 1024
#: the gather pass (config "gather_pass"): slots x columns per program
GATHER_BS, GATHER_BH = 4, 1024


def _freeze(cfg: dict) -> tuple:
    """The hashable image of a config that :func:`launch_plan` reads: every field a plan depends on
    (equal configs whose kernel dicts list keys in another order just make two cache entries)."""
    return (cfg["BLOCK_M"], tuple(cfg["w13"].items()), tuple(cfg["w2"].items()), bool(cfg.get("tma")),
            bool(cfg.get("pdl")), bool(cfg.get("w13_split")),
            None if cfg.get("sum_pass") is None else bool(cfg["sum_pass"]), tail_bm_value(cfg),
            bool(cfg.get("gather_pass")))


@dataclass(frozen=True)
class LaunchPlan:
    """What one chunk launches, derived from shapes, flags and the config only (never from tensor
    data or addresses): scratch sizes, grids and the constexpr keywords of each kernel. The keyword
    dicts are shared by every call of the same plan and never mutated."""

    bm: int
    rows: int  # padded sorted rows: num_pid_m · BLOCK_M
    num_pid_m: int
    nbn: int  # w2 column blocks: cdiv(H, w2 BN)
    e_global: int
    i32_sizes: tuple  # counts, slot_loc, slot_rank, tok_live, row_start, sorted_slot, block_expert, sem (padded)
    i32_total: int
    buf_total: int  # inter rows, then part rows (from part_offset; none when part_fp32), then the gathered input rows
    #               (from xg_offset, config "gather_pass"), elements of the input dtype
    part_offset: int
    part_fp32: bool  # fp16 activations: the slot rows in their own float32 buffer (see _run_chunk)
    xg_offset: int
    part_rows: int
    zero_counts: bool
    align: str  # "inline" (no align kernel), "small" (one program) or "multi" (count + scatter)
    align_grid: tuple
    align_kw: dict
    scatter_kw: dict
    grid13: tuple
    grid2: tuple
    w13_kw: dict
    w2_kw: dict
    limit_arg: float
    bn13: int
    bk13: int
    bn2: int
    bk2: int
    want_tma: bool
    want_pdl: bool
    split: bool  # w13 with one accumulator per program + the epilogue pass (config "w13_split", gated only)
    sum_pass: bool  # the top-k sum in its own pass after w2 (config "sum_pass", K > 1 only)
    w2_gluon: bool  # w2 config "gluon" (sum pass, an align kernel ran): the Gluon fp8 block / 4-bit w2, if it may run
    w13_gluon: bool  # w13 config "gluon" (gated, fused, an align kernel ran): the Gluon w13, if it may run
    grid_sum: tuple
    sum_kw: dict
    gluon_stages: tuple  # config "gluon_stages" of w13 / w2: ring slots of a Gluon 4-bit kernel (0: it decides)
    gluon_wbuf: tuple  # config "gluon_wbuf" of w13 / w2 (Gluon 4-bit): decoded weight tiles in flight, 1 or 2
    gluon_nt: int  # w2 config "gluon_nt" (Gluon fp8 block w2): column tiles per program, one after the other
    gluon_ws: tuple  # config "gluon_ws" of w13 / w2, 0: off; Gluon 4-bit (swapped, warp-specialised): decoded slots;
    #                 fp8 block w13 / w2: consumer warpgroups of the warp-specialised form (1 or 2)
    gluon_rega: tuple  # config "gluon_rega" of w13 / w2 (Gluon 4-bit, swapped): the decoded tile as register operand
    #                  (w13 2: gate, then up, one fragment live: fewer registers)
    gluon_early: tuple  # config "gluon_early" of w13 / w2 (with "gluon_rega"): refill a ring slot right after a step's
    #                   first barrier, a step earlier
    gluon_maxnreg: tuple  # config "gluon_maxnreg" of w13 / w2 (with "gluon_rega"): registers per thread, 0: free
    gluon_stack: bool  # w13 config "gluon_stack" (Gluon fp8 block w13): gate and up rows as one tile, one wgmma
    w2_gluon_dec: int  # w2 config "gluon_dec" (swapped tiles, fused sum; any align layout): the Gluon fp8 decode w2
    #                  (1), its warp-specialised form (2); 0: off
    w13_gluon_dec: bool  # w13 config "gluon_dec" (gated, fused epilogue, BLOCK_M tiles; any align layout): the Gluon
    #                    fp8 decode w13, if its launcher finds it may run (swapped tiles, ...)
    tail: int  # config "tail_bm": BS-row tail blocks (0: off; the Triton GEMMs after an align kernel only)
    gather: bool  # config "gather_pass": the live slots' rows copied into the sorted layout before w13 (TMA-read)
    grid_gather: tuple
    gather_kw: dict


def _pad(n: int, q: int = 32) -> int:
    """``n`` rounded up to a multiple of ``q`` elements (>= q): every view starts 128-byte aligned."""
    return max(q, -(-n // q) * q)


@functools.lru_cache(maxsize=1024)
def launch_plan(t, h, inter, n1, e_local, e_global, k, dtype, act_code, gated, on_input, has_b1, has_b2,
                has_map, limit, upcast, small_slots, inline_slots, cfg) -> LaunchPlan:
    """The :class:`LaunchPlan` of a chunk of ``t`` tokens (arguments hashable, ``cfg`` by :func:`_freeze`): a pure
    cache, the same arguments always give the same plan."""
    block_m, c13, c2, tma, pdl, split, sum_pass, tail, gather = cfg  # sum_pass: None = by SUM_PASS_SLOTS
    split = split and gated
    c13, c2 = dict(c13), dict(c2)
    bm = int(block_m)
    if tail:
        other = tail_conflicts(c13, c2)
        if other:
            raise ValueError(f'config "tail_bm" = {tail} runs the Triton GEMMs with unswapped tiles; it cannot be '
                             f'combined with {", ".join(other)}')
    combine = k > 1
    slots = t * k
    sum_pass = combine and (slots >= SUM_PASS_SLOTS if sum_pass is None else sum_pass)
    sems = combine and not sum_pass  # the fused sum's (token, column block) semaphores: zeroed by align / inline w13
    nbn = triton.cdiv(h, int(c2["BN"]))
    num_pid_m = triton.cdiv(slots + min(slots, e_local) * (bm - 1), bm)
    rows = num_pid_m * bm
    block_e = triton.next_power_of_2(e_local + 1)
    kp = triton.next_power_of_2(k)
    bt = max(1, 1024 // kp)
    skip_zero = not on_input
    # a Gluon kernel finds its block's expert in the align kernel's row_start: it asks for one at any T
    # tail blocks ask for one too: the inline layout has BLOCK_M blocks only
    inline = slots <= inline_slots and not (c13.get("gluon") or c2.get("gluon") or tail)
    align_mode = "inline" if inline else "small" if slots <= small_slots else "multi"
    sp, tp = max(16, triton.next_power_of_2(slots)), max(16, triton.next_power_of_2(t))
    ws = tuple(gluon_ws_value(part, c) for part, c in (("w13", c13), ("w2", c2)))
    dec = gluon_dec_value(c2)  # validated whether or not this chunk's plan can run it
    dec13 = gluon_dec_value(c13, "w13")
    # block_expert [num_pid_m]: the persistent Gluon GEMMs' block -> expert table (gluon_experts.launch_block_table)
    table = num_pid_m if any(ws) else 1
    i32_sizes = tuple(_pad(n) for n in (e_local + 1, slots, slots, t, e_local, rows, table, t * nbn if sems else 1))
    part_rows = slots if combine else 1
    part_offset = _pad(rows * inter, 64)
    common = dict(BM=bm, BLOCK_E=block_e, BT=bt, KP=kp, ZB=1024, BH=64, HAS_MAP=has_map, SKIP_ZERO=skip_zero,
                  COMBINE=sems, num_warps=4, **({"TAIL": tail} if tail else {}))
    bn13, bk13, bn2, bk2 = int(c13["BN"]), int(c13["BK"]), int(c2["BN"]), int(c2["BK"])
    small_elt = dtype != torch.float32
    dot_prec = "tf32" if small_elt else "ieee"
    shared = dict(BM=bm, BLOCK_E=block_e, HAS_MAP=has_map, SKIP_ZERO=skip_zero, COMBINE=combine, ON_INPUT=on_input,
                  DOT_PREC=dot_prec, UPCAST=upcast, INLINE=inline, SP=sp, **({"TAIL": tail} if tail else {}))
    w13_kw = dict(shared, BN=bn13, BK=bk13, GROUP_M=int(c13["GROUP_M"]), ACT=act_code, GATED=gated,
                  HAS_BIAS=has_b1, HAS_LIMIT=limit is not None, EVEN_K=h % bk13 == 0, TP=tp, SPLIT=split,
                  SWAP=bool(c13.get("SWAP", 0)), COMBINE=sems, num_warps=int(c13["num_warps"]),
                  num_stages=int(c13["num_stages"]))
    w2_kw = dict(shared, BN=bn2, BK=bk2, GROUP_M=int(c2["GROUP_M"]), HAS_BIAS=has_b2, EVEN_K=inter % bk2 == 0,
                 SWAP=bool(c2.get("SWAP", 0)), SUM_PASS=sum_pass, num_warps=int(c2["num_warps"]),
                 num_stages=int(c2["num_stages"]))
    bh = min(SUM_BH, triton.next_power_of_2(h))
    # the pre-gathered rows: TMA-read A tiles of the Triton w13 (an align kernel ran, weights in the params dtype)
    gather = gather and align_mode != "inline" and tma and small_elt and not c13.get("SWAP")
    gh = min(GATHER_BH, triton.next_power_of_2(h))
    part_fp32 = dtype == torch.float16  # the weighted slot rows past fp16's range still sum exactly (round 50)
    in_buf = 0 if part_fp32 else part_rows
    xg_offset = _pad(part_offset + in_buf * h, 64)
    return LaunchPlan(
        bm=bm, rows=rows, num_pid_m=num_pid_m, nbn=nbn, e_global=e_global, i32_sizes=i32_sizes,
        i32_total=sum(i32_sizes), buf_total=xg_offset + rows * h if gather else part_offset + in_buf * h,
        part_offset=part_offset, part_fp32=part_fp32,
        xg_offset=xg_offset,
        part_rows=part_rows, zero_counts=align_mode == "multi", align=align_mode,
        align_grid=(triton.cdiv(t, bt),), align_kw=common, scatter_kw=dict(BT=bt, KP=kp, num_warps=4),
        grid13=(num_pid_m * triton.cdiv(inter, bn13) * (2 if split else 1),), grid2=(num_pid_m * nbn,),
        w13_kw=w13_kw, w2_kw=w2_kw, split=split, sum_pass=sum_pass, grid_sum=(t, triton.cdiv(h, bh)),
        sum_kw=dict(BH=bh, HAS_MAP=has_map, SKIP_ZERO=skip_zero, INTERP=upcast, num_warps=4),
        limit_arg=0.0 if limit is None else float(limit), bn13=bn13, bk13=bk13, bn2=bn2, bk2=bk2,
        want_tma=tma and small_elt, want_pdl=pdl,
        w2_gluon=bool(c2.get("gluon", 0)) and sum_pass and align_mode != "inline",
        w13_gluon=bool(c13.get("gluon", 0)) and gated and not split and align_mode != "inline",
        gluon_stages=(int(c13.get("gluon_stages", 0)), int(c2.get("gluon_stages", 0))),
        # swapped (decode) tiles: one (three programs per SM: H200, DeepSeek-V3 mxfp4 T = 8 w13 634 -> 598 µs)
        gluon_wbuf=tuple(int(c.get("gluon_wbuf", 1 if c.get("SWAP") else 2)) for c in (c13, c2)),
        gluon_nt=gluon_nt_value("w2", c2),
        gluon_ws=ws,
        gluon_rega=(gluon_rega_value("w13", c13), gluon_rega_value("w2", c2)),
        gluon_early=(gluon_early_value("w13", c13), gluon_early_value("w2", c2)),
        gluon_maxnreg=(gluon_maxnreg_value("w13", c13), gluon_maxnreg_value("w2", c2)),
        gluon_stack=gluon_flag_value("w13", c13, "gluon_stack"), tail=tail,
        # the Gluon decode w2: swapped tiles (checked by its launcher), the fused sum, BLOCK_M tiles only
        w2_gluon_dec=dec if sems and not tail else 0,
        w13_gluon_dec=bool(dec13) and gated and not split and not tail,
        gather=gather, grid_gather=(triton.cdiv(slots, GATHER_BS), triton.cdiv(h, gh)),
        gather_kw=dict(BS=GATHER_BS, BH=gh, num_warps=4),
    )
