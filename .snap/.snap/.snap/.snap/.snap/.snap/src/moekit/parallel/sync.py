"""What the ranks of a layer's process groups tell each other outside the forward: that they built the layer alike
(:func:`agree_groups`, at construction) and that none of them failed a step that the others would wait behind
(:func:`fail_together`: :func:`moekit.load_moe_layers` before each layer and after the last tensor, and a layer's
construction that fails before its agreement).

Both are one object all-gather per group, in order (EP, then TP), and speak one payload, ``(kind, body, told)``:
``kind`` "settings" (``body``: the rank's ``(setting, value)`` pairs, long values as digests) or "sync" (``body``:
where the rank is, e.g. a layer's name), ``told``: ``{global rank: (what, message)}`` of every failure, disagreement
or rank out of step that the rank knows of, its own included, ``what`` one of "failed", "differ", "step". Each gather
passes on what the earlier ones told, notes on peers out of step included, so on an EP x TP grid (every EP group meets
every TP group in one rank) every rank learns everything in one pass. Because the payloads are alike, a rank that
failed before a construction-time agreement, and went to :func:`fail_together`, meets its peers inside their agreement:
they learn of the failure there (:class:`PeerFailed`) and that exchange was the last one, for them and for it.

Every error raised by these functions (and by a collective inside them) carries ``synced = True``: the exchange that
told it was the last one every rank of the groups took part in, so a caller must not start another one for it (a
peer may have left already). Round 52 (audit and two reviews): a rank's own failure while loading, a settings
mismatch on an EP x TP grid, a failure before the agreement, and ranks with different numbers of layers each left the
other ranks waiting in a collective until the group's timeout (or returning as if nothing had happened).
"""

from __future__ import annotations

import hashlib

from .comm import global_rank, group_size

SETTINGS, SYNC = "settings", "sync"
FAILED, DIFFER, STEP = "failed", "differ", "step"
_LONG = 160  # a setting's value longer than this travels and is compared as a digest (a quant_config's long lists)
_SHOWN = 8  # ranks named in a message


class PeerFailed(RuntimeError):
    """Another rank of the groups failed or is out of step (global ranks and errors in the message); raised by every
    rank that did not fail, in the exchange where they learned it."""

    synced = True


class SettingsDiffer(ValueError):
    """The ranks of a group were built with different settings (raised in the agreement where it was seen)."""

    synced = True


def _short(value):
    """``value`` itself, or a digest of its text where that is longer than :data:`_LONG`."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= _LONG:
        return value
    return f"{text[:60]}... (sha1 {hashlib.sha1(text.encode()).hexdigest()[:12]}, {len(text)} chars)"


def _exchange(payloads, told: dict, judge=None) -> tuple[dict, list]:
    """All-gather ``(kind, body, told)`` over each ``(group, kind, body)`` of ``payloads`` in order, ``told`` grown by
    each gather and by ``judge(rank, kind, body)``'s note on a peer (added before the next gather); returns (``told``,
    every gathered ``(global rank, kind, body)``)."""
    import torch.distributed as dist

    told, rows = dict(told), []
    for group, kind, body in payloads:
        size = group_size(group)
        if size == 1:
            continue
        everyone: list = [None] * size
        try:
            dist.all_gather_object(everyone, (kind, body, dict(told)), group=group)
        except Exception as err:  # noqa: BLE001 - a broken group: no caller may try another exchange on it
            err.synced = True
            raise
        for i, (k, b, t) in enumerate(everyone):
            told.update(t)
            rows.append((global_rank(group, i), k, b))
        for r, k, b in rows[-size:] if judge is not None else ():
            note = judge(r, k, b)
            if note is not None and r not in told:
                told[r] = note
    return told, rows


def agree_groups(checks) -> None:
    """Every rank of each group was built with the same settings: ``checks`` = ``[(name, group, mine)]`` (``mine``:
    ``(setting, value)`` pairs), one gather per group even after a mismatch. A rank that saw settings differ raises
    :class:`SettingsDiffer` (a ``ValueError`` listing them); a rank told of a failure or of a rank out of step raises
    :class:`PeerFailed`; a rank told only of another group's mismatch raises :class:`SettingsDiffer` naming it."""
    checks = [(name, g, tuple((k, _short(v)) for k, v in mine)) for name, g, mine in checks if group_size(g) > 1]
    if not checks:
        return
    import torch.distributed as dist

    me = dist.get_rank()
    own, told = None, {}

    def judge(r, k, b):  # a peer at a sync while this rank builds a layer: out of step (or failed: told already)
        return (STEP, f"at a sync at {b!r} while rank {me} builds a layer") if k == SYNC else None

    for name, group, mine in checks:
        told, rows = _exchange([(group, SETTINGS, mine)], told, judge)
        peers = [dict(b) for _, k, b in rows if k == SETTINGS]
        differ = {k: [p.get(k) for p in peers] for k, v in mine if any(p.get(k) != v for p in peers)}
        if differ and own is None:
            own = (f"the ranks of {name} were built with different settings (by rank of {name}): {differ}; every rank "
                   f"of {name} must build the layer alike" + (
                       " (EP peers hold the same tensor-parallel slice: each EP group takes one rank of equal tp_rank "
                       "from every TP group)" if "tp_rank" in differ else ""))
            told[me] = (DIFFER, own)
    if own is not None:
        raise SettingsDiffer(own)
    if any(what != DIFFER for what, _ in told.values()):
        raise PeerFailed(_failed_message("building the layer", told, me))
    if told:
        raise SettingsDiffer(f"another rank's settings differ: {_listed(told)}")


def fail_together(what: str, failure: BaseException | None, groups, where: str = "") -> None:
    """Every rank of each group in ``groups`` (process groups or None) learns whether any of them failed ``what``
    (module docstring: one gather per group, in order). A failing rank re-raises its own ``failure`` (marked
    ``synced``); the others raise :class:`PeerFailed` (a ``RuntimeError``) naming the failing global ranks and their
    errors, instead of waiting in the next collective until the group's timeout. ``where``: this sync's place (a
    layer's name, "end"); a peer at another place (a different number of layers) or in a layer's construction is out of
    step, which every rank learns too. Every rank of the groups must call it, failed or not. A collective that fails
    here on a failing rank raises its own ``failure`` (from the collective's error)."""
    if all(group_size(g) == 1 for g in groups):
        if failure is not None:
            raise failure
        return
    import torch.distributed as dist

    me = dist.get_rank()
    mine = {} if failure is None else {me: (FAILED, f"{type(failure).__name__}: {str(failure)[:400]}")}

    def judge(r, k, b):
        if failure is not None or r == me or (k == SYNC and b == where):
            return None
        return (STEP, (f"at {b!r}" if k == SYNC else "in a layer's construction") + f" while rank {me} is at {where!r}")

    try:
        told, _ = _exchange([(g, SYNC, where) for g in groups], mine, judge)
    except Exception as err:  # noqa: BLE001 - the rank's own error is the one to keep
        if failure is not None:
            failure.synced = True
            raise failure from err
        raise
    if failure is not None:
        failure.synced = True
        raise failure
    if told:
        raise PeerFailed(_failed_message(what, told, me))


def _listed(told: dict) -> str:
    items = sorted(told.items())
    more = f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(f"rank {r}: {m}" for r, (_, m) in items[:_SHOWN]) + more


def _failed_message(what: str, told: dict, me: int) -> str:
    return f"{what} failed on global rank(s) {sorted(told)} (this rank, {me}, did not): {_listed(told)}"
