"""Distributed checks (run inside spawned ranks by dist_harness): every parallel layer is compared with
the single-process layer built from the same global weights and fed the same tokens."""

from __future__ import annotations

import importlib
import os

import torch

import moekit

def registry():
    """(checks by name, world sizes by name, the ``@check(*worlds)`` decorator filling both)."""
    checks: dict = {}
    world: dict[str, tuple[int, ...]] = {}

    def check(*worlds):
        def deco(fn):
            checks[fn.__name__] = fn
            world[fn.__name__] = worlds
            return fn

        return deco

    return checks, world, check


CHECKS, WORLD, check = registry()


def experts_backend(device: torch.device) -> str:
    """torch on CPU; on CUDA "auto" (Triton) when the Triton experts exist, else torch.
    ``MOEKIT_TEST_EXPERTS_BACKEND`` (torch|triton|auto) overrides, for runs of the suite on GPUs."""
    forced = os.environ.get("MOEKIT_TEST_EXPERTS_BACKEND")
    if forced:
        return forced
    if device.type != "cuda":
        return "torch"
    try:
        importlib.import_module("moekit.ops.triton_experts")
    except Exception:
        return "torch"
    return "auto"


def global_weights(e, h, i, *, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * i if gated else i
    w13 = torch.randn(e, rows, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    b13 = torch.randn(e, rows, generator=g) * 0.1 if bias else None
    b2 = torch.randn(e, h, generator=g) * 0.1 if bias else None
    return w13, w2, b13, b2


def make_pair(ctx, *, E=8, K=2, H=32, I=16, dtype=torch.float32, bias=False, activation="silu", seed=0, **par_kw):
    """(reference single-process layer, parallel layer) loaded with the same global weights."""
    common = {k: par_kw.pop(k) for k in list(par_kw) if k not in ("ep_group", "tp_group", "expert_placement_strategy",
                                                                    "enable_eplb", "num_redundant_experts")}
    kw = dict(params_dtype=dtype, has_bias=bias, activation=activation, device=ctx.device, backend=ctx.experts_backend)
    ref = moekit.FusedMoE(E, K, H, I, **kw, **common)
    par = moekit.FusedMoE(E, K, H, I, **kw, **common, **par_kw)
    w13, w2, b13, b2 = global_weights(E, H, I, gated=activation != "relu2", bias=bias, seed=seed)
    args = [t.to(ctx.device, dtype) if t is not None else None for t in (w13, w2, b13, b2)]
    ref.load_expert_weights(*args)
    par.load_expert_weights(*args)
    return ref, par, args


def rel_rms(got, want) -> float:
    """Relative RMS error of the whole output (0 for an empty one)."""
    if not want.numel():
        return 0.0
    err, ref = got.float() - want.float(), want.float()
    return (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def expect_rel_close(ctx, got, want, what, tol):
    """SPEC §8: same shape and dtype, relative RMS of the whole output within ``tol`` (sum orders differ)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        ctx.expect(False, f"{what}: {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}")
        return
    err = rel_rms(got, want)
    ctx.expect(err <= tol, f"{what}: relative RMS {err:.2e} > {tol:g}")


def tokens(ctx, counts, H, columns, dtype, seed=1, skew=None):
    """This rank's slice of per-EP-rank token batches: (x [T, H], logits [T, columns])."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, H, generator=g) for n in counts]
    ls = [torch.randn(n, columns, generator=g) for n in counts]
    if skew is not None:
        ls = [lg + skew for lg in ls]
    return xs, ls


def _rank_batch(ctx, counts, H, columns, dtype, ep_rank, seed=1, skew=None):
    xs, ls = tokens(ctx, counts, H, columns, dtype, seed, skew)
    return xs[ep_rank].to(ctx.device, dtype), ls[ep_rank].to(ctx.device)


def exact_for(ctx, dtype) -> bool:
    """Bit-exactness is expected of the all-to-all path when the expert GEMM is batch-invariant: the
    torch reference on CPU in bf16 (fp32 CPU GEMMs take another path below 4 rows; fp16 ones run in fp32 since
    round 49, whose fp16 products overflowed: SPEC §9 asks the torch path to agree within tolerance). Of the
    all-to-all path only: ``"auto"`` takes the all-gather path when W <= K, exact only on tokens not split over
    ranks (round 50: the EPLB test passed so by construction; ``dist_checks_eplb``)."""
    return ctx.exact and ctx.experts_backend == "torch" and dtype == torch.bfloat16


def _compare_modes(ctx, ref, par, x, lg, what, modes=("all_to_all", "all_gather", "auto"), exact_a2a=None, **tol):
    want = ref(x, lg)
    for mode in modes:
        par.expert_executor.mode = mode
        got = par(x, lg)
        exact = (exact_for(ctx, x.dtype) if exact_a2a is None else exact_a2a) and mode == "all_to_all"
        ctx.expect_close(got, want, f"{what} mode={mode}", exact=exact, **tol)
    par.expert_executor.mode = "auto"


# ---------------------------------------------------------------------------------------------
@check(2, 4)
def ep_linear(ctx):
    for dtype in (torch.float32, torch.bfloat16):
        ref, par, _ = make_pair(ctx, dtype=dtype, ep_group=ctx.world_group)
        for counts in ([7, 0, 3, 5][: ctx.world], [5, 3, 0, 1][: ctx.world], [0] * ctx.world):
            x, lg = _rank_batch(ctx, counts, 32, 8, dtype, ctx.rank)
            _compare_modes(ctx, ref, par, x, lg, f"{dtype} tokens {counts}")
    ctx.expect(par.routed_experts.w13_weight.shape[0] == 8 // ctx.world, "E_local = E / W")


@check(2, 4)
def ep_round_robin_bias_bf16(ctx):
    ref, par, args = make_pair(ctx, dtype=torch.bfloat16, bias=True, ep_group=ctx.world_group,
                               expert_placement_strategy="round_robin")
    held = par.routed_experts.placement.local_ids
    ctx.expect(held == tuple(range(ctx.rank, 8, ctx.world)), f"round-robin ids {held}")
    ctx.expect(torch.equal(par.routed_experts.w2_weight[0], args[1][ctx.rank]), "round-robin slot 0 weights")
    counts = [9, 2, 0, 4][: ctx.world]
    x, lg = _rank_batch(ctx, counts, 32, 8, torch.bfloat16, ctx.rank)
    _compare_modes(ctx, ref, par, x, lg, "bf16 bias round_robin")


@check(2)
def ep_auto_switch_and_chunks(ctx):
    ref, par, _ = make_pair(ctx, ep_group=ctx.world_group)
    ex = par.expert_executor
    x, lg = _rank_batch(ctx, [2, 1], 32, 8, torch.float32, ctx.rank)
    par(x, lg)  # default policy: W (2) <= K (2) -> all-gather at any size
    ctx.expect(ex.last_mode == "all_gather", f"default auto chose {ex.last_mode} with W <= K")
    ctx.expect(ex.choose(1, top_k=1) == "all_to_all" and ex.choose(1024, top_k=1) == "all_gather", "W > K policy")
    ex.all_gather_min_tokens = 4
    for counts, mode in (([5, 2], "all_gather"), ([2, 3], "all_to_all")):
        x, lg = _rank_batch(ctx, counts, 32, 8, torch.float32, ctx.rank)
        got = par(x, lg)
        ctx.expect(ex.last_mode == mode, f"auto chose {ex.last_mode} for {counts}, expected {mode}")
        ctx.expect_close(got, ref(x, lg), f"auto {counts}")
    ex.all_gather_min_tokens = 1 << 30
    ex.chunk_tokens = 3
    x, lg = _rank_batch(ctx, [8, 1], 32, 8, torch.float32, ctx.rank)
    ctx.expect_close(par(x, lg), ref(x, lg), "chunked (3 tokens)")
    x3 = x[: (x.shape[0] // 2) * 2].view(-1, 2, 32)
    lg3 = lg[: x3.shape[0] * 2]
    ctx.expect_close(par(x3, lg3), ref(x3, lg3), "chunked 3-D input")


@check(2)
def ep_deepseek_grouped(ctx):
    bias = torch.linspace(-0.5, 0.5, 16).to(ctx.device)
    ref, par, _ = make_pair(ctx, E=16, K=4, use_grouped_topk=True, num_expert_group=4, topk_group=2,
                            scoring_func="sigmoid", e_score_correction_bias=bias, routed_scaling_factor=2.5,
                            ep_group=ctx.world_group)
    x, lg = _rank_batch(ctx, [6, 11], 32, 16, torch.float32, ctx.rank)
    _compare_modes(ctx, ref, par, x, lg, "grouped sigmoid + bias")


def _llama4_routing(hidden_states, gating_output, topk, renormalize):
    w, ids = torch.topk(gating_output.float(), topk, dim=-1)
    return torch.sigmoid(w), ids.to(torch.int32)


@check(2)
def ep_weight_on_input(ctx):
    ref, par, _ = make_pair(ctx, K=1, custom_routing_function=_llama4_routing, apply_router_weight_on_input=True,
                            renormalize=False, ep_group=ctx.world_group)
    x, lg = _rank_batch(ctx, [4, 7], 32, 8, torch.float32, ctx.rank)
    _compare_modes(ctx, ref, par, x, lg, "router weight on input")


@check(2)
def ep_zero_experts(ctx):
    bias = torch.zeros(10).to(ctx.device)
    ref, par, _ = make_pair(ctx, K=3, zero_expert_type="identity", e_score_correction_bias=bias,
                            renormalize=False, ep_group=ctx.world_group)
    x, lg = _rank_batch(ctx, [5, 6], 32, 10, torch.float32, ctx.rank)
    _compare_modes(ctx, ref, par, x, lg, "zero experts")


@check(2, 4)
def tp_only(ctx):
    ref, par, _ = make_pair(ctx, bias=True, activation="gelu", tp_group=ctx.world_group)
    re = par.routed_experts
    ctx.expect(re.w2_weight.shape[-1] == 16 // ctx.world, f"I_local {re.w2_weight.shape}")
    ctx.expect(re.add_w2_bias == (ctx.rank == 0), "w2 bias on TP rank 0 only")
    x, lg = _rank_batch(ctx, [6], 32, 8, torch.float32, 0)  # every TP rank holds the same tokens
    ctx.expect_close(par(x, lg), ref(x, lg), "TP", atol=2e-5)
    x, lg = _rank_batch(ctx, [0], 32, 8, torch.float32, 0)
    ctx.expect_close(par(x, lg), ref(x, lg), "TP zero tokens")


@check(2, 4)
def tp_token_mismatch_detected(ctx):
    # issue #12: TP ranks fed different token counts; with check_tp_tokens every rank raises the same
    # ValueError (before any other collective) instead of aborting inside gloo; equal counts pass
    _, par, _ = make_pair(ctx, tp_group=ctx.world_group)
    ex = par.expert_executor
    ctx.expect(ex.check_tp_tokens is False, "check_tp_tokens is off by default")
    ex.check_tp_tokens = True
    x, lg = _rank_batch(ctx, [4 + ctx.rank], 32, 8, torch.float32, 0)
    try:
        par(x, lg)
        ctx.expect(False, "different token counts were accepted")
    except ValueError as e:
        counts = str([4 + r for r in range(ctx.world)])
        ctx.expect(counts in str(e) and "same tokens" in str(e), f"message: {e}")
    x, lg = _rank_batch(ctx, [6], 32, 8, torch.float32, 0)
    ctx.expect(par(x, lg).shape == x.shape, "equal counts pass the check")


@check(4)
def ep2_tp2(ctx):
    ep_rank, tp_rank = divmod(ctx.rank, 2)
    ep, tp = ctx.groups[f"ep{tp_rank}"], ctx.groups[f"tp{ep_rank}"]
    for strategy in ("linear", "round_robin"):
        ref, par, _ = make_pair(ctx, bias=True, ep_group=ep, tp_group=tp, expert_placement_strategy=strategy)
        p = par.routed_experts.placement
        ctx.expect((p.ep_rank, p.ep_size, p.tp_rank, p.tp_size) == (ep_rank, 2, tp_rank, 2), f"placement {p}")
        for counts in ([5, 0], [3, 8]):
            x, lg = _rank_batch(ctx, counts, 32, 8, torch.float32, ep_rank)
            _compare_modes(ctx, ref, par, x, lg, f"EPxTP {strategy} {counts}", exact_a2a=False, atol=2e-5)


@check(2, 4)
def eplb_redundant(ctx):
    r = ctx.world  # one replica per rank
    ref, par, args = make_pair(ctx, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=r)
    p = par.routed_experts.placement
    ctx.expect(p.num_local == (8 + r) // ctx.world, f"local slots {p.num_local}")
    for slot, logical in enumerate(p.local_logical_ids()):
        ctx.expect(torch.equal(par.routed_experts.w13_weight[slot], args[0][logical]), f"slot {slot} weights")
    x, lg = _rank_batch(ctx, [9, 0, 4, 2][: ctx.world], 32, 8, torch.float32, ctx.rank)
    _compare_modes(ctx, ref, par, x, lg, "redundant experts")


def _check_slots(ctx, par, args, what):
    re = par.routed_experts
    rows = re.tp_rows
    for slot, logical in enumerate(re.placement.local_logical_ids()):
        ctx.expect(torch.equal(re.w2_weight[slot], args[1][logical][:, rows]),
                   f"{what}: slot {slot} != expert {logical}")


@check(2, 4)
def invalid_sizes(ctx):
    g = ctx.world_group
    cases = [
        (dict(num_experts=7, ep_group=g), "divisible"),
        (dict(num_experts=8, ep_group=g, enable_eplb=True, num_redundant_experts=1), "divisible"),
        (dict(num_experts=8, intermediate_size=15 if ctx.world == 2 else 14, tp_group=g), "divisible"),
        (dict(num_experts=8, tp_group=g, tp_size=ctx.world * 2), "tp_size"),
        (dict(num_experts=8, ep_group=g, expert_placement_strategy="striped"), "expert_placement_strategy"),
        (dict(num_experts=8, enable_eplb=True, num_redundant_experts=2), "num_redundant_experts"),
        (dict(num_experts=8, ep_group=g, enable_eplb=True, num_redundant_experts=8 * ctx.world), "replica"),
    ]
    for kw, needle in cases:
        args = dict(top_k=2, hidden_size=32, intermediate_size=16, device=ctx.device, backend=ctx.experts_backend)
        args.update(kw)
        try:
            moekit.FusedMoE(**args)
            ctx.expect(False, f"{kw} was accepted")
        except ValueError as e:
            ctx.expect(needle in str(e), f"{kw}: message {e!s} lacks {needle!r}")
    try:
        moekit.FusedMoE(8, 2, 32, 16, ep_group=g, tp_group=g, device=ctx.device)
        ctx.expect(False, "the same group for EP and TP was accepted")
    except ValueError as e:
        ctx.expect("meet only in this rank" in str(e), f"EP/TP overlap message: {e}")
    try:
        moekit.FusedMoE(8, 2, 32, 16, ep_group="world", device=ctx.device)
        ctx.expect(False, "a string ep_group was accepted")
    except TypeError:
        pass
    _, par, _ = make_pair(ctx, ep_group=g)
    try:
        par.expert_executor.mode = "nvshmem"
        ctx.expect(False, "mode 'nvshmem' accepted")
    except ValueError:
        pass


@check(2, 4)
def ranks_built_alike(ctx):
    # round 48's audit: ranks of one group built with different settings (placement strategy, top_k) were accepted
    # and gave wrong outputs or failed inside gloo; a process outside the group got "TypeError: ... got int". Every
    # rank now raises the same ValueError at construction
    import torch.distributed as dist

    g = ctx.world_group
    for kw, needle in ((dict(expert_placement_strategy="linear" if ctx.rank == 0 else "round_robin"),
                        "'expert_placement_strategy': ['linear', 'round_robin'"),
                       (dict(top_k=2 + (ctx.rank == 1)), "'top_k': [2, 3")):
        args = dict(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, device=ctx.device,
                    backend=ctx.experts_backend, ep_group=g)
        args.update(kw)
        try:
            moekit.FusedMoE(**args)
            ctx.expect(False, f"{kw} differing between ranks was accepted")
        except ValueError as e:
            ctx.expect(needle in str(e) and "built with different settings" in str(e), f"{kw}: message {e}")
    outside = dist.new_group([0])  # every rank calls new_group; rank >= 1 gets GroupMember.NON_GROUP_MEMBER
    try:
        moekit.FusedMoE(8, 2, 32, 16, ep_group=outside, device=ctx.device, backend=ctx.experts_backend)
        ctx.expect(ctx.rank == 0, "a rank outside ep_group was accepted")
    except ValueError as e:
        ctx.expect(ctx.rank != 0 and "not a member of ep_group" in str(e), f"non-member message: {e}")


@check(4)
def ep_groups_across_tp_ranks_refused(ctx):
    # EP groups {0, 3}, {1, 2} over TP groups {0, 2}, {1, 3}: each EP group meets each TP group in one rank (the
    # check that existed) but its ranks hold different slices of I; outputs were wrong, silently (round 48's audit)
    import torch.distributed as dist

    tps, eps = [dist.new_group([0, 2]), dist.new_group([1, 3])], [dist.new_group([0, 3]), dist.new_group([1, 2])]
    tp, ep = tps[ctx.rank % 2], eps[0 if ctx.rank in (0, 3) else 1]
    try:
        moekit.FusedMoE(8, 2, 32, 16, ep_group=ep, tp_group=tp, device=ctx.device, backend=ctx.experts_backend)
        ctx.expect(False, "EP peers of different tp_rank were accepted")
    except ValueError as e:
        ctx.expect("'tp_rank': [0, 1]" in str(e) and "same tensor-parallel slice" in str(e), f"message: {e}")


@check(4)
def ep2_tp2_eplb(ctx):
    ep_rank, tp_rank = divmod(ctx.rank, 2)
    ep, tp = ctx.groups[f"ep{tp_rank}"], ctx.groups[f"tp{ep_rank}"]
    ref, par, args = make_pair(ctx, bias=True, ep_group=ep, tp_group=tp, enable_eplb=True, num_redundant_experts=2)
    skew = torch.zeros(8)
    skew[[1, 2]] = 4.0  # both on EP rank 0 initially
    x, lg = _rank_batch(ctx, [10, 3], 32, 8, torch.float32, ep_rank, skew=skew)
    before = par(x, lg)
    stats = par.rebalance()
    ctx.expect(stats["imbalance_after"] < stats["imbalance_before"], f"EPxTP imbalance {stats}")
    _check_slots(ctx, par, args, "EPxTP after rebalance")
    ctx.expect_close(par(x, lg), before, "EPxTP output unchanged by rebalance", atol=1e-6)
    ctx.expect_close(par(x, lg), ref(x, lg), "EPxTP rebalanced vs reference", atol=2e-5)


@check(2)
def ep_odd_hidden_fp16(ctx):
    ref, par, _ = make_pair(ctx, H=33, dtype=torch.float16, ep_group=ctx.world_group)
    for counts in ([3, 0], [1, 0], [0, 2]):
        x, lg = _rank_batch(ctx, counts, 33, 8, torch.float16, ctx.rank)
        _compare_modes(ctx, ref, par, x, lg, f"H=33 fp16 {counts}")


@check(2)
def tp_gpt_oss_and_relu2(ctx):
    """TP slicing of gated biases with the clamped gpt-oss activation, and of the non-gated relu2."""
    for act, limit in (("swigluoai", 7.0), ("relu2", None)):
        ref, par, _ = make_pair(ctx, bias=True, activation=act, swiglu_limit=limit, tp_group=ctx.world_group,
                                ep_group=None)
        x, lg = _rank_batch(ctx, [9], 32, 8, torch.float32, 0)
        ctx.expect_close(par(x, lg), ref(x, lg), f"TP {act}", atol=2e-5)


@check(2)
def ep_hash_routing_eplb(ctx):
    """Hash routing (ids from a table by input_ids) with EP and redundant replicas."""
    table = torch.randint(0, 8, (50, 2), generator=torch.Generator().manual_seed(5)).to(ctx.device)
    ref, par, _ = make_pair(ctx, hash_indices_table=table, scoring_func="sigmoid",
                            ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2)
    x, lg = _rank_batch(ctx, [6, 4], 32, 8, torch.float32, ctx.rank)
    tok = torch.randint(0, 50, (x.shape[0],), generator=torch.Generator().manual_seed(6 + ctx.rank)).to(ctx.device)
    want = ref(x, lg, input_ids=tok)
    for mode in ("all_to_all", "all_gather"):
        par.expert_executor.mode = mode
        ctx.expect_close(par(x, lg, input_ids=tok), want, f"hash routing {mode}")
