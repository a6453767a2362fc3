"""Pieces shared by the Gluon grouped GEMMs: program order (and the persistent kernels' walk over tiles), the
expert of a row block (scanned, or from the block -> expert table for the persistent kernels), a tile's rows, a K
step's fp8 scales, the fp8 w13 and w2 epilogues."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .._triton.epilogue import activate
from .._triton.quant import requant_store, to_dt


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
def ring_barriers(N: gl.constexpr, FULL: gl.constexpr, EMPTY: gl.constexpr):
    """(full, empty): ``N`` mbarriers each, initialised for ``FULL`` / ``EMPTY`` arrivals per phase (the slots of a
    warp-specialised kernel's ring: ``full[s]`` when its operands landed, ``empty[s]`` when its readers are done)."""
    full = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(N):
        mbarrier.init(full.index(s), count=FULL)
        mbarrier.init(empty.index(s), count=EMPTY)
    return full, empty


@gluon.jit
def tile_walk(C_ID: gl.constexpr, NC: gl.constexpr):
    """(first tile, stride) of consumer ``C_ID`` of ``NC`` (and its producer) in a persistent program: program
    ``p`` of ``P`` takes tiles ``p + C_ID·P, p + (C_ID + NC)·P, ...``."""
    return gl.program_id(0) + C_ID * gl.num_programs(0), NC * gl.num_programs(0)


@gluon.jit
def tile_rows(pid_m, first, n_e, BM: gl.constexpr, ROW_L: gl.constexpr):
    """The tile's sorted rows ([BM] in ``ROW_L``) and which of them hold a slot (row block ``pid_m`` of an expert
    whose blocks start at ``first`` and hold ``n_e`` live rows)."""
    r = gl.arange(0, BM, layout=ROW_L)
    return pid_m * BM + r, (pid_m - first) * BM + r < n_e


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


@gluon.jit
def w13_store(acc_g, acc_u, e, rows, valid, pid_n, b1_ptr, inter_ptr, is_ptr, out_ptr, I, limit, stride_be,
              stride_ir, stride_isr, BN: gl.constexpr, col_l: gl.constexpr, ACT: gl.constexpr,
              HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, REQ: gl.constexpr, UE8M0: gl.constexpr):
    """The fp8 w13 epilogue (``_triton.grouped_gemm.w13_kernel``'s): ``+ b13``, the gated activation in fp32, the
    store rounded to the intermediate's dtype (``REQ`` 0) or quantised per row of the tile for w2 (``REQ`` 1, BN =
    the group, scales into ``is``). acc_g / acc_u: [BM, BN] fp32; ``col_l``: their column layout; rows / valid:
    [BM] in their row layout; ``out_ptr``: any tensor of the params dtype (not read)."""
    cols = pid_n * BN + gl.arange(0, BN, layout=col_l)
    nmask = cols < I
    if HAS_BIAS:
        b_base = b1_ptr + e.to(gl.int64) * stride_be
        acc_g += gl.load(b_base + cols, mask=nmask, other=0.0).to(gl.float32)[None, :]
        acc_u += gl.load(b_base + I + cols, mask=nmask, other=0.0).to(gl.float32)[None, :]
    h = activate(acc_g, acc_u, limit, ACT, HAS_LIMIT)
    out_ptrs = inter_ptr + rows.to(gl.int64)[:, None] * stride_ir + cols[None, :]
    if REQ > 0:
        requant_store(h, out_ptrs, valid[:, None] & nmask[None, :], is_ptr, rows.to(gl.int64) * stride_isr + pid_n,
                      valid, is_ptr, nmask, out_ptr.dtype.element_ty, REQ, UE8M0, False)
    else:
        gl.store(out_ptrs, to_dt(h, inter_ptr.dtype.element_ty, False), mask=valid[:, None] & nmask[None, :])


@gluon.jit
def grid_wait():
    """``griddepcontrol.wait``: this grid was launched as a programmatic dependent of the kernel before it; wait
    until that grid has completed and its memory is visible (a no-op without the launch attribute)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def grid_launch_dependents():
    """``griddepcontrol.launch_dependents``: the grid launched as this one's programmatic dependent may start once
    every program of this grid has made this call or exited (it still waits for this grid before reading what it
    writes: :func:`grid_wait`)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)
