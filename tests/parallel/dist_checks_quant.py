"""Distributed checks of quantised layers (run in spawned gloo ranks by dist_harness): tensor-parallel
slices on block boundaries, EP placement and an EPLB rebalance that moves scales with the weights; each
parallel layer is compared with the single-process layer quantised from the same global weights."""

from __future__ import annotations

import torch

import moekit
from dist_checks import _rank_batch, experts_backend, global_weights, registry  # noqa: F401  (the harness reads experts_backend)

CHECKS, WORLD, check = registry()
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
INT4 = moekit.Int4GroupFormat(32)


def _pair(ctx, quant, *, E=8, H=64, I=128, bias=False, **par_kw):
    kw = dict(params_dtype=torch.float32, has_bias=bias, device=ctx.device, backend="torch", quant_config=quant)
    ref = moekit.FusedMoE(E, 2, H, I, **kw)
    par = moekit.FusedMoE(E, 2, H, I, **kw, **par_kw)
    w13, w2, b13, b2 = global_weights(E, H, I, bias=bias, seed=3)
    q = moekit.quantize_experts(w13, w2, quant)
    for layer in (ref, par):
        layer.load_expert_weights(q[0], q[1], b13, b2, w13_scale=q[2], w2_scale=q[3])
    return ref, par, q


def _close(ctx, got, want, what, tol=5e-3):
    """SPEC §8 torch-path fp8 tolerance: relative RMS of the whole output (sum orders differ)."""
    if got.shape != want.shape or not got.numel():
        ctx.expect(got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}")
        return
    rms = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12)).item()
    ctx.expect(rms <= tol, f"{what}: relative RMS {rms:.2e} > {tol}")


@check(2)
def tp_quant_block_boundaries(ctx):
    for quant in (FP8, INT4):
        ref, par, q = _pair(ctx, quant, bias=True, tp_group=ctx.world_group)
        re = par.routed_experts
        n = 64 // 16  # fp8: this rank's block rows of each shard
        if re.quant.name == "fp8_block":
            r = slice(ctx.rank * n, (ctx.rank + 1) * n)
            want = torch.cat([q[2][:, :8][:, r], q[2][:, 8:][:, r]], dim=1)
            ctx.expect(torch.equal(re.w13_scale, want), "fp8 w13_scale rows of this TP slice")
            ctx.expect(torch.equal(re.w2_scale, q[3][..., r]), "fp8 w2_scale columns of this TP slice")
        x, lg = _rank_batch(ctx, [9], 64, 8, torch.float32, 0)
        _close(ctx, par(x, lg), ref(x, lg), f"TP {re.quant.name}")
    for quant, inter in ((FP8, 48), (INT4, 96)):  # slices of 24 / 48 cross a 16-block / 32-group
        try:
            moekit.FusedMoE(8, 2, 64, inter, quant_config=quant, tp_group=ctx.world_group, backend="torch")
            ctx.expect(False, f"TP slice of I={inter} accepted for {quant}")
        except ValueError as err:
            ctx.expect("boundaries" in str(err), f"error names the boundaries: {err}")


@check(2)
def ep_quant_placement(ctx):
    for quant in (FP8, INT4):
        for strategy in ("linear", "round_robin"):
            ref, par, q = _pair(ctx, quant, ep_group=ctx.world_group, expert_placement_strategy=strategy)
            re = par.routed_experts
            for slot, logical in enumerate(re.placement.local_logical_ids()):
                ctx.expect(torch.equal(re.w2_scale[slot], q[3][logical]), f"{strategy} slot {slot} scale")
            for counts in ([7, 3], [0, 5]):
                x, lg = _rank_batch(ctx, counts, 64, 8, torch.float32, ctx.rank)
                for mode in ("all_to_all", "all_gather"):
                    par.expert_executor.mode = mode
                    _close(ctx, par(x, lg), ref(x, lg), f"EP {re.quant.name} {strategy} {counts} {mode}")


@check(2)
def eplb_rebalance_moves_scales(ctx):
    for quant in (FP8, INT4):
        ref, par, q = _pair(ctx, quant, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2)
        skew = torch.zeros(8)
        skew[[1, 2]] = 4.0  # both on EP rank 0 initially
        x, lg = _rank_batch(ctx, [12, 5], 64, 8, torch.float32, ctx.rank, skew=skew)
        before = par(x, lg)
        stats = par.rebalance()
        ctx.expect(stats["moved_slots"] > 0, f"{quant}: rebalance moved nothing")
        re = par.routed_experts
        for slot, logical in enumerate(re.placement.local_logical_ids()):
            for name, full in (("w13_weight", q[0]), ("w13_scale", q[2]), ("w2_weight", q[1]), ("w2_scale", q[3])):
                got = re.expert_tensors()[name][slot]
                same = torch.equal(got.view(torch.uint8), full[logical].view(torch.uint8)) if got.dtype.itemsize == 1 \
                    else torch.equal(got, full[logical])
                ctx.expect(same, f"{quant}: slot {slot} {name} != expert {logical} after rebalance")
        _close(ctx, par(x, lg), before, "output unchanged by rebalance")
        _close(ctx, par(x, lg), ref(x, lg), "rebalanced vs reference")


@check(2)
def ep_bf16_all_to_all_fp8_within_tolerance(ctx):
    # round 65: in bf16 the all-to-all is exact for weight-only formats, and only allclose for fp8 (documented): the
    # single-process layer weights each slot's fp32 output, the exchange carries it rounded to bf16 (2.7e-3 measured)
    for quant, exact in ((FP8, False), (INT4, True)):
        kw = dict(params_dtype=torch.bfloat16, device=ctx.device, backend="torch", quant_config=quant)
        ref, par = moekit.FusedMoE(8, 2, 64, 128, **kw), moekit.FusedMoE(8, 2, 64, 128, **kw, ep_group=ctx.world_group)
        q = moekit.quantize_experts(*global_weights(8, 64, 128, seed=5)[:2], quant)
        for layer in (ref, par):
            layer.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
        par.expert_executor.mode = "all_to_all"
        x, lg = _rank_batch(ctx, [16, 16], 64, 8, torch.bfloat16, ctx.rank)
        got, want = par(x, lg).float(), ref(x, lg).float()
        if exact:
            ctx.expect(torch.equal(got, want), f"bf16 {par.routed_experts.quant.name}: all-to-all not bit-exact")
        else:
            _close(ctx, got, want, f"bf16 {par.routed_experts.quant.name} all-to-all")


def _relaid_pair(ctx, quant, *, E=8, H=128, I=256, **par_kw):
    """As :func:`_pair`, on the Triton backend (the interpreter on the CPU), bf16 activations: 4-bit layers that
    store their packed words re-laid (``packed_layout == "rega"``, :mod:`moekit.ops.w4_layout`)."""
    kw = dict(params_dtype=torch.bfloat16, device=ctx.device, backend="triton", quant_config=quant)
    ref = moekit.FusedMoE(E, 2, H, I, **kw)
    par = moekit.FusedMoE(E, 2, H, I, **kw, **par_kw)
    w13, w2, _, _ = global_weights(E, H, I, seed=4)
    q = moekit.quantize_experts(w13, w2, quant)
    for layer in (ref, par):
        layer.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
        ctx.expect(layer.routed_experts.packed_layout == "rega", f"{quant}: layer not re-laid")
    return ref, par, q


@check(2)
def relaid_words_under_tp_ep_eplb(ctx):
    # re-laid after the TP cut (w2's K is this rank's I slice), EP slots and EPLB moves carry re-laid rows, and the
    # outputs stay within SPEC §8's weight-only bf16 tolerance of the single-process layer
    from moekit.ops.w4_layout import relay_rega

    mx = moekit.Mxfp4Format()
    ref, par, q = _relaid_pair(ctx, mx, tp_group=ctx.world_group)
    re, half = par.routed_experts, 128 // 2  # this rank's I = 128 of 256: rows of each shard, bytes of w2's rows
    g = slice(ctx.rank * 128, (ctx.rank + 1) * 128)
    w13 = torch.cat([q[0][:, g], q[0][:, 256:][:, g]], dim=1)
    ctx.expect(torch.equal(re.w13_weight, relay_rega(w13)), "TP: w13 rows re-laid after the cut")
    w2 = q[1][..., ctx.rank * half:(ctx.rank + 1) * half].contiguous()
    ctx.expect(torch.equal(re.w2_weight, relay_rega(w2)), "TP: w2's K slice re-laid after the cut")
    x, lg = _rank_batch(ctx, [9], 128, 8, torch.bfloat16, 0)
    _close(ctx, par(x, lg).float(), ref(x, lg).float(), "TP re-laid mxfp4", tol=1e-2)
    ref, par, q = _relaid_pair(ctx, INT4, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2)
    re = par.routed_experts
    skew = torch.zeros(8)
    skew[[1, 2]] = 4.0  # both on EP rank 0 initially
    x, lg = _rank_batch(ctx, [12, 5], 128, 8, torch.bfloat16, ctx.rank, skew=skew)
    before = par(x, lg)
    _close(ctx, before.float(), ref(x, lg).float(), "EP re-laid int4", tol=1e-2)
    ctx.expect(par.rebalance()["moved_slots"] > 0, "re-laid int4: rebalance moved nothing")
    for slot, logical in enumerate(re.placement.local_logical_ids()):
        for name, full in (("w13_weight", q[0]), ("w2_weight", q[1])):
            got = re.expert_tensors()[name][slot]
            ctx.expect(torch.equal(got, relay_rega(full[logical])), f"slot {slot} {name} != expert {logical} re-laid")
    _close(ctx, par(x, lg).float(), before.float(), "re-laid: output unchanged by rebalance", tol=1e-2)


@check(2)
def loaded_checkpoint_under_ep_tp(ctx):
    # round 51: load_moe_layers builds parallel layers (ep_group / tp_group; it built single-process ones only).
    # DeepSeek-V4 as it ships (mxfp4 routed experts, an fp8 shared expert, replicated; a hash-routed layer): each
    # rank's layer holds its experts / its slice and equals the single-process layer (SPEC §8 bf16: 1e-2)
    import os
    import sys
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loading"))
    from test_loader_deepseek_v4_quant import H, I, V, _checkpoint

    path = tempfile.mkdtemp(prefix=f"moekit-v4-rank{ctx.rank}-")
    _checkpoint(path, "fp4_top_level")
    load = dict(dtype=torch.bfloat16, backend="torch", progress=False)
    ref = moekit.load_moe_layers(path, **load)
    cases = (("EP", {"ep_group": ctx.world_group}, [7, 3][ctx.rank]), ("TP", {"tp_group": ctx.world_group}, 9))
    from moekit.loading import reader

    for kind, kw, t in cases:
        read, real = [], reader.Reader.read
        reader.Reader.read = lambda self, key: (read.append(key), real(self, key))[1]
        try:
            par = moekit.load_moe_layers(path, **load, **kw)
        finally:
            reader.Reader.read = real
        # EP: no per-expert tensor of another rank's experts is read (each rank reads ~1 / W of the expert bytes)
        others = {e for e in range(8) if e // 4 != ctx.rank}  # (linear placement: experts 0-3 on rank 0)
        foreign = [k for k in read if any(f".experts.{e}." in k for e in others)]
        ctx.expect(not foreign if kind == "EP" else bool(foreign), f"{kind}: read {foreign[:3]} ({len(foreign)})")
        ctx.expect(list(par) == list(ref), f"{kind}: layers {list(par)}")
        g = torch.Generator().manual_seed(10 + (ctx.rank if kind == "EP" else 0))  # TP: the same tokens everywhere
        x, ids = torch.randn(t, H, generator=g).bfloat16(), torch.randint(0, V, (t,), generator=g)
        for name, layer in par.items():
            w13 = layer.routed_experts.w13_weight
            want = (4, 2 * I, H // 2) if kind == "EP" else (8, I, H // 2)  # 4 of 8 experts / half of each I
            ctx.expect(tuple(w13.shape) == want, f"{kind} {name}: w13 {tuple(w13.shape)}, expected {want}")
            with torch.no_grad():  # (input_ids: the hash layer's; the other layer ignores them)
                _close(ctx, layer(x, input_ids=ids).float(), ref[name](x, input_ids=ids).float(), f"{kind} {name}",
                       tol=1e-2)


@check(2)
def loaded_checkpoint_failure_reaches_every_rank(ctx):
    # round 52: under EP a rank reads only its own experts' tensors, so a damaged expert tensor raised on the ranks
    # holding that expert while the others waited in the next collective until the group's timeout. Rank 1's copy
    # lacks expert 5's w2 (rank 1 holds experts 4-7): rank 1 raises the KeyError naming it, rank 0 a RuntimeError
    # naming rank 1 and that error; both return at once and the group still works afterwards.
    import os
    import sys
    import tempfile

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loading"))
    from test_loader_deepseek_v4_quant import _checkpoint

    path = tempfile.mkdtemp(prefix=f"moekit-v4-broken-rank{ctx.rank}-")
    _checkpoint(path, "fp4_top_level")
    if ctx.rank == 1:
        f = os.path.join(path, "model.safetensors")
        tensors = load_file(f)
        del tensors["layers.1.ffn.experts.5.w2.weight"]
        save_file(tensors, f)
    for kw in ({"ep_group": ctx.world_group}, {"tp_group": ctx.world_group}):
        err = None
        try:
            moekit.load_moe_layers(path, dtype=torch.bfloat16, backend="torch", progress=False, **kw)
        except (KeyError, RuntimeError) as e:
            err = e
        want = KeyError if ctx.rank == 1 else RuntimeError
        ctx.expect(isinstance(err, want), f"{kw}: rank {ctx.rank} raised {type(err).__name__}: {err}, expected {want}")
        if ctx.rank == 0 and err is not None:
            msg = str(err)
            ctx.expect("rank 1: KeyError" in msg and "experts.5" in msg, f"{kw}: rank 0's message: {msg[:300]}")
    t = torch.ones(1, device=ctx.device)
    torch.distributed.all_reduce(t, group=ctx.world_group)
    ctx.expect(t.item() == 2.0, f"the group after the failures: all_reduce gave {t.item()}")
