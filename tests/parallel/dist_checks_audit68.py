"""Round 68 (run in spawned gloo ranks by dist_harness): an EPLB layer built under ``torch.inference_mode()``. Its
EPLB buffers are normal tensors now (a compiled forward outside inference mode failed on the in-place load record);
its weights are still inference tensors, which a rebalance's moves must update inside inference mode."""

from __future__ import annotations

import torch

from dist_checks import _rank_batch, experts_backend, make_pair, registry

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()
E = 8


@check(2)
def eplb_built_under_inference_mode_rebalances_outside_it(ctx):
    kw = dict(ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=ctx.world)
    with torch.inference_mode():
        ref, par, _ = make_pair(ctx, dtype=torch.float32, **kw)
    ctx.expect(par.routed_experts.w13_weight.is_inference(), "weights made under inference mode")
    ctx.expect(not par.router.eplb_state.step.is_inference(), "EPLB buffers are normal tensors")
    skew = torch.zeros(E)
    skew[[2, 3]] = torch.tensor([4.0, 3.0])  # hot experts the initial placement serves badly (both on rank 0)
    x, lg = _rank_batch(ctx, [12, 7], 32, E, torch.float32, ctx.rank, skew=skew)
    with torch.no_grad():
        for _ in range(2):
            want = ref(x, lg)
            ctx.expect_close(par(x, lg), want, "before the rebalance")
    stats = par.rebalance()  # outside inference mode: the moves write inference-tensor weights
    ctx.expect(stats["moved_slots"] > 0, "rebalance moved nothing")
    with torch.no_grad():
        ctx.expect_close(par(x, lg), want, "after the rebalance")
        compiled = torch.compile(par, backend="eager")  # (outside inference mode: the in-place record)
        ctx.expect_close(compiled(x, lg), want, "compiled, after the rebalance")
    ctx.expect(int(par.router.eplb_state.step) == 4, f"window step {int(par.router.eplb_state.step)}")
