"""Round 66 (run in spawned gloo ranks by dist_harness): a state dict held in memory across a later ``rebalance()``
paired the weights (the live tensors, moved in place) with the placement of its save, or with none when it was taken
at the initial placement, and loaded into a fresh layer silently wrong (max error 0.17 and 9.0 on the layer's output).
"""

from __future__ import annotations

import torch

import moekit
from dist_checks import experts_backend, global_weights, registry

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()


@check(2)
def a_state_dict_held_across_a_rebalance_loads_the_layer_as_it_is_now(ctx):
    E, K, H, I, R = 4, 2, 16, 8, 2
    w13, w2, _, _ = global_weights(E, H, I, seed=0)
    kw = dict(backend="torch", ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=R, device=ctx.device)
    ref = moekit.FusedMoE(E, K, H, I, backend="torch", device=ctx.device)
    par = moekit.FusedMoE(E, K, H, I, **kw)
    for layer in (ref, par):
        layer.load_expert_weights(w13.to(ctx.device), w2.to(ctx.device))
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(ctx.rank)).to(ctx.device)
    before = par.state_dict()  # at the initial placement (it carried no placement)
    held, moved = None, []
    for hot in (3, 0, 1):
        lg = torch.randn(16, E, generator=torch.Generator().manual_seed(10 + ctx.rank))
        lg[:, hot] += 4
        with torch.no_grad():
            par(x.to(ctx.device), lg.to(ctx.device))
        moved.append(par.rebalance(reset_window=True)["moved_slots"])
        held = held if held is not None else par.state_dict()  # after the first rebalance, held across the others
    ctx.expect(sum(moved[1:]) > 0, f"the later rebalances moved no slot ({moved}): the check would prove nothing")
    lg = torch.randn(16, E, generator=torch.Generator().manual_seed(99 + ctx.rank)).to(ctx.device)
    with torch.no_grad():
        want = ref(x, lg)
        for name, sd in (("held", held), ("before", before)):
            fresh = moekit.FusedMoE(E, K, H, I, **kw)
            fresh.load_state_dict(sd)
            got = fresh(x, lg)
            ctx.expect(fresh.routed_experts.placement == par.routed_experts.placement,
                       f"{name}: placement {fresh.routed_experts.placement.physical_to_logical}, the layer's "
                       f"{par.routed_experts.placement.physical_to_logical}")
            ctx.expect(torch.allclose(got, want, atol=1e-5, rtol=1e-5),
                       f"{name}: max |out - ref| = {(got - want).abs().max().item():.3g}")


@check(2)
def tp_token_check_sees_different_tokens_of_one_count(ctx):
    # with check_tp_tokens, TP ranks fed as many tokens but different ones (or the same tokens with different router
    # logits) passed the check, which compared the counts only, and returned wrong outputs (17.4 and 39.8 off)
    from dist_checks import make_pair
    ref, par, _ = make_pair(ctx, tp_group=ctx.world_group)
    par.expert_executor.check_tp_tokens = True
    g = torch.Generator().manual_seed(5)
    x, lg = torch.randn(3, 32, generator=g), torch.randn(3, 8, generator=g)
    mine = torch.randn(3, 32, generator=torch.Generator().manual_seed(100 + ctx.rank))
    for what, (xi, li) in {"tokens": (mine, lg), "router logits": (x, lg + ctx.rank * torch.arange(8.0))}.items():
        try:
            par(xi.to(ctx.device), li.to(ctx.device))
            ctx.expect(False, f"different {what} of one count were accepted")
        except ValueError as err:
            ctx.expect("fed 3 tokens each, but different ones or routed differently (TP ranks [1]" in str(err),
                       f"{what}: message {err}")
    with torch.no_grad():  # the same tokens pass, and the layer is right
        got, want = par(x.to(ctx.device), lg.to(ctx.device)), ref(x.to(ctx.device), lg.to(ctx.device))
    ctx.expect(torch.allclose(got, want, atol=2e-5), f"same tokens: max diff {(got - want).abs().max().item():.3g}")
    empty = torch.zeros(0, 32, device=ctx.device)
    ctx.expect(par(empty, torch.zeros(0, 8, device=ctx.device)).shape == (0, 32), "T = 0 passes the check")
