"""A forward that fails on one rank before its first collective ends with an error on every rank of its groups.

    flag(err) = -1 - i,  i = the index in :data:`FAILURE_KINDS` of the first class ``err`` is an instance of
    a forward's first collective of each group carries ``T >= 0`` (a live rank) or ``flag(err) < 0`` (a failed one)

Round 54 (audit): a rank that raised on its own input between a forward's entry and its first collective (NaN router
logits, a wrong width or dtype, logits of another token count, hash ``input_ids`` outside the table, weights not
loaded...) left its peers waiting in that collective until the process group's timeout. Now the forward runs under
a guard (:func:`agreed_forward` on the runner's two forwards; :class:`~moekit.parallel.ParallelExecutor`'s call has
its own for direct calls): a rank that raises before it joined the forward's flag-carrying collectives still joins
each of them, in the forward's order, with the flag in place of its token count, then re-raises its own exception
(type, message and traceback unchanged). Its peers read the flag in the values they gathered anyway (no extra
collective, no extra host synchronisation) and raise :class:`~moekit.parallel.sync.PeerFailed` (a ``RuntimeError``)
naming the rank and its exception's class. A rank told so at a TP gather joins its EP gather with the flag of a
``PeerFailed``, so the news crosses an EP x TP grid. Every rank took part in the same collectives, so the next
forward runs normally, and no EPLB load is recorded for the failed forward on any rank (the record follows the
gather).

The flag-carrying collectives (:meth:`ParallelExecutor.first_collectives`), in a forward's order:

- ``"tp"``: :meth:`~moekit.parallel.ParallelExecutor.check_same_tokens`'s all-gather of ``T`` over ``tp_group``
  (only with ``check_tp_tokens``);
- ``"ep"``: :func:`~moekit.parallel.dispatch.compute_layout`'s all-gather of ``[T, rows per rank]`` over
  ``ep_group``: the first EP collective of both dispatchers, before ``choose()`` reads ``max T_r``, before chunking
  and before the EPLB record.

Not covered: the TP all-reduce of the output carries no flag. Its size is ``T x H`` in the input's dtype, which a
rank whose input is what failed cannot be trusted to form (a wrong width, dtype or token count is the failure), and
reading a flag beside the sum would add a host synchronisation to the TP path, which has none. So on a TP-only
layer, and for the TP peers of the raising ranks of an EP x TP grid, a rank's failure still leaves its TP peers in
the all-reduce until the timeout unless ``check_tp_tokens`` is on (its gather is the first collective and carries the
flag). Failures after the first collective (the EPLB load record, inside the experts between dispatch and combine, or in
the runner after the executor) are not agreed either: the dispatch / combine exchanges carry data rows and no host
read. Nor are failures outside the guarded forwards: module forward (pre-)hooks run before ``forward`` is entered,
and a ``runner_cls`` that overrides ``forward`` without :func:`agreed_forward` has no guard.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..experts.executor import LocalExecutor
from .comm import all_gather_into, global_rank
from .sync import PeerFailed

#: what a flag names, by class (the first match; a subclass is named by its base): a peer's failure relayed first
FAILURE_KINDS = (PeerFailed, NotImplementedError, ValueError, TypeError, IndexError, KeyError, RuntimeError,
                 AssertionError, Exception)
_SHOWN = 4  # failed ranks named in a message


def failure_flag(err: BaseException) -> int:
    """The flag a failed rank sends in place of its token count: ``-1 - i`` (module docstring)."""
    return -1 - next(i for i, kind in enumerate(FAILURE_KINDS) if isinstance(err, kind))


def check_flags(counts: list[int], group, label: str, where: str,
                outcome: str = "this forward raised on every rank of the group; the layer stays usable") -> None:
    """Raise :class:`PeerFailed` naming every rank of ``group`` whose gathered count is a flag (``< 0``); else nothing.

    counts: [W] ints, the gathered token counts by rank of the group; label: the group's kind ("EP" / "TP");
    where: the step the flag stands for ("before the dispatch"); outcome: what the message says happened."""
    failed = [(r, c) for r, c in enumerate(counts) if c < 0]
    if not failed:
        return
    named = []
    for r, c in failed[:_SHOWN]:
        kind = FAILURE_KINDS[min(-1 - c, len(FAILURE_KINDS) - 1)]
        what = ("was told of a failure on a rank of another group (PeerFailed)" if kind is PeerFailed
                else f"failed {where} with {'an exception' if kind is Exception else 'a ' + kind.__name__}")
        named.append(f"{label} rank {r} (global rank {global_rank(group, r)}) of {label.lower()}_group {what}")
    more = f"; and {len(failed) - _SHOWN} more" if len(failed) > _SHOWN else ""
    raise PeerFailed("; ".join(named) + more + f"; see the failing rank's error ({outcome})")


def flag_gather(group, size: int, width: int, flag: int, device) -> None:
    """A failed rank's part in a flag-carrying all-gather over ``group`` (``size`` ranks): it sends ``[flag, 0, ...]``
    of ``width`` int64 values (the shape its peers send) and reads nothing back. ``device``: the weights'; where they
    are on ``meta`` (a layer never materialised on this rank, one of the failures it reports), the group's own
    (gloo: the CPU, else the current CUDA device): a collective on meta tensors is a silent no-op."""
    if torch.device(device).type == "meta":
        gloo = dist.get_backend(group) == "gloo"
        device = torch.device("cpu") if gloo else torch.device("cuda", torch.cuda.current_device())
    mine = torch.zeros(width, dtype=torch.int64, device=device)
    mine[0] = flag
    all_gather_into(mine.new_empty(size * width), mine, group)


class ForwardGuard:
    """The context a forward runs in while ``executor._pending`` lists the flag-carrying collectives it has not
    joined; on an exception it joins them with the flag (:meth:`ParallelExecutor.join_failed`), then lets the
    exception go on unchanged. Exceptions only (a ``KeyboardInterrupt`` leaves at once)."""

    __slots__ = ("executor", "firsts")

    def __init__(self, executor, firsts):
        self.executor, self.firsts = executor, firsts

    def __enter__(self):
        self.executor._pending = list(self.firsts)
        return self

    def __exit__(self, kind, err, tb) -> bool:
        pending, self.executor._pending = self.executor._pending, None
        if pending and isinstance(err, Exception):
            self.executor.join_failed(pending, err)
        return False


def agreed_forward(forward):
    """Decorator of a runner's forward: runs it under its executor's ``forward_guard()`` when it has one that
    answers a guard (a parallel executor with a flag-carrying collective), else calls it as it is (single-process
    layers: no change). Either way on the CUDA device of its input (``hidden_states``, the first argument), made
    current around the call where another one is (round 69, :mod:`moekit.ops.device_guard`)."""

    @functools.wraps(forward)
    def agreed(layer, hidden_states, *args, **kwargs):
        x = hidden_states  # (device_guard.other_device inline: a call less per forward; on CPU it stops at is_cuda)
        if isinstance(x, torch.Tensor) and x.is_cuda and x.get_device() != torch.cuda.current_device():
            with torch.cuda.device(x.get_device()):
                return agreed(layer, x, *args, **kwargs)  # (the device is current now: the common path)
        ex = layer.expert_executor
        if type(ex) is LocalExecutor:  # single-process layers: the plain call, no attribute probe (eager host time)
            return forward(layer, x, *args, **kwargs)
        start = getattr(ex, "forward_guard", None)
        if start is None:
            return forward(layer, x, *args, **kwargs)
        return guarded(start(), forward, layer, x, *args, **kwargs)

    return agreed


def guarded(guard: ForwardGuard | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under ``guard`` (None: as it is)."""
    if guard is None:
        return fn(*args, **kwargs)
    with guard:
        return fn(*args, **kwargs)
