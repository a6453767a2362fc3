"""Round 62 (run in spawned gloo ranks by dist_harness): executor settings set on one EP rank only (``chunk_tokens``,
``mode``, ``all_gather_min_tokens``) hung the forward (the ranks ran different collectives). They travel in the layout
gather now, and every rank raises ``ValueError`` naming each rank's values; set alike again, the layer runs and
matches the single-process layer.
"""

from __future__ import annotations

import torch

from dist_checks import _rank_batch, experts_backend, make_pair, registry

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()


def _differing(ctx, knob, value, said, mode="all_to_all"):
    ref, par, _ = make_pair(ctx, ep_group=ctx.world_group)
    ex = par.expert_executor
    ex.mode = mode
    if ctx.rank == 0:
        setattr(ex, knob, value)
    x, lg = _rank_batch(ctx, [5, 3], 32, 8, torch.float32, ctx.rank)
    try:
        with torch.no_grad():
            par(x, lg)
        ctx.expect(False, f"{knob} on rank 0 only: no error")
    except ValueError as err:
        ctx.expect("different executor settings" in str(err) and said in str(err), f"message {err}")
    if ctx.rank:  # alike again: rank 1 takes rank 0's value
        setattr(ex, knob, value)
    with torch.no_grad():
        ctx.expect_close(par(x, lg), ref(x, lg), f"{knob} alike", atol=1e-5, rtol=1e-5)


@check(2)
def chunk_tokens_on_one_rank_refused(ctx):
    _differing(ctx, "chunk_tokens", 2, "chunk_tokens [2, 8192]")


@check(2)
def mode_on_one_rank_refused(ctx):
    _differing(ctx, "mode", "all_gather", "mode [")


@check(2)
def all_gather_min_tokens_on_one_rank_refused(ctx):
    # (read by "auto" alone: under a forced mode the knob does nothing and is not compared)
    _differing(ctx, "all_gather_min_tokens", 3, "all_gather_min_tokens [3, -1]", mode="auto")
