"""The parallel expert executor: what :func:`moekit.FusedMoE` hands ``MoERunner`` for a parallel layer.

    out [T, H] = TP-all-reduce( EP-combine( experts( EP-dispatch(x [T, H], weights [T, K], ids [T, K]) ) ) )

Same interface as :class:`moekit.experts.executor.LocalExecutor`: ``name``, ``experts`` and
``__call__(x, topk_weights, topk_ids)``. The placement is read from ``experts`` (its one owner).

- Expert parallelism (``ep_group`` of size ``W_ep > 1``): tokens travel by one of the dispatchers of
  :mod:`moekit.parallel.dispatch`. ``mode="auto"`` takes the all-gather/reduce-scatter path when the
  largest rank has ``>= all_gather_min_tokens`` tokens, the all-to-all path below; every rank sees the
  same ``max T_r`` so all choose alike. ``mode`` forces one. The default threshold is 0 (always
  all-gather) when ``W_ep <= K`` — it then moves fewer bytes (``(W-1)·T`` rows against
  ``T·K·(W-1)/W``) and measured faster at every size from 1 to 4096 tokens per rank on 2 H200s
  (benchmarks/results/parallel-h200-2026-11-22.json) — and 1024 tokens when ``W_ep > K`` (SPEC §5:
  1.4–3× faster from 1024 tokens per rank on 2–4 GPUs).
  Beyond ``chunk_tokens`` tokens on any rank the forward runs in chunks (bounded buffers).
- Tensor parallelism (``tp_group`` of size ``W_tp > 1``): each rank's experts hold an ``I / W_tp``
  slice (the w2 bias on TP rank 0 only); the partial outputs are summed by an all-reduce in the input
  dtype. The ranks of one TP group must hold the same tokens. Fed different token counts, the TP
  all-reduce gets tensors of different sizes: gloo aborts the process ("collective mismatch" / a size
  error) and leaves the other ranks hanging; NCCL may hang or reduce garbage. Set
  ``check_tp_tokens = True`` (or the environment variable ``MOEKIT_CHECK_TP_TOKENS=1``, read when the layer is built)
  while debugging: every forward then all-gathers ``T`` (and fingerprints of the tokens and the routing) over the TP
  group first and every rank raises the same ``ValueError`` listing the counts (or the ranks fed other tokens; on an
  EP x TP grid their EP peers raise ``PeerFailed``). It also makes every rank raise when one fails before the
  forward's first collective (:mod:`.agree`). Decision (issue #12): off by default, because it adds a collective and a
  host synchronisation to every forward (which CUDA graphs cannot capture); measured on gloo, 2 CPU ranks of a loaded
  2-core machine: 0.6-0.75 ms per check, against 1.9-3 ms for the forward of a small layer (T=16, H=64, E=8) -- too
  much to pay on every forward by default.
- With EPLB the per-expert load is recorded here (live slots only), once per forward, after the first EP collective
  (a forward that raised on a rank records nothing on any rank).
- A rank that raises before the forward's first collective (its own input, routing, unloaded weights) still joins
  it with a failure flag, so every rank raises instead of waiting until the group's timeout (:mod:`.agree`, which
  also lists what that does not cover: the TP all-reduce carries no flag).
- A state dict the experts load (inside the layer or on their own) may carry a placement an EPLB rebalance moved:
  the EPLB routing maps follow it; a layer without EPLB refuses it (``ValueError``: it routes to the initial slots).
"""

from __future__ import annotations

import os

import torch

from .._checks import check_bool, check_int
from .agree import ForwardGuard, check_flags, failure_flag, flag_gather, guarded
from .comm import all_gather_into, all_reduce_sum, group_rank, group_size
from ..experts.routed import RoutedExperts
from .dispatch import DISPATCH_MODES, DISPATCHERS, compute_layout, layout_width, settings_row
from .eplb_state import watch_placement

#: the int64 values each rank sends in the TP token check's all-gather (its T; a failed rank sends its flag)
TP_CHECK_WIDTH = 5  # [T, four float64 sums bit-cast]: check_same_tokens

DEFAULT_CHUNK_TOKENS = 8192
DEFAULT_ALL_GATHER_MIN_TOKENS = 1024  # when W_ep > top_k; 0 (always all-gather) otherwise


class _NoBackward(torch.autograd.Function):
    """forward(run, x, topk_weights, topk_ids, *params) = run(x, topk_weights, topk_ids) without autograd (``params``:
    the experts' parameters, inputs only so that a backward reaching them raises too); backward raises: the token
    exchange and the reductions of expert / tensor parallel experts have no backward (training runs on one process)."""

    @staticmethod
    def forward(ctx, run, x, topk_weights, topk_ids, *params):
        return run(x, topk_weights, topk_ids)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(
            "backward through expert / tensor parallel experts is not implemented (the token exchange and the "
            "reductions have no backward): train on one process, or run this layer under torch.no_grad()")


class ParallelExecutor:
    """Runs ``experts`` over ``ep_group`` / ``tp_group``: ``(x [T, H], topk_weights [T, K] f32,
    topk_ids [T, K] int32 physical ids) -> [T, H]`` on every rank, for that rank's tokens."""

    name = "parallel"

    def __init__(
        self,
        experts: RoutedExperts,
        ep_group=None,
        tp_group=None,
        eplb_state=None,
        mode: str = "auto",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        all_gather_min_tokens: int | None = None,
    ):
        self.experts = experts
        self.ep_group = ep_group
        self.tp_group = tp_group
        self.ep_size = group_size(ep_group)
        self.ep_rank = group_rank(ep_group)
        self.tp_size = group_size(tp_group)
        self.eplb_state = eplb_state
        self.mode = mode
        self.chunk_tokens = chunk_tokens
        self.all_gather_min_tokens = all_gather_min_tokens
        self.last_mode: str | None = None
        #: all-gather T over the TP group before each forward and raise on a mismatch (module docstring)
        self.check_tp_tokens = os.environ.get("MOEKIT_CHECK_TP_TOKENS", "") not in ("", "0")
        self._owner_rank: torch.Tensor | None = None
        self._layout_base = None  # ((settings, device), settings_row): the layout gather's template
        self._pending: list[str] | None = None  # inside a guarded forward: the flag-carrying gathers not joined yet
        # a state dict's placement, however it reaches the experts: checked first, then the routing follows it
        watch_placement(experts, eplb_state)

    @property
    def mode(self) -> str:
        """The dispatch path: ``"auto"``, ``"all_to_all"`` or ``"all_gather"`` (checked when set)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in DISPATCH_MODES:
            raise ValueError(f"mode must be one of {list(DISPATCH_MODES)}, got {value!r}")
        self._mode = value

    # the knobs below are checked when set (round 56: chunk_tokens = 0, -1, 2.5 or "8" was taken and the next forward
    # raised a bare range() / torch.cat error on every rank, after the EP layout collective)
    @property
    def chunk_tokens(self) -> int:
        """The most tokens per rank one dispatch carries; a forward beyond it runs in chunks (an int >= 1)."""
        return self._chunk_tokens

    @chunk_tokens.setter
    def chunk_tokens(self, value) -> None:
        self._chunk_tokens = check_int("expert_executor.chunk_tokens", value, minimum=1)

    @property
    def all_gather_min_tokens(self) -> int | None:
        """``mode="auto"`` takes the all-gather path from this many tokens on the largest rank (an int >= 0), or None:
        the default (0 when ``W_ep <= top_k``, else :data:`DEFAULT_ALL_GATHER_MIN_TOKENS`)."""
        return self._all_gather_min_tokens

    @all_gather_min_tokens.setter
    def all_gather_min_tokens(self, value) -> None:
        self._all_gather_min_tokens = None if value is None else check_int("expert_executor.all_gather_min_tokens",
                                                                            value, minimum=0)

    @property
    def check_tp_tokens(self) -> bool:
        """Check that every rank of the TP group holds the same tokens before each forward (module docstring)."""
        return self._check_tp_tokens

    @check_tp_tokens.setter
    def check_tp_tokens(self, value) -> None:
        self._check_tp_tokens = check_bool("expert_executor.check_tp_tokens", value)

    def choose(self, max_tokens: int, top_k: int) -> str:
        """The dispatcher for a forward whose largest rank holds ``max_tokens`` tokens."""
        if self.mode != "auto":
            return self.mode
        threshold = self.all_gather_min_tokens
        if threshold is None:
            threshold = 0 if self.ep_size <= top_k else DEFAULT_ALL_GATHER_MIN_TOKENS
        return "all_gather" if max_tokens >= threshold else "all_to_all"

    def owner_rank(self, device) -> torch.Tensor:
        """[P] int64: the EP rank of every physical expert (fixed for the layer's life)."""
        if self._owner_rank is None or self._owner_rank.device != torch.device(device):
            owners = [r for r, _ in self.experts.placement.owners()]
            self._owner_rank = torch.tensor(owners, dtype=torch.int64, device=device)
        return self._owner_rank

    def first_collectives(self) -> tuple[str, ...]:
        """The flag-carrying gathers of a forward, in its order (:mod:`.agree`): ``"tp"`` (the TP token check, when
        on) and ``"ep"`` (the EP layout); none on a TP-only layer without the check."""
        return (("tp",) if self.check_tp_tokens and self.tp_size > 1 else ()) + (("ep",) if self.ep_size > 1 else ())

    def forward_guard(self) -> ForwardGuard | None:
        """A :class:`~moekit.parallel.agree.ForwardGuard` for a forward about to start, or None (no flag-carrying
        collective, or a guarded forward already running: the outer guard answers)."""
        if self._pending is not None:
            return None
        firsts = self.first_collectives()
        return ForwardGuard(self, firsts) if firsts else None

    def _joining(self, name: str) -> None:
        """This rank enters the flag-carrying gather ``name`` (a failure from here on does not join it again)."""
        if self._pending and name in self._pending:
            self._pending.remove(name)

    def join_failed(self, pending: list[str], err: Exception) -> None:
        """This rank failed before the gathers ``pending``: join each, in order, with ``err``'s flag (its peers raise
        ``PeerFailed`` there). A gather that fails itself ends this (noted on ``err``, which the caller raises)."""
        flag, device = failure_flag(err), self.experts.w13_weight.device
        for name in pending:
            group, size, width = (self.tp_group, self.tp_size, TP_CHECK_WIDTH) if name == "tp" else \
                (self.ep_group, self.ep_size, layout_width(self.ep_size))
            try:
                flag_gather(group, size, width, flag, device)
            except Exception as gather_err:  # noqa: BLE001 - the rank's own error is the one to raise
                err.add_note(f"moekit: telling the {name.upper()} peers of this failure failed too: {gather_err!r}")
                return

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # a direct call's own failures are agreed too (inside a layer's forward: no guard, a no-op)
        return guarded(self.forward_guard(), self._run, x, topk_weights, topk_ids)

    def _run(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        experts = self.experts
        experts.check_loaded()  # before any collective
        if (self.ep_size > 1 or self.tp_size > 1) and torch.is_grad_enabled() and (
                x.requires_grad or topk_weights.requires_grad or any(p.requires_grad for p in experts.parameters())):
            # the forward as under no_grad; a backward through it raises (round 58: no silent missing gradients)
            return _NoBackward.apply(self._run, x, topk_weights, topk_ids, *experts.parameters())
        if self.check_tp_tokens and self.tp_size > 1:
            self.check_same_tokens(x, topk_weights, topk_ids)
        on_input = experts.moe_config.apply_router_weight_on_input
        layout = self.layout(topk_weights, topk_ids, x.device, on_input) if self.ep_size > 1 else None
        if self.eplb_state is not None:  # after the EP gather: a forward that raised on any rank records nothing
            self.eplb_state.record(topk_ids, topk_weights.detach(), on_input)
        if layout is not None:
            out = self.run_ep(x, topk_weights, topk_ids, experts, on_input, layout=layout)
        else:
            out = experts(x, topk_weights, topk_ids)
        if self.tp_size > 1 and out.numel():
            all_reduce_sum(out, self.tp_group)
        return out

    def check_same_tokens(self, x: torch.Tensor, topk_weights: torch.Tensor | None = None,
                          topk_ids: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` on every rank unless every rank of the TP group holds the same tokens and routing:
        ``T`` and fingerprints of ``x``, ``topk_weights`` and ``topk_ids`` (float64 sums, plain and weighted by the row
        position, compared bit for bit: equal tensors give equal sums on one kind of device); one all-gather and a host
        synchronisation. Round 66: the counts alone let ranks fed as many different tokens through (wrong outputs)."""
        rows = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)

        def by_row(t):
            return t.detach().to(torch.float64).flatten(1).sum(dim=1) if t is not None else rows * 0  # ([T, ...])

        xd = by_row(x)
        sums = torch.stack([xd.sum(), (xd * rows).sum(), (by_row(topk_weights) * rows).sum(),
                            (by_row(topk_ids) * rows).sum()])
        mine = torch.cat([torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), sums.view(torch.int64)])
        every = torch.empty(self.tp_size * TP_CHECK_WIDTH, dtype=torch.int64, device=x.device)
        self._joining("tp")
        all_gather_into(every, mine, self.tp_group)
        rows_by_rank = every.view(self.tp_size, TP_CHECK_WIDTH).tolist()
        counts = [r[0] for r in rows_by_rank]
        check_flags(counts, self.tp_group, "TP", "before the TP token check")
        if len(set(counts)) > 1:
            raise ValueError(
                f"the ranks of tp_group were fed different token counts {counts} (by TP rank); every rank of a "
                "tensor-parallel group must hold the same tokens (see docs/parallel.md)"
            )
        if len({tuple(r[1:]) for r in rows_by_rank}) > 1:
            odd = [r for r, row in enumerate(rows_by_rank) if row[1:] != rows_by_rank[0][1:]]
            raise ValueError(
                f"the ranks of tp_group were fed {counts[0]} tokens each, but different ones or routed differently (TP "
                f"ranks {odd} differ from TP rank 0: sums of their tokens or routing differ); every rank of a "
                "tensor-parallel group must hold the same tokens and router logits (see docs/parallel.md)"
            )

    def layout(self, topk_weights, topk_ids, device, on_input: bool):
        """The forward's :class:`~moekit.parallel.dispatch.Layout` over ``ep_group`` (one all-gather: this rank's first
        EP collective, where a peer's failure flag is read).

        topk_weights: [T, K] float32; topk_ids: [T, K] int physical ids; device: theirs."""
        key = (self.settings(), torch.device(device))
        if self._layout_base is None or self._layout_base[0] != key:  # (made once per setting: no copy per forward)
            self._layout_base = (key, settings_row(key[0], self.ep_size, device))
        return compute_layout(topk_weights, topk_ids, self.owner_rank(device), self.ep_group, self.ep_rank,
                              self.ep_size, on_input, joining=lambda: self._joining("ep"), base=self._layout_base[1])

    def settings(self) -> tuple[int, ...]:
        """The knobs every EP rank must share (:data:`~moekit.parallel.dispatch.SETTINGS`), as ints (None: -1), sent in
        the layout gather (round 62: one rank's ``chunk_tokens`` alone changed hung the forward)."""
        aggm = self.all_gather_min_tokens if self.mode == "auto" else None  # (read by "auto" alone: review)
        return DISPATCH_MODES.index(self.mode), self.chunk_tokens, -1 if aggm is None else aggm

    def run_ep(self, x, topk_weights, topk_ids, experts, on_input: bool, mode: str | None = None,
               layout=None) -> torch.Tensor:
        """Dispatch, run ``experts(x, weights, ids)`` on what arrives, combine. ``mode`` overrides; ``layout``: the
        forward's, if computed already (:meth:`layout`)."""
        layout = layout if layout is not None else self.layout(topk_weights, topk_ids, x.device, on_input)
        m = layout.max_tokens
        if m == 0:
            return torch.zeros_like(x)
        if m > self.chunk_tokens:
            c = self.chunk_tokens
            parts = [
                self.run_ep(x[s : s + c], topk_weights[s : s + c], topk_ids[s : s + c], experts, on_input, mode)
                for s in range(0, m, c)
            ]
            return torch.cat(parts)
        chosen = mode or self.choose(m, topk_ids.shape[1])
        self.last_mode = chosen
        d = DISPATCHERS[chosen]()
        got = d.dispatch(x, topk_weights, topk_ids, layout, self.ep_group, on_input)
        return d.combine(experts(got.x, got.weights, got.ids), got.handle, self.ep_group)

    def __repr__(self) -> str:
        return f"ParallelExecutor(ep_size={self.ep_size}, tp_size={self.tp_size}, mode={self.mode!r})"

