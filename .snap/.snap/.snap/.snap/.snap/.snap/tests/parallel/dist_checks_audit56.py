"""Round 56 (run in spawned gloo ranks by dist_harness): a state dict of another rank's share of the experts (another
EP or TP rank, another placement strategy) has the same shapes as this rank's and loaded silently (a user trial: the
output's relative RMS error 1.4 against the single-process layer). Layers split over ranks now save their share
(``routed_experts.expert_shard``) and a load of another share raises ``ValueError`` before anything is copied; a state
dict without the key (saved before round 56) loads as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import moekit
from dist_checks import _rank_batch, experts_backend, make_pair, registry

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()
KEY = "routed_experts.expert_shard"


def _everyone(ctx, sd):
    """Every rank's state dict, by rank (CPU copies)."""
    out = [None] * ctx.world
    dist.all_gather_object(out, {k: v.cpu() for k, v in sd.items()}, group=ctx.world_group)
    return out


def _refused(ctx, layer, sd, needles, what):
    """``layer.load_state_dict(sd)`` raises ValueError naming ``needles`` and leaves the layer's weights unchanged."""
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer.load_state_dict(sd)
        ctx.expect(False, f"{what}: loaded without an error")
        return
    except ValueError as err:
        ctx.expect(all(n in str(err) for n in needles), f"{what}: message {err}")
    after = layer.state_dict()
    same = [torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before]  # (NaN: unset)
    ctx.expect(all(same), f"{what}: the layer changed")


@check(2)
def ep_state_dict_of_another_share_refused(ctx):
    # the edges: the other EP rank's state dict (same shapes), this rank's linear-placement state dict into a
    # round_robin layer; then this rank's own one loads and matches the single-process layer, and one without the
    # key (as saved before round 56) loads as before
    ref, par, _ = make_pair(ctx, ep_group=ctx.world_group)
    sd = par.state_dict()
    ctx.expect(sd[KEY].tolist() == [2, ctx.rank, 1, 0, *range(4 * ctx.rank, 4 * ctx.rank + 4)], f"saved {sd[KEY]}")
    every = _everyone(ctx, sd)
    other = 1 - ctx.rank
    kw = dict(params_dtype=torch.float32, device=ctx.device, backend=ctx.experts_backend, ep_group=ctx.world_group)
    fresh = moekit.FusedMoE(8, 2, 32, 16, **kw)
    _refused(ctx, fresh, every[other], [f"EP rank {other} of 2", f"this layer is EP rank {ctx.rank} of 2",
                                        "load each rank's own state dict"], "other EP rank")
    rr = moekit.FusedMoE(8, 2, 32, 16, **kw, expert_placement_strategy="round_robin")
    _refused(ctx, rr, every[ctx.rank], ["placement 'round_robin'"], "linear into round_robin")
    fresh.load_state_dict(every[ctx.rank])
    x, lg = _rank_batch(ctx, [5, 3], 32, 8, torch.float32, ctx.rank)
    ctx.expect_close(fresh(x, lg), ref(x, lg), "own state dict", atol=1e-5, rtol=1e-5)
    old = {k: v for k, v in every[other].items() if k != KEY}
    rr.load_state_dict(old)  # no key: taken as this rank's (the pre-round-56 behaviour)


@check(2)
def tp_state_dict_of_another_share_refused(ctx):
    # the edge: TP ranks hold equal-shaped slices of I; the other TP rank's state dict is refused, this rank's loads
    ref, par, _ = make_pair(ctx, tp_group=ctx.world_group)
    every = _everyone(ctx, par.state_dict())
    fresh = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, device=ctx.device,
                            backend=ctx.experts_backend, tp_group=ctx.world_group)
    _refused(ctx, fresh, every[1 - ctx.rank], [f"TP rank {1 - ctx.rank} of 2", f"TP rank {ctx.rank} of 2"],
             "other TP rank")
    fresh.load_state_dict(every[ctx.rank])
    x, lg = _rank_batch(ctx, [4, 4], 32, 8, torch.float32, 0)  # TP: the same tokens on every rank
    ctx.expect_close(fresh(x, lg), ref(x, lg), "own TP state dict", atol=1e-5, rtol=1e-5)
