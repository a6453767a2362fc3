"""Row blocks of the sorted layout (:mod:`.align`) as the grouped GEMMs see them: program order, the expert and
live rows of a block, and the decode path that derives the layout in registers (no align kernel)."""

from __future__ import annotations

import triton
import triton.language as tl

from .align import expert_row_starts, slot_local_expert, tail_split


@triton.jit
def pid_to_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M blocks of rows share weight tiles in L2, and the n tiles of one row
    block run together so its gathered inputs stay in L2."""
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def block_expert(counts_ptr, b, E_local, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, its first block, its live rows) of block ``b``; expert >= E_local past the end."""
    offs = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs, mask=offs < E_local, other=0)
    nb = (cnt + BM - 1) // BM
    cum = tl.cumsum(nb, 0)
    e = tl.sum((cum <= b).to(tl.int32), 0)
    first = tl.sum(tl.where(offs == e, cum - nb, 0), 0)
    n_e = tl.sum(tl.where(offs == e, cnt, 0), 0)
    return e, first, n_e


@triton.jit
def tail_block(counts_ptr, b, E_local, BM: tl.constexpr, TAIL: tl.constexpr, BLOCK_E: tl.constexpr):
    """Block ``b`` of the tail-tile layout (:func:`.align.tail_split`): (expert, or >= E_local past the end; its
    first sorted row; True for a BM-row block, False for the expert's BS-row tail block; the expert's live rows
    from that first row on). An expert's blocks are numbered BM blocks first, then its tail block."""
    offs = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs, mask=offs < E_local, other=0)
    nbig, small, _ = tail_split(cnt, BM, TAIL)
    nb = nbig + small
    cum = tl.cumsum(nb, 0)
    e = tl.sum((cum <= b).to(tl.int32), 0)
    sel = offs == e
    j = b - tl.sum(tl.where(sel, cum - nb, 0), 0)  # the block's index within its expert
    nbig_e = tl.sum(tl.where(sel, nbig, 0), 0)
    start = tl.sum(tl.where(sel, expert_row_starts(cnt, BM, TAIL), 0), 0)
    big = j < nbig_e
    first = tl.where(big, j, nbig_e) * BM
    return e, start + first, big, tl.sum(tl.where(sel, cnt, 0), 0) - first


@triton.jit
def inline_slots(ids_ptr, tw_ptr, map_ptr, S, K, E_local, E_global, stride_it, stride_twt,
                  SP: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, INLINE: tl.constexpr):
    """``INLINE``: local expert of every slot of a tiny batch (S <= SP), [SP] int32, -1 when dead.
    Otherwise an unused placeholder (the align kernel ran)."""
    if INLINE:
        j = tl.arange(0, SP)
        return slot_local_expert(
            ids_ptr, tw_ptr, map_ptr, j // K, j % K, j < S, stride_it, stride_twt, E_local, E_global, HAS_MAP,
            SKIP_ZERO,
        )
    else:
        return tl.zeros([SP], dtype=tl.int32)


@triton.jit
def inline_block(loc, b, E_local, BM: tl.constexpr, SP: tl.constexpr):
    """The align layout computed in registers for a tiny batch (no align kernel): slot j of expert e
    sits at row ``BM · (blocks of experts < e) + #{i < j: loc_i = e}`` — the same block structure as
    :mod:`.align`, with ranks in slot order. Returns (expert or E_local past the end, valid [BM], slot [BM])."""
    j = tl.arange(0, SP)
    live = loc >= 0
    same = (loc[:, None] == loc[None, :]) & live[:, None] & live[None, :]  # [i, j]
    n = tl.sum(same.to(tl.int32), axis=0)
    rank = tl.sum((same & (j[:, None] < j[None, :])).to(tl.int32), axis=0)
    nb = (n + BM - 1) // BM
    first = live & (rank == 0)
    earlier = first[:, None] & (loc[:, None] < loc[None, :])
    before = tl.sum(tl.where(earlier, nb[:, None], 0), axis=0)
    row = tl.where(live, before * BM + rank, -1)
    in_block = live & (row >= b * BM) & (row < b * BM + BM)
    e = tl.max(tl.where(in_block, loc, -1), axis=0)
    e = tl.where(e < 0, E_local, e)
    m = b * BM + tl.arange(0, BM)
    hit = (row[None, :] == m[:, None]) & live[None, :]
    valid = tl.max(hit.to(tl.int32), axis=1) > 0
    slot = tl.sum(tl.where(hit, j[None, :], 0), axis=1)
    return e, valid, slot


@triton.jit
def inline_prologue(loc, sem_ptr, out_ptr, T, K, H, NBN, stride_ot,
                     SP: tl.constexpr, TP: tl.constexpr, COMBINE: tl.constexpr):
    """What the align kernel's count phase does besides counting: zero the combine semaphores and
    the output rows of tokens with no live slot. Run by one program of the w13 launch."""
    if COMBINE:
        for j0 in range(0, T * NBN, 1024):
            jz = j0 + tl.arange(0, 1024)
            tl.store(sem_ptr + jz, tl.zeros([1024], dtype=tl.int32), mask=jz < T * NBN)
    j = tl.arange(0, SP)
    t = tl.arange(0, TP)
    cnt = tl.sum(((j[None, :] // K == t[:, None]) & (loc[None, :] >= 0)).to(tl.int32), axis=1)
    dead = (t < T) & (cnt == 0)
    if tl.max(dead.to(tl.int32), axis=0) > 0:
        rows = out_ptr + t.to(tl.int64)[:, None] * stride_ot
        for h0 in range(0, H, 64):
            h = h0 + tl.arange(0, 64)
            tl.store(rows + h[None, :], tl.zeros([TP, 64], dtype=out_ptr.dtype.element_ty),
                     mask=dead[:, None] & (h[None, :] < H))


@triton.jit
def row_block(pid_m, loc, counts_ptr, E_local, BM: tl.constexpr, BLOCK_E: tl.constexpr, SP: tl.constexpr,
               INLINE: tl.constexpr):
    """Row block ``pid_m`` of the sorted layout: (expert, or >= E_local past the end; valid [BM]; slot [BM]).
    ``INLINE``: from the slots' local experts ``loc`` in registers. Otherwise from the align kernel's
    counts, and ``slot`` is a placeholder: a program with work loads it from ``sorted_slot`` after the
    exit test."""
    if INLINE:
        e, valid, slot = inline_block(loc, pid_m, E_local, BM, SP)
    else:
        e, first, n_e = block_expert(counts_ptr, pid_m, E_local, BM, BLOCK_E)
        valid = (pid_m - first) * BM + tl.arange(0, BM) < n_e
        slot = tl.zeros([BM], dtype=tl.int32)
    return e, valid, slot


@triton.jit
def gather_rows_kernel(x_ptr, xg_ptr, loc_ptr, rank_ptr, row_start_ptr, S, K, H, stride_xt, stride_gr,
                       BS: tl.constexpr, BH: tl.constexpr):
    """``xg[row_start[loc[s]] + rank[s], :] = x[s // K, :]`` for the live slots ``s`` of the align kernel's layout
    (``loc[s] >= 0``), ``BS`` slots by ``BH`` columns per program, grid (cdiv(S, BS), cdiv(H, BH)): the w13 input in
    sorted order (config ``"gather_pass"``). A block's padding rows are never written (no GEMM output reads them).
    x: [T, H], xg: [rows, H] (the params dtype); loc, rank: [S] int32; row_start: [E_local] int32."""
    s = tl.program_id(0) * BS + tl.arange(0, BS)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    e = tl.load(loc_ptr + s, mask=s < S, other=-1)
    live = e >= 0
    row = tl.load(row_start_ptr + e, mask=live, other=0) + tl.load(rank_ptr + s, mask=live, other=0)
    m = live[:, None] & (cols < H)[None, :]
    v = tl.load(x_ptr + (s // K).to(tl.int64)[:, None] * stride_xt + cols[None, :], mask=m)
    tl.store(xg_ptr + row.to(tl.int64)[:, None] * stride_gr + cols[None, :], v, mask=m)
