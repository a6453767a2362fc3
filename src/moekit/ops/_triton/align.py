"""Sort the (token, slot) pairs of one chunk by local expert into a padded block layout.

A *slot* is ``s = t·K + k``. A slot is *live* when its id lies in ``[0, E)``, maps to a local expert
(``expert_map[id] >= 0``; ``E`` = ``len(expert_map)``) and, on the output-weighted path, its weight is
not exactly 0. Out-of-range ids are dead (they add 0; the validating torch path raises instead).

Layout (``BM`` rows per block; expert ``e`` has ``n_e`` live slots)::

    blocks_e    = ceil(n_e / BM)
    row_start_e = BM · Σ_{e' < e} blocks_e'          (exclusive scan)
    sorted_slot[row_start_e + rank] = s              rank = the slot's arrival order in expert e

Tail tiles (``TAIL`` = BS rows, 0 < BS < BM; config ``"tail_bm"``): an expert's rows past its last whole
``BM`` block take one ``BS``-row block when they are at most ``BS``, else one more ``BM`` block
(:func:`tail_split`), and ``row_start`` is the exclusive scan of those rows (a multiple of ``BS``). An expert
has ``ceil(n_e / BM)`` blocks either way, so the block bound below holds for both layouts.

Every quantity is computed on the device: no host synchronisation, so the whole path can be
captured in a CUDA graph. The number of blocks is bounded on the host by
``ceil((S + min(S, E_local)·(BM - 1)) / BM)`` with ``S = T·K``; GEMM programs past the real count
exit at once. Padding rows of ``sorted_slot`` are never written: the GEMMs mask them by ``n_e``.

Scratch per chunk: ``counts [E_local + 1] int32`` (the last entry is a ticket; zero it before
:func:`count_kernel`), ``slot_loc [S]`` and ``slot_rank [S]`` int32, ``row_start [E_local]`` int32,
``tok_live [T]`` int32 (live slots per token). The count phase also zeroes the combine semaphores
``sem [T, NBN]`` (``COMBINE``: when w2 sums the top-k in its tail, not in a sum pass) and the output rows of
tokens with no live slot. For the persistent (warp-specialised) Gluon GEMMs, :func:`block_expert_kernel` then
writes ``block_expert [num_pid_m]`` int32: each row block's expert, so a tile finds it with one load.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slot_local_expert(
    ids_ptr, w_ptr, map_ptr, tok, kk, valid, stride_it, stride_wt, E_local, E_global,
    HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, EAGER_W: tl.constexpr = False,
):
    """Local expert of slot (tok, kk), or -1 when dead. ``tok``/``kk`` broadcast together. ``EAGER_W``: load the
    weights of every valid slot, beside the ids rather than after them (one dependent memory round trip fewer;
    the same result)."""
    tok64 = tok.to(tl.int64)
    raw = tl.load(ids_ptr + tok64 * stride_it + kk, mask=valid, other=-1)
    if SKIP_ZERO and EAGER_W:
        wv = tl.load(w_ptr + tok64 * stride_wt + kk, mask=valid, other=0.0)
    ok = valid & (raw >= 0) & (raw < E_global)  # in the ids' own dtype (round 63: an int64 id of 2^32 + 1 was cast
    eid = tl.where(ok, raw, -1).to(tl.int32)  # to 32 bits first and read as expert 1)
    if HAS_MAP:
        loc = tl.load(map_ptr + eid, mask=ok, other=-1).to(tl.int32)
        ok = ok & (loc >= 0) & (loc < E_local)
    else:
        loc = eid
    if SKIP_ZERO:
        if not EAGER_W:
            wv = tl.load(w_ptr + tok64 * stride_wt + kk, mask=ok, other=0.0)
        ok = ok & (wv != 0)
    return tl.where(ok, loc, -1)


@triton.jit
def _count_tile(
    t0, ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr,
    T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
    BT: tl.constexpr, KP: tl.constexpr, ZB: tl.constexpr, BH: tl.constexpr,
    HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, COMBINE: tl.constexpr, EAGER_W: tl.constexpr = False,
):
    """Count the slots of tokens [t0, t0 + BT): local experts, ranks (by atomics on ``counts``), live slots per
    token; zero the tile's semaphores and dead tokens' rows. Returns (loc, rank, slot) [BT, KP] (loc -1: dead or
    padding)."""
    tok = t0 + tl.arange(0, BT)
    tmask = tok < T
    kk = tl.arange(0, KP)
    valid = tmask[:, None] & (kk[None, :] < K)
    loc = slot_local_expert(
        ids_ptr, w_ptr, map_ptr, tok[:, None], kk[None, :], valid, stride_it, stride_wt, E_local, E_global,
        HAS_MAP, SKIP_ZERO, EAGER_W,
    )
    live = loc >= 0
    rank = tl.atomic_add(counts_ptr + loc, 1, mask=live, sem="relaxed")
    rank = tl.where(live, rank, 0)
    slot = tok[:, None] * K + kk[None, :]
    tl.store(loc_ptr + slot, loc, mask=valid)
    tl.store(rank_ptr + slot, rank, mask=valid)
    nlive = tl.sum(live.to(tl.int32), axis=1)
    tl.store(live_ptr + tok, nlive, mask=tmask)
    if COMBINE:  # zero this tile's combine semaphores: rows [t0, t0 + BT) of sem [T, NBN] are contiguous
        zero64 = tl.full([1], 0, tl.int64)
        base = (zero64 + t0) * NBN
        end = (zero64 + tl.minimum(T, t0 + BT)) * NBN
        for j0 in range(0, BT * NBN, ZB):
            j = base + j0 + tl.arange(0, ZB)
            tl.store(sem_ptr + j, tl.zeros([ZB], dtype=tl.int32), mask=j < end)
    dead = tmask & (nlive == 0)
    if tl.max(dead.to(tl.int32), axis=0) > 0:  # rare: every slot of a token is dead -> its row is 0
        rows = out_ptr + tok.to(tl.int64)[:, None] * stride_ot
        for h0 in range(0, H, BH):
            h = h0 + tl.arange(0, BH)
            zero = tl.zeros([BT, BH], dtype=out_ptr.dtype.element_ty)
            tl.store(rows + h[None, :], zero, mask=dead[:, None] & (h[None, :] < H))
    return loc, rank, slot


@triton.jit
def tail_split(cnt, BM: tl.constexpr, TAIL: tl.constexpr):
    """An expert's blocks for ``cnt`` live rows: (BM-row blocks, BS-row tail blocks (0 or 1), padded rows).
    ``TAIL`` = BS (0: off, every block BM rows). Works on scalars and tensors alike."""
    if TAIL > 0:
        nbig = cnt // BM
        rest = cnt - nbig * BM
        small = ((rest > 0) & (rest <= TAIL)).to(tl.int32)
        nbig = nbig + (rest > TAIL).to(tl.int32)
        return nbig, small, nbig * BM + small * TAIL
    else:
        nb = (cnt + BM - 1) // BM
        return nb, nb * 0, nb * BM


@triton.jit
def expert_row_starts(cnt, BM: tl.constexpr, TAIL: tl.constexpr):
    """row_start of every expert from its live rows ``cnt`` [BLOCK_E]: the exclusive scan of its padded rows (BM
    blocks, or with ``TAIL`` :func:`tail_split`'s rows). The one definition of the layout's row offsets: the align
    kernels store it, the GEMMs' :func:`.rows.tail_block` reads an expert's from it."""
    if TAIL > 0:
        _, _, rows = tail_split(cnt, BM, TAIL)
        start = tl.cumsum(rows, 0) - rows
    else:
        nb = (cnt + BM - 1) // BM
        start = (tl.cumsum(nb, 0) - nb) * BM
    return start


@triton.jit
def _scan(counts_ptr, row_start_ptr, E_local, BM: tl.constexpr, BLOCK_E: tl.constexpr, TAIL: tl.constexpr):
    offs = tl.arange(0, BLOCK_E)
    m = offs < E_local
    cnt = tl.load(counts_ptr + offs, mask=m, other=0, cache_modifier=".cg")
    tl.store(row_start_ptr + offs, expert_row_starts(cnt, BM, TAIL), mask=m)


@triton.jit
def _scatter_tile(
    t0, loc_ptr, rank_ptr, row_start_ptr, sorted_ptr, T, K, BT: tl.constexpr, KP: tl.constexpr,
):
    tok = t0 + tl.arange(0, BT)
    kk = tl.arange(0, KP)
    valid = (tok < T)[:, None] & (kk[None, :] < K)
    slot = tok[:, None] * K + kk[None, :]
    loc = tl.load(loc_ptr + slot, mask=valid, other=-1)
    live = loc >= 0
    rank = tl.load(rank_ptr + slot, mask=live, other=0)
    start = tl.load(row_start_ptr + loc, mask=live, other=0, cache_modifier=".cg")
    tl.store(sorted_ptr + (start + rank), slot, mask=live)


@triton.jit
def count_kernel(
    ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr, row_start_ptr,
    T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
    BM: tl.constexpr, BLOCK_E: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr, ZB: tl.constexpr,
    BH: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, COMBINE: tl.constexpr,
    TAIL: tl.constexpr = 0,
):
    """Grid (cdiv(T, BT),). Per-expert counts by atomics; the last program to finish scans them.

    ``counts [E_local + 1]`` must be zero on entry (entry ``E_local`` is the ticket).
    """
    pid = tl.program_id(0)
    _count_tile(
        pid * BT, ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr,
        T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
        BT, KP, ZB, BH, HAS_MAP, SKIP_ZERO, COMBINE, True,
    )
    tl.debug_barrier()
    ticket = tl.atomic_add(counts_ptr + E_local, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        _scan(counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, TAIL)


@triton.jit
def scatter_kernel(
    loc_ptr, rank_ptr, row_start_ptr, sorted_ptr, T, K, BT: tl.constexpr, KP: tl.constexpr,
):
    """Grid (cdiv(T, BT),): ``sorted_slot[row_start[e] + rank] = slot`` for every live slot."""
    _scatter_tile(tl.program_id(0) * BT, loc_ptr, rank_ptr, row_start_ptr, sorted_ptr, T, K, BT, KP)


@triton.jit
def align_small_kernel(
    ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr, row_start_ptr,
    sorted_ptr, T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
    BM: tl.constexpr, BLOCK_E: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr, ZB: tl.constexpr,
    BH: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, COMBINE: tl.constexpr,
    TAIL: tl.constexpr = 0,
):
    """One program does count, scan and scatter (small T: a single launch, no memset needed).

    When the tokens fit one tile (T <= BT, at most 1024 slots) the layout stays in registers: the counts are the
    histogram of the slots' experts, the scan runs on it, and each slot's ``row_start`` is gathered from the scan
    (two dependent memory round trips, the ids then the rank atomics, three with an expert map, instead of six)."""
    offs = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + offs, tl.zeros([BLOCK_E], dtype=tl.int32), mask=offs <= E_local)
    tl.debug_barrier()
    if T <= BT:
        loc, rank, slot = _count_tile(
            0, ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr,
            T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
            BT, KP, ZB, BH, HAS_MAP, SKIP_ZERO, COMBINE, True,
        )
        e = tl.reshape(tl.where(loc >= 0, loc, BLOCK_E - 1), [BT * KP])  # dead slots: bin BLOCK_E - 1 >= E_local
        cnt = tl.histogram(e, BLOCK_E)
        cnt = tl.where(offs < E_local, cnt, 0)
        start = expert_row_starts(cnt, BM, TAIL)
        tl.store(row_start_ptr + offs, start, mask=offs < E_local)
        row = tl.reshape(tl.gather(start, e, 0), [BT, KP]) + rank
        tl.store(sorted_ptr + row, slot, mask=loc >= 0)
        return
    for t0 in range(0, T, BT):
        _count_tile(
            t0, ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr,
            T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
            BT, KP, ZB, BH, HAS_MAP, SKIP_ZERO, COMBINE, True,
        )
    tl.debug_barrier()
    _scan(counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, TAIL)
    tl.debug_barrier()
    for t0 in range(0, T, BT):
        _scatter_tile(t0, loc_ptr, rank_ptr, row_start_ptr, sorted_ptr, T, K, BT, KP)


@triton.jit
def block_expert_kernel(
    counts_ptr, row_start_ptr, blk_ptr, n_blocks, E_local,
    BM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Grid (cdiv(n_blocks, BLOCK_B),), after the scan: ``block_expert[b]`` = the local expert of row block
    ``b`` = the number of experts whose padded rows end at or before it,

        block_expert[b] = #{e < E_local : row_start[e] / BM + ceil(counts[e] / BM) <= b}

    (``E_local`` for the blocks past the last expert's). The persistent Gluon GEMMs look a tile's expert up here
    (one load) instead of scanning ``row_start``. counts / row_start: [E_local] int32; blk: [n_blocks] int32."""
    offs = tl.arange(0, BLOCK_E)
    m = offs < E_local
    cnt = tl.load(counts_ptr + offs, mask=m, other=0)
    end = tl.load(row_start_ptr + offs, mask=m, other=0) // BM + (cnt + BM - 1) // BM
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    e = tl.sum((m[None, :] & (end[None, :] <= b[:, None])).to(tl.int32), axis=1)
    tl.store(blk_ptr + b, e, mask=b < n_blocks)
