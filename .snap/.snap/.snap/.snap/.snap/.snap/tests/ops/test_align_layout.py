"""The align kernels' layout (``_triton/align.py``) against a torch twin, exactly: per-expert counts, each expert's
first row, every slot's expert, and a sorted row per live slot (ranks 0..n_e-1 within an expert, in any order:
the atomics hand them out in arrival order, and no GEMM output depends on it), live slots per token.

Both paths: the single program (``align_small_kernel``: its one-tile form that keeps the layout in registers, and
its loop over tiles when T > BT) and count + scatter. On CPU under the Triton interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts as te
from moekit.ops._triton import align
from moekit.ops.triton_configs import heuristic_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # (t, e_local, e_global, k, bm, tail, zero_w, bad_ids)      the edge
    (1, 4, 4, 1, 16, 0, False, False),  # one token, K = 1
    (7, 5, 5, 5, 16, 0, False, False),  # K = E: every expert per token, prime sizes
    (37, 8, 8, 2, 16, 0, True, True),  # zero weights and out-of-range ids are dead slots
    (64, 16, 32, 3, 32, 0, False, False),  # an expert map: half the experts are another rank's
    (100, 6, 6, 4, 64, 16, False, False),  # tail blocks of 16 rows
    (150, 8, 8, 6, 16, 0, False, False),  # K = 6 (KP 8, BT 128): T > BT, the single program loops over tiles
    (128, 128, 128, 8, 64, 0, False, False),  # 1024 slots (Qwen3-like T = 128): one full tile
    (9, 3, 3, 2, 16, 0, True, False),  # every slot of some tokens dead (their output rows are zeroed)
]


def _twin(ids, w, emap, e_local, e_global, bm, tail, skip_zero):
    """Expected (loc [S], counts [E_local], row_start [E_local], tok_live [T])."""
    flat = ids.reshape(-1).long()
    ok = (flat >= 0) & (flat < e_global)
    loc = torch.where(ok, flat.clamp(0, e_global - 1), torch.full_like(flat, -1))
    if emap is not None:
        loc = torch.where(ok, emap.long()[loc.clamp(min=0)], loc)
    if skip_zero:
        loc = torch.where(w.reshape(-1) != 0, loc, torch.full_like(loc, -1))
    loc = torch.where((loc >= 0) & (loc < e_local), loc, torch.full_like(loc, -1))
    counts = torch.bincount(loc[loc >= 0], minlength=e_local)[:e_local]
    if tail:
        nbig, rest = counts // bm, counts % bm
        rows = nbig * bm + torch.where((rest > 0) & (rest <= tail), tail, torch.where(rest > tail, bm, 0))
    else:
        rows = (counts + bm - 1) // bm * bm
    row_start = torch.cumsum(rows, 0) - rows
    live = (loc >= 0).reshape(ids.shape).sum(1)
    return loc.int(), counts.int(), row_start.int(), live.int()


@pytest.mark.parametrize("mode", ["small", "multi"])
@pytest.mark.parametrize("case", CASES, ids=[f"t{c[0]}-e{c[1]}-k{c[3]}-bm{c[4]}" for c in CASES])
def test_align_layout_matches_twin(case, mode):
    t, e_local, e_global, k, bm, tail, zero_w, bad_ids = case
    assert t > 0  # (T = 0 returns before any align: test_triton_experts)
    gen = torch.Generator().manual_seed(7 * t + k)
    ids = torch.stack([torch.randperm(e_global, generator=gen)[:k] for _ in range(t)]).int()
    w = torch.rand(t, k, generator=gen) + 0.1
    if zero_w and t:
        w[::3, 0] = 0.0
        w[::4] = 0.0
    if bad_ids and t:
        ids[1, 0], ids[2, 1] = e_global, -3
    emap = None
    if e_global != e_local:
        emap = torch.full((e_global,), -1, dtype=torch.int32)
        emap[torch.randperm(e_global, generator=gen)[:e_local]] = torch.arange(e_local, dtype=torch.int32)
    h = 32
    cfg = heuristic_config(max(t, 1), e_local, h, 16, k, torch.bfloat16)
    cfg = dict(cfg, BLOCK_M=bm, **({"tail_bm": tail} if tail else {}))
    p = te.launch_plan(max(t, 1), h, 16, 32, e_local, e_global, k, torch.bfloat16, 0, True, False, False, False,
                       emap is not None, None, te._interpreting(), 1 << 20 if mode == "small" else 0, 0,
                       te._freeze(cfg))
    assert p.align == mode
    counts, slot_loc, slot_rank, tok_live, row_start, sorted_slot, _, sem = torch.full(
        (p.i32_total,), -9, dtype=torch.int32).split_with_sizes(p.i32_sizes)
    counts.zero_()
    out = torch.full((t, h), 3.0, dtype=torch.bfloat16)
    dev = lambda v: v.to(DEV)  # noqa: E731
    ids, w, out = dev(ids), dev(w), dev(out)
    bufs = [dev(b.clone()) for b in (counts, slot_loc, slot_rank, tok_live, sem, row_start, sorted_slot)]
    counts, slot_loc, slot_rank, tok_live, sem, row_start, sorted_slot = bufs
    emap_arg = dev(emap) if emap is not None else slot_loc
    args = (ids, w, emap_arg, counts, slot_loc, slot_rank, tok_live, sem, out, row_start)
    sizes = (t, k, h, e_local, e_global, p.nbn, ids.stride(0), w.stride(0), out.stride(0))
    if mode == "small":
        align.align_small_kernel[(1,)](*args, sorted_slot, *sizes, **p.align_kw)
    else:
        align.count_kernel[p.align_grid](*args, *sizes, **p.align_kw)
        align.scatter_kernel[p.align_grid](slot_loc, slot_rank, row_start, sorted_slot, t, k, **p.scatter_kw)
    loc, cnt, start, live = _twin(ids.cpu(), w.cpu(), emap, e_local, e_global, bm, tail, skip_zero=True)
    s = t * k
    assert torch.equal(counts[:e_local].cpu(), cnt)
    assert torch.equal(row_start[:e_local].cpu(), start)
    assert torch.equal(slot_loc[:s].cpu(), loc)
    assert torch.equal(tok_live[:t].cpu(), live)
    assert bool((out.cpu()[live == 0] == 0).all()) and bool((out.cpu()[live > 0] == 3.0).all())  # dead rows zeroed
    rank, srt = slot_rank[:s].cpu(), sorted_slot.cpu()
    for e in range(e_local):
        mine = (loc == e).nonzero().flatten()
        assert sorted(rank[mine].tolist()) == list(range(len(mine)))  # ranks 0..n_e-1
        assert torch.equal(srt[start[e] + rank[mine]], mine.int())  # each live slot at its row
