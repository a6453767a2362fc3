"""Pieces shared by the Gluon grouped GEMMs: program order, the expert of a row block (scanned, or from the
block -> expert table for the persistent kernels), a K step's fp8 scales, the fp8 w2 epilogue."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def pid_to_tile(pid, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    """Grouped program order, as ``_triton.rows.pid_to_tile`` (GROUP_M row blocks share weight tiles in L2)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@gluon.jit
def block_expert(counts_ptr, row_start_ptr, b, E_local, BM: gl.constexpr, BLOCK_E: gl.constexpr,
                 num_warps: gl.constexpr):
    """(expert, its first block, its live rows) of row block ``b``, as ``_triton.rows.block_expert``, from
    the align kernel's ``row_start`` (the exclusive scan it stored): the experts whose padded rows end at or
    before the block are the ones before its expert."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs = gl.arange(0, BLOCK_E, layout=lay)
    m = offs < E_local
    cnt = gl.load(counts_ptr + offs, mask=m, other=0)
    start = gl.load(row_start_ptr + offs, mask=m, other=0) // BM
    end = start + (cnt + BM - 1) // BM
    e = gl.sum((m & (end <= b)).to(gl.int32), 0)
    first = gl.sum(gl.where(offs == e, start, 0), 0)
    n_e = gl.sum(gl.where(offs == e, cnt, 0), 0)
    return e, first, n_e


@gluon.jit
def block_tile(t, num_tiles, blk_ptr, counts_ptr, row_start_ptr, num_pid_m, num_pid_n, E_local,
               GROUP_M: gl.constexpr, BM: gl.constexpr):
    """(row block, column tile, expert, its first block, its live rows) of tile ``t`` of a persistent GEMM, the
    expert from the block -> expert table ``blk`` (``_triton.align.block_expert_kernel``): three scalar loads, two
    of them dependent. Expert ``E_local`` (skip; first block and live rows 0) past the last row block with rows
    and past the last tile (a look-ahead: pid_to_tile is only defined for tiles that exist, so the last one's)."""
    pid_m, pid_n = pid_to_tile(gl.minimum(t, num_tiles - 1), num_pid_m, num_pid_n, GROUP_M)
    e = gl.where(t >= num_tiles, E_local, gl.load(blk_ptr + pid_m))
    live = e < E_local
    first = gl.load(row_start_ptr + e, mask=live, other=0) // BM
    return pid_m, pid_n, e, first, gl.load(counts_ptr + e, mask=live, other=0)


@gluon.jit
def step_scale(as_rows, valid, ws_e, k):
    """s_x[row, k] · S[e, n-block, k] for the tile's rows ([BM], the accumulator's row layout)."""
    a_s = gl.load(as_rows + k, mask=valid, other=0.0)
    return a_s * gl.load(ws_e + k)


@gluon.jit
def w2_part_store(acc, e, pid_n, slot, valid, wv, b2_ptr, part_ptr, H, stride_be, stride_pr, BN: gl.constexpr,
                  col_l: gl.constexpr, HAS_BIAS: gl.constexpr, ON_INPUT: gl.constexpr):
    """The fp8 w2 epilogue (the SUM_PASS branch of ``_triton.grouped_gemm.w2_kernel``): ``part[slot] = (acc
    (+ b2[e]) ) (· w)`` for the tile's live rows and columns < H. acc: [BM, BN] fp32; ``col_l``: its column
    layout; slot / valid / wv: [BM] in its row layout (``wv`` unused when ``ON_INPUT``)."""
    cols = pid_n * BN + gl.arange(0, BN, layout=col_l)
    nmask = cols < H
    if HAS_BIAS:
        acc += gl.load(b2_ptr + e.to(gl.int64) * stride_be + cols, mask=nmask, other=0.0).to(gl.float32)[None, :]
    if not ON_INPUT:
        acc = acc * wv.to(gl.float32)[:, None]
    p_ptrs = part_ptr + slot.to(gl.int64)[:, None] * stride_pr + cols[None, :]
    gl.store(p_ptrs, acc, mask=valid[:, None] & nmask[None, :])
