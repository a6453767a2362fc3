"""What the ranks of a layer's process groups tell each other outside the forward: that they built the layer alike
(:func:`agree_groups`, at construction) and that none of them failed a step that the others would wait behind
(:func:`fail_together`, e.g. while :func:`moekit.load_moe_layers` reads a checkpoint).

Both are one object all-gather per group, in order (EP, then TP), and speak one payload, ``(kind, body, told)``:
``kind`` "settings" (``body``: the rank's ``(setting, value)`` pairs) or "sync" (``body``: where the rank is, e.g. a
layer's name), ``told``: ``{global rank: "Error: message"}`` of every failure or disagreement the rank knows of, its
own included. Each gather passes on what the earlier one told, so an EP group and a TP group that meet in one rank
reach the whole grid in one pass. Because the payloads are alike, a rank that failed before a construction-time
agreement, and went on to its :func:`fail_together`, meets its peers inside their agreement: they learn of the failure
there (:class:`PeerFailed`) and that exchange was the last one, for them and for it. Errors raised after such a shared
exchange carry ``synced = True``: a caller must not start another exchange for them (every rank of the groups raised in
the same pass). Round 52 (audit and review): a rank's own failure while loading, a settings mismatch on an EP x TP
grid, or a failure before the agreement, each left the other ranks waiting in a collective until the group's timeout.
"""

from __future__ import annotations

from .comm import global_rank, group_size

SETTINGS, SYNC = "settings", "sync"


class PeerFailed(RuntimeError):
    """Another rank of the groups failed (its global rank and error in the message); raised by every rank that did not
    fail, in the exchange where all of them learned it."""

    synced = True


class SettingsDiffer(ValueError):
    """The ranks of a group were built with different settings; every rank of the groups raises it in one pass."""

    synced = True


def _exchange(groups_payloads) -> tuple[dict, list]:
    """All-gather each ``(group, payload)`` in order (the first payload's ``told`` grows with what each gather told);
    returns (everything told, [(group, [(global rank, kind, body)])])."""
    import torch.distributed as dist

    told: dict = {}
    seen = []
    for group, (kind, body, mine) in groups_payloads:
        told.update(mine)
        size = group_size(group)
        if size == 1:
            continue
        everyone: list = [None] * size
        dist.all_gather_object(everyone, (kind, body, dict(told)), group=group)
        rows = []
        for i, (k, b, t) in enumerate(everyone):
            told.update(t)
            rows.append((global_rank(group, i), k, b))
        seen.append((group, rows))
    return told, seen


def agree_groups(checks) -> None:
    """Every rank of each group was built with the same settings: ``checks`` = ``[(name, group, mine)]`` (``mine``:
    ``(setting, value)`` pairs), one gather per group even after a mismatch, so every rank of the groups raises in the
    same pass: :class:`SettingsDiffer` (a ``ValueError`` listing the settings that differ, or naming the rank that saw
    them) or, when a peer arrived here from a failure, :class:`PeerFailed` naming it."""
    checks = [(name, g, mine) for name, g, mine in checks if group_size(g) > 1]
    if not checks:
        return
    import torch.distributed as dist

    me = dist.get_rank()
    own = None
    told = {}
    for name, group, mine in checks:
        got, seen = _exchange([(group, (SETTINGS, mine, told))])
        told.update(got)
        rows = seen[0][1] if seen else []
        peers = [dict(b) for _, k, b in rows if k == SETTINGS]
        differ = {k: [p.get(k) for p in peers] for k, v in mine if any(p.get(k) != v for p in peers)}
        if differ and own is None:
            own = (f"the ranks of {name} were built with different settings (by rank of {name}): {differ}; every rank "
                   f"of {name} must build the layer alike" + (
                       " (EP peers hold the same tensor-parallel slice: each EP group takes one rank of equal tp_rank "
                       "from every TP group)" if "tp_rank" in differ else ""))
            told[me] = f"SettingsDiffer: {own}"
        for r, k, b in rows:
            if k == SYNC:  # a peer at a sync, not here: it failed before this agreement (its error is in ``told``)
                told.setdefault(r, f"left the layer's construction for a sync at {b!r}")
    if own is not None:
        raise SettingsDiffer(own)
    failures = {r: m for r, m in told.items() if not m.startswith("SettingsDiffer: ")}
    if failures:
        raise PeerFailed(_failed_message("building the layer", failures, me))
    if told:
        raise SettingsDiffer(f"another rank's settings differ: {'; '.join(f'rank {r}: {m}' for r, m in told.items())}")


def fail_together(what: str, failure: BaseException | None, groups, where: str = "") -> None:
    """Every rank of each group in ``groups`` (process groups or None) learns whether any of them failed ``what``
    (module docstring: one gather per group, in order). A failing rank re-raises its own ``failure``; the others raise
    ``RuntimeError`` naming the failing global ranks and their errors, instead of waiting in the next collective until
    the group's timeout. ``where``: this sync's place (a layer's name, "end"); ranks at different places (a different
    number of layers), or a peer still in a layer's construction, are a failure too. Every rank of the groups must call
    it, failed or not. A collective that fails on a failing rank raises its own ``failure`` (from the collective's
    error), never only the collective's."""
    if all(group_size(g) == 1 for g in groups):
        if failure is not None:
            raise failure
        return
    import torch.distributed as dist

    me = dist.get_rank()
    mine = {} if failure is None else {me: f"{type(failure).__name__}: {str(failure)[:400]}"}
    try:
        told, seen = _exchange([(g, (SYNC, where, mine)) for g in groups])
    except Exception as err:  # noqa: BLE001 - the rank's own error is the one to keep
        if failure is not None:
            raise failure from err
        raise
    if failure is not None:
        raise failure
    for _, rows in seen:
        for r, k, b in rows:
            if r != me and r not in told and (k != SYNC or b != where):
                told[r] = (f"out of step: at {b!r}" if k == SYNC else "out of step: in a layer's construction") + \
                    f" while rank {me} is at {where!r}"
    if told:
        raise RuntimeError(_failed_message(what, told, me))


def _failed_message(what: str, told: dict, me: int) -> str:
    return (f"{what} failed on global rank(s) {sorted(told)} (this rank, {me}, did not): " +
            "; ".join(f"rank {r}: {m}" for r, m in sorted(told.items())))
