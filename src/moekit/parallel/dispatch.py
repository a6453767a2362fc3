"""Expert-parallel token exchange: layout → dispatch → (local experts) → combine.

Each of the ``W`` ranks of ``ep_group`` holds ``T_r`` tokens (any, 0 included) with routing
``(weights [T, K], ids [T, K])`` over physical experts; physical id ``p`` lives on rank ``owner[p]``.
``out[t] = Σ_k w[t, k] · expert_{ids[t, k]}(x[t])`` must come back to the token's rank.

- :func:`compute_layout` — once per forward: sorts the live ``(t, k)`` slots by destination rank and
  all-gathers ``[T_r, rows to each rank]`` (one small collective; every rank then knows every split
  size and ``max_r T_r``, so all ranks take the same branch and chunking). The first collective of every EP
  forward, whatever the dispatcher: a rank that failed before it sends a flag there (:mod:`.agree`).
- :class:`AllToAllDispatcher` — one row per live ``(t, k)`` slot goes to its expert's rank
  (``all_to_all_single`` with split sizes); the experts there run each row with weight 1 (output in
  the input dtype, exactly the single-GPU slot output); the rows come back along the same layout and
  the combine forms ``w · out`` in fp32 per ``(t, k)`` and sums ``k = 0..K-1`` locally, in the
  single-GPU order. Guarantee: bit-identical to the single-process torch reference whenever the
  expert GEMM gives a row the same bits whatever rows share its batch (true of the torch reference
  on CPU as tested; on GPU, cuBLAS/Triton tile choice may differ with batch size → allclose). fp8 layers are
  allclose (round 65): their single-process slot output is weighted in fp32 before any rounding, here it
  crosses the exchange rounded to the layer's dtype (docs/parallel.md).
- :class:`AllGatherDispatcher` — all-gather every rank's tokens (padded to ``max T_r``), run the local
  experts on all of them (slots of experts held elsewhere add 0 through ``expert_map``), and
  reduce-scatter the partial outputs. Guarantee: allclose only — each rank's partial sum is rounded
  to the input dtype and the ranks' partials are added by the collective (SPEC §4 tolerances). Bit-exact
  (where the all-to-all path is) on a token whose live slots all sit on one rank: the other ranks'
  partials are +0. So a test of this path proves nothing about exactness unless its tokens are split
  (round 50: the EPLB test's tokens never were until the replica choice mixed in the expert id). Not
  made exact on purpose: fp32 partials would double the reduce-scatter's bytes in bf16 (this path is
  chosen for its bandwidth) and still group the slots by rank, not in the single-GPU order, for K > 2.

Messages are packed as bytes ``[ids int32 · k | weights fp32 · k | x]`` per row: one collective each way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .agree import check_flags
from .comm import all_gather_into, all_to_all_rows, reduce_scatter_into

#: Combine scratch bound for the all-to-all path ([tokens, K, H] fp32 blocks), bytes.
COMBINE_WORKSPACE_BYTES = 256 * 1024 * 1024


@dataclass
class Layout:
    """Where this rank's slots go; computed once per forward, reused by dispatch and combine."""

    num_tokens: int  # T on this rank
    tokens_per_rank: list[int]  # T_r of every rank
    send_counts: list[int]  # rows this rank sends to each rank (all-to-all)
    recv_counts: list[int]  # rows this rank receives from each rank
    order: torch.Tensor  # [N_send] int64 flat slot ids t·K + k, grouped by destination rank, stable

    @property
    def max_tokens(self) -> int:
        return max(self.tokens_per_rank)


@dataclass
class Dispatched:
    """What the local experts receive: ``x [N, H]``, ``weights [N, k] fp32``, ``ids [N, k] int32``."""

    x: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    handle: object


def live_slots(topk_weights: torch.Tensor, on_input: bool) -> torch.Tensor:
    """[T·K] bool: slots that contribute (weight 0 adds exactly 0 unless the weight scales the input)."""
    w = topk_weights.reshape(-1)
    return torch.ones_like(w, dtype=torch.bool) if on_input else w != 0


#: the executor settings each rank sends in the layout all-gather: ranks that disagree raise on every rank (round 62:
#: chunk_tokens set on one rank only hung the forward)
SETTINGS = ("mode", "chunk_tokens", "all_gather_min_tokens")


def layout_width(world: int) -> int:
    """The int64 values each rank sends in the layout all-gather (``[T, rows for rank 0..W-1, settings]``); a failed
    rank joins it with as many (:meth:`~moekit.parallel.executor.ParallelExecutor.join_failed`)."""
    return world + 1 + len(SETTINGS)


def settings_row(values, world: int, device) -> torch.Tensor:
    """The template :func:`compute_layout` fills (``base``): ``[layout_width + 1]`` int64, zeros but ``values`` (ints,
    one per :data:`SETTINGS`) after the per-rank counts; the last entry is the dead slots' bin, dropped. Made once per
    setting (:meth:`~moekit.parallel.executor.ParallelExecutor.layout`): a forward clones it, no host copy."""
    return torch.tensor([0] * (world + 1) + list(values) + [0], dtype=torch.int64, device=device)


def compute_layout(topk_weights, topk_ids, owner_rank: torch.Tensor, group, rank: int, world: int,
                   on_input: bool, joining=None, base: torch.Tensor | None = None) -> Layout:
    """Every rank's ``[T_r, rows to rank 0..W-1]`` (one all-gather) and this rank's send order. A rank that failed
    before it sent ``T_r < 0`` (:mod:`moekit.parallel.agree`): the others raise ``PeerFailed`` right after the gather.

    topk_weights: [T, K] float; topk_ids: [T, K] int physical ids; owner_rank: [P] int64 on the device; joining:
    called just before the gather (the executor's mark that this rank joined its first EP collective) or None;
    base: :func:`settings_row` of the :data:`SETTINGS` every rank must share (None: zeros), checked after the gather:
    ``ValueError`` on every rank, naming each rank's values, where they differ."""
    t = topk_ids.shape[0]
    width = layout_width(world)
    dest = owner_rank[topk_ids.reshape(-1).long()]
    # dead slots: the last bin (width - 1 + 1, past the settings: dropped), after every rank's in the sort
    key = torch.where(live_slots(topk_weights, on_input), dest, torch.full_like(dest, width - 1))
    order = torch.argsort(key, stable=True)
    # meta = [T, rows for rank 0..W-1, settings] (+ the dropped bin); no host sync before the gather
    meta = base.clone() if base is not None else torch.zeros(width + 1, dtype=torch.int64, device=key.device)
    meta.index_add_(0, key + 1, torch.ones_like(key))
    meta[0] = t
    meta = meta[:width]
    everyone = meta.new_empty(world * width)
    if joining is not None:
        joining()
    all_gather_into(everyone, meta, group)
    m = everyone.view(world, width).tolist()
    check_flags([row[0] for row in m], group, "EP", "before the dispatch")
    if len({tuple(row[world + 1:]) for row in m}) > 1:
        said = "; ".join(f"{name} {[row[world + 1 + i] for row in m]}" for i, name in enumerate(SETTINGS))
        raise ValueError(f"the ranks of ep_group run with different executor settings (by EP rank: {said}); set them "
                         "alike on every rank (layer.expert_executor)")
    send = m[rank][1:world + 1]
    return Layout(
        num_tokens=t,
        tokens_per_rank=[row[0] for row in m],
        send_counts=send,
        recv_counts=[row[1 + rank] for row in m],
        order=order[: sum(send)],
    )


def pack_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x: [N, H]; ids: [N, k]; weights: [N, k] -> uint8 [N, 8k + H·itemsize]."""
    # _fresh where contiguous() is not enough: an empty [0, 1] weight tensor scaled by routed_scaling_factor keeps
    # strides (1, 0), which view() rejects (round 46: that rank raised, its peers hung in the all-gather)
    parts = [ids.to(torch.int32).contiguous(), weights.to(torch.float32).contiguous(), x.contiguous()]
    return torch.cat([(p if p.stride(-1) == 1 else _fresh(p)).view(torch.uint8) for p in parts], dim=1)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides (``contiguous()`` keeps odd strides of size-0/1 dims, which
    ``view(dtype)`` rejects)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def unpack_rows(buf: torch.Tensor, k: int, dtype: torch.dtype):
    """Inverse of :func:`pack_rows` -> (x [N, H] dtype, ids [N, k] int32, weights [N, k] fp32)."""
    ids = _fresh(buf[:, : 4 * k]).view(torch.int32)
    weights = _fresh(buf[:, 4 * k : 8 * k]).view(torch.float32)
    x = _fresh(buf[:, 8 * k :]).view(dtype)
    return x, ids, weights


class AllToAllDispatcher:
    """One row per live ``(token, k)`` slot; bit-exact combine (module docstring)."""

    name = "all_to_all"

    def dispatch(self, x, topk_weights, topk_ids, layout: Layout, group, on_input: bool) -> Dispatched:
        k = topk_ids.shape[1]
        slots = layout.order
        send = pack_rows(x[slots // k], topk_ids.reshape(-1, 1)[slots], topk_weights.reshape(-1, 1)[slots])
        recv = send.new_empty((sum(layout.recv_counts), send.shape[1]))
        all_to_all_rows(recv, send, layout.recv_counts, layout.send_counts, group)
        rx, rids, rw = unpack_rows(recv, 1, x.dtype)
        # the weight is applied in fp32 by the combine, on the slot output as the experts round it (bf16: the
        # single-GPU bits); fp16 rows are weighted by the experts instead (round 64: a slot output past 65504 came
        # back inf where the weighted sum was finite; fp16 is allclose, not bit-exact, either way)
        weighted = on_input or x.dtype == torch.float16
        if not weighted:
            rw = torch.ones_like(rw)
        return Dispatched(rx, rw, rids, (layout, topk_weights, k, x.dtype, weighted))

    def combine(self, expert_out: torch.Tensor, handle, group) -> torch.Tensor:
        layout, topk_weights, k, dtype, weighted = handle
        h = expert_out.shape[1]
        back = expert_out.new_empty((sum(layout.send_counts), h))
        all_to_all_rows(back, expert_out.contiguous(), layout.send_counts, layout.recv_counts, group)
        t = layout.num_tokens
        out = back.new_empty((t, h))
        if t == 0:
            return out
        if back.shape[0] == 0:  # nothing was sent (every slot dead): every token's sum is +0
            return out.zero_()
        # row of ``back`` holding every flat slot (-1: not sent, adds +0 like the single-GPU path)
        where = torch.full((t * k,), -1, dtype=torch.int64, device=back.device)
        where[layout.order] = torch.arange(layout.order.numel(), device=back.device)
        w = topk_weights.reshape(-1, 1).float()
        block = max(1, min(t, COMBINE_WORKSPACE_BYTES // (k * h * 4)))
        for start in range(0, t, block):  # gathers and masks only: no host sync
            stop = min(start + block, t)
            idx = where[start * k : stop * k]
            rows = back.index_select(0, idx.clamp(min=0)).float()
            if not weighted:
                rows = rows * w[start * k : stop * k]
            rows = torch.where((idx >= 0).unsqueeze(1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
            out[start:stop] = rows.view(stop - start, k, h).sum(dim=1).to(dtype)
        return out


class AllGatherDispatcher:
    """All-gather tokens, local experts on all of them, reduce-scatter partial outputs (allclose)."""

    name = "all_gather"

    def dispatch(self, x, topk_weights, topk_ids, layout: Layout, group, on_input: bool) -> Dispatched:
        t, k = topk_ids.shape
        m, world = layout.max_tokens, len(layout.tokens_per_rank)
        send = pack_rows(x, topk_ids, topk_weights)
        if m > t:  # pad: weight 0 and id 0 (padded rows are dropped after the reduce-scatter)
            send = torch.cat([send, send.new_zeros((m - t, send.shape[1]))])
        recv = send.new_empty((world * m, send.shape[1]))
        all_gather_into(recv, send, group)
        rx, rids, rw = unpack_rows(recv, k, x.dtype)
        return Dispatched(rx, rw, rids, (t, m))

    def combine(self, expert_out: torch.Tensor, handle, group) -> torch.Tensor:
        t, m = handle
        out = expert_out.new_empty((m, expert_out.shape[1]))
        reduce_scatter_into(out, expert_out.contiguous(), group)
        return out[:t]


DISPATCHERS = {"all_to_all": AllToAllDispatcher, "all_gather": AllGatherDispatcher}
DISPATCH_MODES = ("auto",) + tuple(DISPATCHERS)
