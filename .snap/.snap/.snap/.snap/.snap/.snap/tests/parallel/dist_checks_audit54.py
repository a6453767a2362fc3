"""Round 54 audit (run in spawned gloo ranks by dist_harness): a rank that raises on its own input before a forward's
first collective must not leave its peers waiting in that collective (``moekit.parallel.agree``).

Defect (each check failed before the fix: the peers waited in the EP layout all-gather, or the TP token check's,
until the group's timeout, or paired it with the failed rank's next forward): one rank fed NaN router logits, a wrong
width or dtype, logits of another token count, hash ``input_ids`` outside the table, a gate that raises, or unloaded
weights. Now every rank raises within the forward (the failed rank its own exception, type and message as the
single-process layer raises it; the others ``PeerFailed`` naming it), and the next forward on every rank matches the
single-process layer. The groups here time out after :data:`GROUP_TIMEOUT_S` seconds, so a regression fails fast.
"""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

import moekit
from moekit.parallel.sync import PeerFailed
from dist_checks import _rank_batch, expect_rel_close, experts_backend, make_pair, registry

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()
BF = torch.bfloat16
GROUP_TIMEOUT_S = 20  # the groups' collective timeout: a forward that waits fails the check instead of hanging CI
FAST_S = 10.0  # a failed forward must end on every rank well within the timeout
MODES = ("all_to_all", "all_gather", "auto", "chunked")


class Boom(Exception):
    """A user module's own exception class (its type must reach the caller unchanged)."""


class _Gate(torch.nn.Module):
    """A fixed linear gate that raises :class:`Boom` while ``fail`` is set."""

    def __init__(self, h, e):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(e, h, generator=torch.Generator().manual_seed(9)) / h**0.5,
                                    requires_grad=False)
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise Boom("the gate refused this batch")
        return x.float() @ self.w.t()


def _group(ranks):
    return dist.new_group(ranks, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))


def _outcome(call):
    """(exception or None, seconds) of ``call()``."""
    t0 = time.monotonic()
    try:
        call()
        err = None
    except Exception as e:  # noqa: BLE001 - judged by the caller
        err = e
    return err, time.monotonic() - t0


def _expect_agreed(ctx, what, err, took, own, peer_parts):
    """This rank's outcome of a forward in which some rank failed: ``own`` is the exception this rank raises by
    itself (from the single-process layer on the same input), or None for a rank fed good input, which must raise
    ``PeerFailed`` whose message holds every string of ``peer_parts``."""
    ctx.expect(took < FAST_S, f"{what}: the forward took {took:.1f} s to end on rank {ctx.rank}")
    if own is not None:
        ok = type(err) is type(own) and str(err) == str(own)
        ctx.expect(ok, f"{what}: the failed rank raised {type(err).__name__}: {err}; expected "
                       f"{type(own).__name__}: {own}")
    else:
        ok = type(err) is PeerFailed and all(p in str(err) for p in peer_parts)
        ctx.expect(ok, f"{what}: a peer raised {type(err).__name__}: {err}; expected PeerFailed naming {peer_parts}")


def _set_mode(par, mode):
    ex = par.expert_executor
    ex.mode, ex.chunk_tokens = ("all_to_all", 2) if mode == "chunked" else (mode, 8192)


def _bad_inputs(x, lg):
    """name -> (args, kwargs, gate fails) of a bad call on a rank whose good call is ``(x, lg)``."""
    nan = lg.clone()
    nan[0, 1] = float("nan")
    return {
        "NaN router logits": ((x, nan), {}, False),
        "hidden width": ((torch.cat([x, x[:, :1]], dim=1), lg), {}, False),
        "dtype": ((x.float(), lg), {}, False),
        "logits of another token count": ((x, lg[:-1]), {}, False),
        "the gate raises": ((x,), {}, True),
    }


def _own_error(ref, args, kwargs, gate, gate_fails, method="forward"):
    """The exception the single-process layer raises on the bad input."""
    gate.fail = gate_fails
    try:
        getattr(ref, method)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the expected one
        return e
    finally:
        gate.fail = False
    raise AssertionError(f"the single-process layer accepted the bad input {[tuple(a.shape) for a in args]}")


def _round(ctx, ref, par, gate, x, lg, bad, name, what, label, method="forward"):
    """One forward where the ranks in ``bad`` get the bad input ``name``, then a good forward compared with ``ref``."""
    args, kwargs, gate_fails = _bad_inputs(x, lg)[name]
    own = _own_error(ref, args, kwargs, gate, gate_fails, method) if ctx.rank in bad else None
    call = getattr(par, method)
    gate.fail = gate_fails and ctx.rank in bad
    err, took = _outcome(lambda: call(*args, **kwargs) if ctx.rank in bad else call(x, lg))
    gate.fail = False
    kind = "Boom" if gate_fails else type(_own_error(ref, args, kwargs, gate, gate_fails, method)).__name__
    kind = "an exception" if kind == "Boom" else kind
    _expect_agreed(ctx, f"{what} {name}", err, took, own, [f"{label} rank {min(bad)}", kind])
    got, want = call(x, lg), getattr(ref, method)(x, lg)
    for g, w in [(got, want)] if method == "forward" else list(zip(got, want)):
        ctx.expect_close(g, w, f"{what} {name}: the next forward", exact="all_to_all" in what and g.dtype == BF)


# -- EP ----------------------------------------------------------------------------------------------------------------
@check(2)
def ep_bad_rank_all_raise(ctx):
    # each bad input on rank 1, then on rank 0, then on both, in both dispatchers, "auto" and chunks of 2 tokens: every
    # rank raises (the bad one its own exception), the next forward matches the single-process layer (bit-exact in bf16
    # on the all-to-all path); forward_with_scores too
    gate = _Gate(32, 8)
    ref, par, _ = make_pair(ctx, dtype=BF, ep_group=_group([0, 1]), gate=gate)
    x, lg = _rank_batch(ctx, [5, 3], 32, 8, BF, ctx.rank)
    for mode in MODES:
        _set_mode(par, mode)
        for i, name in enumerate(_bad_inputs(x, lg)):
            bad = ({1}, {0}, {0, 1})[i % 3]
            _round(ctx, ref, par, gate, x, lg, bad, name, f"{mode} bad {sorted(bad)}", "EP")
    _set_mode(par, "all_to_all")
    _round(ctx, ref, par, gate, x, lg, {1}, "NaN router logits", "forward_with_scores all_to_all", "EP",
           method="forward_with_scores")


@check(2)
def ep_executor_and_hash_failures(ctx):
    # failures inside the executor and the router before the dispatch: weights not loaded on one rank, hash input_ids
    # outside the table, and a direct executor call with a physical id out of range (raised while the layout is made)
    group = _group([0, 1])
    kw = dict(params_dtype=BF, device=ctx.device, backend=ctx.experts_backend)
    ref, par, args = make_pair(ctx, dtype=BF, ep_group=group)
    x, lg = _rank_batch(ctx, [5, 3], 32, 8, BF, ctx.rank)
    late = moekit.FusedMoE(8, 2, 32, 16, ep_group=group, **kw)
    if ctx.rank == 0:
        late.load_expert_weights(*args)
    err, took = _outcome(lambda: late(x, lg))
    if ctx.rank == 1:
        ctx.expect(type(err) is RuntimeError and "load" in str(err), f"unloaded: {type(err).__name__}: {err}")
        ctx.expect(took < FAST_S, f"unloaded: {took:.1f} s")
        late.load_expert_weights(*args)
    else:
        _expect_agreed(ctx, "unloaded", err, took, None, ["EP rank 1", "RuntimeError", "before the dispatch"])
    ctx.expect_close(late(x, lg), ref(x, lg), "after the late load", exact=False)
    # review: a layer built on meta and never materialised on rank 1 (its flag went to a meta tensor: a silent no-op
    # gather, the peer waited to the timeout); the flag now travels on the group's device
    ghost = moekit.FusedMoE(8, 2, 32, 16, ep_group=group, **dict(kw, device="meta" if ctx.rank == 1 else ctx.device))
    if ctx.rank == 0:
        ghost.load_expert_weights(*args)
    err, took = _outcome(lambda: ghost(x, lg))
    if ctx.rank == 1:
        ctx.expect(err is not None and took < FAST_S, f"meta: {err!r} in {took:.1f} s")
    else:
        _expect_agreed(ctx, "meta", err, took, None, ["EP rank 1", "before the dispatch"])
    # hash routing: rank 0's input_ids leave the table
    table = torch.randint(0, 8, (50, 2), generator=torch.Generator().manual_seed(5))
    href, hpar, _ = make_pair(ctx, dtype=BF, ep_group=group, hash_indices_table=table, scoring_func="sigmoid")
    ids = torch.randint(0, 50, (x.shape[0],), generator=torch.Generator().manual_seed(ctx.rank))
    for mode in ("all_to_all", "all_gather"):
        hpar.expert_executor.mode = mode
        bad_ids = ids.clone()
        bad_ids[0] = 50
        own = _outcome(lambda: href(x, lg, input_ids=bad_ids))[0] if ctx.rank == 0 else None
        err, took = _outcome(lambda: hpar(x, lg, input_ids=bad_ids if ctx.rank == 0 else ids))
        _expect_agreed(ctx, f"hash ids {mode}", err, took, own, ["EP rank 0", "ValueError"])
        ctx.expect_close(hpar(x, lg, input_ids=ids), href(x, lg, input_ids=ids), f"hash next {mode}",
                         exact=mode == "all_to_all")
    # the executor called directly: a physical id out of range on rank 1 (IndexError in the layout's owner lookup)
    ex = par.expert_executor
    w, i = ref.router.select_experts(x, lg)
    bad = i.clone()
    bad[0, 0] = 99
    err, took = _outcome(lambda: ex(x, w, bad if ctx.rank == 1 else i))
    if ctx.rank == 1:
        ctx.expect(type(err) is IndexError, f"direct call: {type(err).__name__}: {err}")
    else:
        _expect_agreed(ctx, "direct call", err, took, None, ["EP rank 1", "IndexError"])
    ctx.expect(ex._pending is None, f"the executor's guard stayed set: {ex._pending}")
    ctx.expect_close(par(x, lg), ref(x, lg), "after the direct call", exact=False)


@check(2)
def eplb_records_no_failed_forward(ctx):
    # with EPLB, a forward that raised on one rank records no load on any rank (the windows stay in step)
    ref, par, _ = make_pair(ctx, dtype=BF, ep_group=_group([0, 1]), enable_eplb=True, num_redundant_experts=2)
    state = par.router.eplb_state
    x, lg = _rank_batch(ctx, [5, 3], 32, 8, BF, ctx.rank)
    par(x, lg)
    before = (int(state.step), state.window_load().tolist())
    err, took = _outcome(lambda: par(x[:, :16] if ctx.rank == 1 else x, lg))
    ctx.expect(err is not None and took < FAST_S, f"the bad forward: {err!r} in {took:.1f} s")
    after = (int(state.step), state.window_load().tolist())
    ctx.expect(after == before, f"a failed forward was recorded: {before} -> {after}")
    ctx.expect_close(par(x, lg), ref(x, lg), "the next forward")
    ctx.expect(int(state.step) == before[0] + 1, f"step {int(state.step)} after the next forward")


# -- TP (with the token check: its gather is the first collective) -----------------------------------------------------
@check(2)
def tp_check_tokens_bad_rank(ctx):
    # TP with check_tp_tokens: the bad rank's flag rides the token-count gather; without the check a TP-only layer has
    # no flag-carrying collective (the documented limit: the all-reduce carries none)
    gate = _Gate(32, 8)
    ref, par, _ = make_pair(ctx, ep_group=None, tp_group=_group([0, 1]), gate=gate)
    ex = par.expert_executor
    ex.check_tp_tokens = True
    x, lg = _rank_batch(ctx, [6], 32, 8, torch.float32, 0)  # the TP ranks hold the same tokens
    for i, name in enumerate(_bad_inputs(x, lg)):
        if name == "dtype":  # the layer is float32: bf16 is the wrong dtype here
            continue
        _round(ctx, ref, par, gate, x, lg, ({1}, {0})[i % 2], name, "TP", "TP")
    err, took = _outcome(lambda: par(x.to(BF) if ctx.rank == 0 else x, lg))
    own = _outcome(lambda: ref(x.to(BF), lg))[0] if ctx.rank == 0 else None
    _expect_agreed(ctx, "TP dtype", err, took, own, ["TP rank 0", "TypeError", "before the TP token check"])
    ctx.expect_close(par(x, lg), ref(x, lg), "TP the next forward", atol=3e-5, rtol=3e-5)
    ex.check_tp_tokens = False
    ctx.expect(ex.first_collectives() == () and ex.forward_guard() is None, "TP without the check: no guard")


# -- W = 4: EP over 4 ranks, and a 2 x 2 grid ------------------------------------------------------------------------
@check(4)
def ep4_bad_ranks(ctx):
    # EP over 4 ranks (W > K: "auto" is all-to-all): one bad rank, then two, in both dispatchers
    gate = _Gate(32, 8)
    ref, par, _ = make_pair(ctx, dtype=BF, ep_group=_group([0, 1, 2, 3]), gate=gate)
    x, lg = _rank_batch(ctx, [4, 1, 3, 2], 32, 8, BF, ctx.rank)
    for mode in ("all_to_all", "all_gather"):
        _set_mode(par, mode)
        _round(ctx, ref, par, gate, x, lg, {2}, "hidden width", f"W=4 {mode}", "EP")
        _round(ctx, ref, par, gate, x, lg, {1, 3}, "NaN router logits", f"W=4 {mode}", "EP")


@check(4)
def grid_check_tp_tokens(ctx):
    # a 2 x 2 grid (rank = 2·ep_rank + tp_rank; TP {0,1} {2,3}, EP {0,2} {1,3}) with check_tp_tokens: rank 0 fails;
    # rank 1 hears at the TP gather and relays at its EP gather, so ranks 1, 2, 3 raise PeerFailed. Then the TP token
    # check fails in TP group {0,1} (ValueError on both): ranks 2, 3 hear it at their EP gathers
    ep_rank, tp_rank = divmod(ctx.rank, 2)
    groups = {n: _group(r) for n, r in (("tp0", [0, 1]), ("tp1", [2, 3]), ("ep0", [0, 2]), ("ep1", [1, 3]))}
    ref, par, _ = make_pair(ctx, bias=True, ep_group=groups[f"ep{tp_rank}"], tp_group=groups[f"tp{ep_rank}"])
    par.expert_executor.check_tp_tokens = True
    x, lg = _rank_batch(ctx, [5, 3], 32, 8, torch.float32, ep_rank)
    for mode in ("all_to_all", "all_gather"):
        par.expert_executor.mode = mode
        own = _outcome(lambda: ref(x[:, :16], lg))[0] if ctx.rank == 0 else None
        err, took = _outcome(lambda: par(x[:, :16] if ctx.rank == 0 else x, lg))
        parts = {1: ["TP rank 0", "ValueError"], 2: ["EP rank 0", "ValueError"], 3: ["EP rank 0", "PeerFailed"]}
        _expect_agreed(ctx, f"grid {mode} rank 0 bad", err, took, own, parts.get(ctx.rank, []))
        expect_rel_close(ctx, par(x, lg), ref(x, lg), f"grid {mode} the next forward", 1e-5)
        # TP group {0,1} fed different token counts (the check's own ValueError on both)
        xs, ls = (x[:4], lg[:4]) if ctx.rank == 1 else (x, lg)
        err, took = _outcome(lambda: par(xs, ls))
        if ep_rank == 0:
            ok = type(err) is ValueError and "different token counts" in str(err) and took < FAST_S
            ctx.expect(ok, f"grid {mode} TP mismatch: {type(err).__name__}: {err} ({took:.1f} s)")
        else:
            _expect_agreed(ctx, f"grid {mode} TP mismatch", err, took, None, ["EP rank 0", "ValueError"])
        expect_rel_close(ctx, par(x, lg), ref(x, lg), f"grid {mode} after the mismatch", 1e-5)
