"""Round 64 (run in spawned gloo ranks by dist_harness): fp16 slot outputs past fp16's range on the all-to-all path
came back inf where the weighted sum was finite; ``rebalance()`` with a bad argument on one rank, or different
``num_nodes`` per rank, waited for the process group's timeout; an int32 id >= E from a custom routing function (kernel
path) raised ``IndexError`` under EP where one process drops it as a dead slot.
"""

from __future__ import annotations

import os

import torch

import moekit
from moekit.parallel import PeerFailed
from dist_checks import experts_backend, registry

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()


@check(2)
def fp16_slot_outputs_past_fp16_range_stay_finite(ctx):
    # slot outputs ~128000 (past fp16's 65504), weights 0.5 each (renormalize=False): the sum ~58000 is in range
    E, K, H, I = 4, 2, 8, 8
    w13 = torch.zeros(E, 2 * I, H)
    w13[:, :, 0] = 20.0
    w2 = torch.zeros(E, H, I)
    w2[:, 0, :] = 25.0
    x = torch.zeros(2, H)
    x[:, 0] = 1.0
    lg = torch.zeros(2, E)
    lg[:, 0] = lg[:, 2] = 1.0  # experts 0 (rank 0) and 2 (rank 1): every token crosses ranks
    lg[1, 2] = 0.99
    kw = dict(params_dtype=torch.float16, backend="torch", renormalize=False, device=ctx.device)
    ref = moekit.FusedMoE(E, K, H, I, **kw)
    par = moekit.FusedMoE(E, K, H, I, **kw, ep_group=ctx.world_group)
    for layer in (ref, par):
        layer.load_expert_weights(w13.half().to(ctx.device), w2.half().to(ctx.device))
    x, lg = x.half().to(ctx.device), lg.to(ctx.device)
    with torch.no_grad():
        want = ref(x, lg)
        ctx.expect(bool(torch.isfinite(want).all()), f"single-process output finite: {want[:, 0].tolist()}")
        for mode in ("all_to_all", "all_gather"):
            par.expert_executor.mode = mode
            got = par(x, lg)
            ctx.expect(bool(torch.isfinite(got).all()), f"{mode}: finite, got {got[:, 0].tolist()}")
            ctx.expect_close(got, want, f"{mode} vs single process")


def _eplb_layer(ctx):
    E, K, H, I = 8, 2, 16, 8
    layer = moekit.FusedMoE(E, K, H, I, device=ctx.device, backend=ctx.experts_backend, ep_group=ctx.world_group,
                            enable_eplb=True, num_redundant_experts=2)
    g = torch.Generator().manual_seed(0)  # the same weights on every rank
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g).to(ctx.device),
                              torch.randn(E, H, I, generator=g).to(ctx.device))
    x = torch.randn(6, H, generator=g).to(ctx.device)
    lg = torch.randn(6, E, generator=g).to(ctx.device)
    with torch.no_grad():
        layer(x, lg)  # some load in the window
    return layer, x, lg


@check(2)
def rebalance_with_a_bad_argument_on_one_rank_fails_on_every_rank(ctx):
    layer, x, lg = _eplb_layer(ctx)
    try:
        layer.rebalance(num_nodes=3 if ctx.rank == 0 else 1)  # 3 does not divide W = 2: rank 0's own ValueError
        ctx.expect(False, "no error")
    except PeerFailed as err:
        ctx.expect(ctx.rank == 1 and "EP rank 0" in str(err) and "before anything moved" in str(err), f"{err}")
    except ValueError as err:
        ctx.expect(ctx.rank == 0 and "num_nodes" in str(err), f"rank 0's own error: {err}")
    out = layer.rebalance()  # the group is in step again
    ctx.expect(isinstance(out, dict), "a rebalance after the failure runs")


@check(2)
def rebalance_with_different_num_nodes_is_refused_on_every_rank(ctx):
    layer, x, lg = _eplb_layer(ctx)
    try:
        layer.rebalance(num_nodes=2 if ctx.rank == 0 else 1)  # both valid (W = 2), but the plans would differ
        ctx.expect(False, "no error")
    except ValueError as err:
        ctx.expect("same num_nodes on every EP rank" in str(err) and "rank 0: 2, rank 1: 1" in str(err), f"{err}")
    before = layer(x, lg)
    layer.rebalance(num_nodes=1)
    ctx.expect_close(layer(x, lg), before, "a rebalance with agreed arguments keeps the outputs", atol=1e-5,
                     rtol=1e-5)


@check(2)
def custom_route_ids_past_e_are_dead_slots_under_ep(ctx):
    # the kernel path (the reference one refuses such ids with ValueError): the Triton interpreter on CPU
    if ctx.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return
    E, K, H, I = 8, 2, 16, 8

    def route(hidden_states, gating_output, topk, renormalize):
        w, ids = torch.topk(gating_output.softmax(-1), topk)
        ids = ids.int()
        ids[0, 0] = E  # one id past the experts: a dead slot
        return w, ids

    kw = dict(device=ctx.device, backend="triton", custom_routing_function=route, renormalize=False)
    ref = moekit.FusedMoE(E, K, H, I, **kw)
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g).to(ctx.device), torch.randn(E, H, I, generator=g).to(ctx.device)
    x, lg = torch.randn(5, H, generator=g).to(ctx.device), torch.randn(5, E, generator=g).to(ctx.device)
    ref.load_expert_weights(w13, w2)
    for extra in ({}, {"enable_eplb": True, "num_redundant_experts": 2}):
        par = moekit.FusedMoE(E, K, H, I, **kw, ep_group=ctx.world_group, **extra)
        par.load_expert_weights(w13, w2)
        with torch.no_grad():
            ctx.expect_close(par(x, lg), ref(x, lg), f"EP {extra}", atol=1e-4, rtol=1e-4)
