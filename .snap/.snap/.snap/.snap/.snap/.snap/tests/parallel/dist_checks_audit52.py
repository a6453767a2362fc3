"""Round 52 audit (run in spawned gloo ranks by dist_harness): ``load_moe_layers(path, ep_group=, tp_group=,
expert_placement_strategy=, enable_eplb=, num_redundant_experts=)`` on tiny quantised checkpoints written the way the
real ones ship (fp8 block DeepSeek-V3 with grouped routing and fp8 shared experts; gpt-oss mxfp4 fused stacks with
interleaved gate/up rows and biases; Kimi-K2 int4 ``pack-quantized``; GLM-4.5 compressed-tensors fp8 channel with
static ``input_scale``; a float checkpoint quantised on load), each parallel layer against the single-process layer
loaded from the same files, on the same tokens (SPEC §5, §8): slots hold their logical experts' bytes (replicas
included), an EPLB rebalance moves scales with the weights and leaves outputs unchanged, uneven token counts (0 and 1
on a rank), TP slices on and off the format's boundaries. Every rank writes its own copy of a checkpoint (same seeds).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

import moekit
from dist_checks import expect_rel_close, experts_backend, registry
from moekit.loading import reader

__all__ = ["CHECKS", "WORLD", "experts_backend"]  # what dist_harness reads of a checks module
CHECKS, WORLD, check = registry()
E, K = 8, 2
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
LOAD = dict(backend="torch", progress=False)


# -- tiny checkpoints ------------------------------------------------------------------------------------------------
def _tempdir(ctx, name: str) -> str:
    path = tempfile.mkdtemp(prefix=f"moekit-audit52-{name}-rank{ctx.rank}-")
    atexit.register(shutil.rmtree, path, True)
    return path


def _write(ctx, name, config, tensors) -> str:
    path = _tempdir(ctx, name)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return path


def _stacks(h, i, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * i, h, generator=g) * h**-0.5, torch.randn(E, h, i, generator=g) * i**-0.5


def _per_expert(t, pre, q13, q2, s13, s2, i, *, scale_key, weight_key="weight", bf16_odd=False, shape=False):
    n13 = s13.shape[1] // 2
    for e in range(E):
        parts = {"gate_proj": (q13[e, :i], s13[e, :n13]), "up_proj": (q13[e, i:], s13[e, n13:]),
                 "down_proj": (q2[e], s2[e])}
        for proj, (w, s) in parts.items():
            t[f"{pre}experts.{e}.{proj}.{weight_key}"] = w
            t[f"{pre}experts.{e}.{proj}.{scale_key}"] = s.bfloat16() if bf16_odd and e % 2 else s
            if shape:
                full = (q2.shape[1], i) if proj == "down_proj" else (i, q13.shape[2] * (8 if weight_key ==
                                                                                      "weight_packed" else 1))
                t[f"{pre}experts.{e}.{proj}.weight_shape"] = torch.tensor(full, dtype=torch.int64)
    return t


def _deepseek_style(model_type, h, i, seed, quant, *, n_group, n_shared_experts, bias_floor=0.0, bias_scale=1.0):
    """(config, format, quantised stacks, key prefix, generator, {router tensors}) of a one-layer DeepSeek-style
    checkpoint (grouped routing with one group kept, a selection bias) in ``quant``."""
    cfg = dict(model_type=model_type, hidden_size=h, moe_intermediate_size=i, n_routed_experts=E,
               num_experts_per_tok=K, n_group=n_group, topk_group=1, n_shared_experts=n_shared_experts,
               num_hidden_layers=1, first_k_dense_replace=0, dtype="bfloat16", quantization_config=quant)
    fmt = moekit.parse_quant_config(quant)
    q = moekit.quantize_experts(*_stacks(h, i, seed), fmt)
    pre = "model.layers.0.mlp."
    g = torch.Generator().manual_seed(seed + 1)
    t = {pre + "gate.weight": torch.randn(E, h, generator=g).bfloat16(),
         pre + "gate.e_score_correction_bias": torch.rand(E, generator=g) * bias_scale + bias_floor}
    return cfg, fmt, q, pre, g, t


def ds3_fp8(ctx, h=32, i=32, seed=0) -> str:
    """DeepSeek-V3 fp8 block: grouped routing (2 groups, 1 kept), a selection bias, an fp8 shared expert, per-expert
    keys with bf16 ``weight_scale_inv`` on odd experts."""
    cfg, fmt, (q13, q2, s13, s2), pre, g, t = _deepseek_style("deepseek_v3", h, i, seed, FP8, n_group=2,
                                                               n_shared_experts=1, bias_floor=0.1, bias_scale=1e-3)
    _per_expert(t, pre, q13, q2, s13, s2, i, scale_key="weight_scale_inv", bf16_odd=True)
    for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        wq, s = moekit.ops.quantize.quantize_weight(torch.randn(*shape, generator=g) * 0.1, fmt)
        t[pre + f"shared_experts.{proj}.weight"], t[pre + f"shared_experts.{proj}.weight_scale_inv"] = wq, s
    return _write(ctx, f"ds3-{i}", cfg, t)


def gpt_oss_mxfp4(ctx, h=64, i=64, seed=6) -> str:
    """gpt-oss mxfp4: fused ``*_blocks`` / ``*_scales`` with interleaved gate/up rows, biases, a router with bias."""
    q = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.router"]}
    cfg = dict(model_type="gpt_oss", hidden_size=h, intermediate_size=i, num_local_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, dtype="bfloat16", quantization_config=q)
    q13, q2, s13, s2 = moekit.quantize_experts(*_stacks(h, i, seed), moekit.parse_quant_config(q))
    g = torch.Generator().manual_seed(seed + 1)
    b13, b2 = torch.randn(E, 2 * i, generator=g) * 0.1, torch.randn(E, h, generator=g) * 0.1

    def inter(x):  # gate rows then up rows -> g0 u0 g1 u1 ...
        out = torch.empty_like(x)
        out[:, 0::2], out[:, 1::2] = x[:, :i], x[:, i:]
        return out

    pre = "model.layers.0.mlp."
    t = {pre + "router.weight": torch.randn(E, h, generator=g).bfloat16(),
         pre + "router.bias": torch.randn(E, generator=g).bfloat16(),
         pre + "experts.gate_up_proj_blocks": inter(q13).view(E, 2 * i, h // 32, 16),
         pre + "experts.gate_up_proj_scales": inter(s13), pre + "experts.gate_up_proj_bias": inter(b13).bfloat16(),
         pre + "experts.down_proj_blocks": q2.view(E, h, i // 32, 16), pre + "experts.down_proj_scales": s2,
         pre + "experts.down_proj_bias": b2.bfloat16()}
    return _write(ctx, f"gptoss-{i}", cfg, t)


def kimi_int4(ctx, h=64, i=64, seed=7) -> str:
    """Kimi-K2 int4 ``pack-quantized`` (group 32), per-expert ``weight_packed`` / ``weight_scale`` / ``weight_shape``;
    the shared expert ignored (bf16)."""
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "ignore": ["lm_head", "re:.*shared_experts.*", "re:.*mlp.gate$"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                    "strategy": "group", "group_size": 32, "dynamic": False}}}}
    cfg = dict(model_type="kimi_k2", hidden_size=h, moe_intermediate_size=i, n_routed_experts=E,
               num_experts_per_tok=K, n_group=1, topk_group=1, n_shared_experts=1, num_hidden_layers=1,
               first_k_dense_replace=0, dtype="bfloat16", quantization_config=ct)
    w13, w2 = _stacks(h, i, seed)
    q13, q2, s13, s2 = moekit.quantize_experts(w13.bfloat16(), w2.bfloat16(), moekit.parse_quant_config(ct))
    pre = "model.layers.0.mlp."
    g = torch.Generator().manual_seed(seed + 1)
    t = {pre + "gate.weight": torch.randn(E, h, generator=g).bfloat16(),
         pre + "gate.e_score_correction_bias": torch.rand(E, generator=g)}
    for e in range(E):
        for proj, w, s, shape in (("gate_proj", q13[e, :i], s13[e, :i], (i, h)),
                                  ("up_proj", q13[e, i:], s13[e, i:], (i, h)), ("down_proj", q2[e], s2[e], (h, i))):
            t[pre + f"experts.{e}.{proj}.weight_packed"] = w
            t[pre + f"experts.{e}.{proj}.weight_scale"] = s
            t[pre + f"experts.{e}.{proj}.weight_shape"] = torch.tensor(shape, dtype=torch.int64)
    for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        t[pre + f"shared_experts.{proj}.weight"] = (torch.randn(*shape, generator=g) * 0.1).bfloat16()
    return _write(ctx, f"kimi-{i}", cfg, t)


def glm_fp8_static(ctx, h=32, i=32, seed=5, strategy="channel") -> str:
    """GLM-4.5 compressed-tensors fp8 (``channel`` or ``tensor`` weights) with static per-tensor ``input_scale``
    (different per expert: every slot must hold the max over all experts)."""
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*mlp.gate$"],
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                    "strategy": strategy, "dynamic": False},
                                        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                              "strategy": "tensor", "dynamic": False}}}}
    cfg, fmt, (q13, q2, s13, s2), pre, g, t = _deepseek_style("glm4_moe", h, i, seed, ct, n_group=1,
                                                               n_shared_experts=0)
    in13, in2 = torch.rand(E, generator=g) * 0.02 + 0.01, torch.rand(E, generator=g) * 0.05 + 0.02
    in13[E - 1], in2[E - 2] = 0.2, 0.3  # the largest input scales belong to experts of the last EP rank
    for e in range(E):
        if strategy == "channel":
            parts = (("gate_proj", q13[e, :i], s13[e, :i, None]), ("up_proj", q13[e, i:], s13[e, i:, None]),
                     ("down_proj", q2[e], s2[e][:, None]))
            ins = (in13[e], in13[e], in2[e])
        else:
            parts = (("gate_proj", q13[e, :i], s13[e, 0:1]), ("up_proj", q13[e, i:], s13[e, 1:2]),
                     ("down_proj", q2[e], s2[e].reshape(1)))
            ins = (in13[e], in13[e], in2[e])
        for (proj, w, s), x in zip(parts, ins):
            t[pre + f"experts.{e}.{proj}.weight"] = w
            t[pre + f"experts.{e}.{proj}.weight_scale"] = s.bfloat16()
            t[pre + f"experts.{e}.{proj}.input_scale"] = x.reshape(1)
    return _write(ctx, f"glm-{strategy}", cfg, t)


def float_qwen3(ctx, h=64, i=64, seed=8, fused=False) -> str:
    """A bf16 Qwen3-MoE checkpoint (per-expert keys, or fused ``experts.gate_up_proj`` / ``experts.down_proj``)."""
    cfg = dict(model_type="qwen3_moe", hidden_size=h, moe_intermediate_size=i, num_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, dtype="bfloat16", norm_topk_prob=True)
    w13, w2 = _stacks(h, i, seed)
    pre = "model.layers.0.mlp."
    t = {pre + "gate.weight": torch.randn(E, h, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()}
    if fused:
        t[pre + "experts.gate_up_proj"], t[pre + "experts.down_proj"] = w13.bfloat16(), w2.bfloat16()
    else:
        for e in range(E):
            t[pre + f"experts.{e}.gate_proj.weight"] = w13[e, :i].bfloat16()
            t[pre + f"experts.{e}.up_proj.weight"] = w13[e, i:].bfloat16()
            t[pre + f"experts.{e}.down_proj.weight"] = w2[e].bfloat16()
    return _write(ctx, f"qwen3-{'fused' if fused else 'split'}", cfg, t)


# -- comparisons -----------------------------------------------------------------------------------------------------
def _bytes(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def _slots_hold(ctx, par, ref, what):
    """Every per-slot tensor of ``par``'s routed experts equals the single-process layer's tensor of the logical expert
    the slot holds (its TP slice: the single-process tensors cut as the parallel layer cuts them)."""
    re, rr = par.routed_experts, ref.routed_experts
    mine, full = re.expert_tensors(), rr.expert_tensors()
    for slot, logical in enumerate(re.placement.local_logical_ids()):
        for name, t in mine.items():
            want = full[name][logical]
            spec = re.specs[name]
            if re.placement.tp_size > 1 and spec.kind != "input_scale":
                shards = want.chunk(len(spec.shards)) if spec.w13 and len(spec.shards) > 1 else (want,)
                want = torch.cat([spec.take(s, re.tp_rows) for s in shards], dim=0 if spec.w13 else -1) \
                    if spec.w13 else spec.take(want, re.tp_rows)
            ok = t[slot].shape == want.shape and torch.equal(_bytes(t[slot]), _bytes(want))
            ctx.expect(ok, f"{what}: slot {slot} {name} is not expert {logical}'s")


def _tokens(ctx, counts, h, seed, skew=None, columns=E, same=False):
    """This rank's tokens of per-rank batches ``counts`` (x [T, h] float32, logits [T, columns] float32); ``same``:
    the first batch on every rank (the ranks of a TP group hold the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, h, generator=g) for n in counts]
    ls = [torch.randn(n, columns, generator=g) for n in counts]
    if skew is not None:
        ls = [lg + skew for lg in ls]
    r = 0 if same else ctx.rank
    return xs[r], ls[r]


def _only(layers):
    ctx_layers = list(layers.values())
    assert len(ctx_layers) == 1, list(layers)
    return ctx_layers[0]


def _eplb_round(ctx, ref, par, x, lg, tol, what):
    """Forwards (both EP paths) against ``ref``, a rebalance that moves slots, the slots' bytes, forwards again."""
    want = ref(x, lg)
    before = {}
    for mode in ("all_to_all", "all_gather"):
        par.expert_executor.mode = mode
        before[mode] = par(x, lg)
        expect_rel_close(ctx, before[mode], want, f"{what}: {mode} before rebalance", tol)
    stats = par.rebalance()
    ctx.expect(stats["moved_slots"] > 0, f"{what}: rebalance moved nothing ({stats['physical_to_logical']})")
    _slots_hold(ctx, par, ref, f"{what} after rebalance")
    for mode in ("all_to_all", "all_gather"):
        par.expert_executor.mode = mode
        got = par(x, lg)
        expect_rel_close(ctx, got, want, f"{what}: {mode} after rebalance", tol)
        expect_rel_close(ctx, got, before[mode], f"{what}: {mode} unchanged by the rebalance", tol)
    par.expert_executor.mode = "auto"
    return stats


# -- checks ----------------------------------------------------------------------------------------------------------
@check(2)
def loaded_fp8_ds3_eplb_round_robin(ctx):
    # fp8 block DeepSeek-V3 (grouped routing, fp8 shared expert) loaded under EP with round_robin placement and 2
    # redundant experts: each slot (replicas included) holds its expert's e4m3 bytes and scales (bf16 scales on odd
    # experts, widened exactly); outputs equal the single-process layer's; skewed routing, a rebalance, equal again
    path = ds3_fp8(ctx)
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 1e-2)):
        ref = _only(moekit.load_moe_layers(path, dtype=dtype, **LOAD))
        read, real = [], reader.Reader.read
        reader.Reader.read = lambda self, key: (read.append(key), real(self, key))[1]
        try:
            par = _only(moekit.load_moe_layers(path, dtype=dtype, ep_group=ctx.world_group, enable_eplb=True,
                                               num_redundant_experts=2, expert_placement_strategy="round_robin",
                                               **LOAD))
        finally:
            reader.Reader.read = real
        held = set(par.routed_experts.placement.local_logical_ids())
        experts_read = {int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k}
        ctx.expect(experts_read == held, f"{dtype}: read the tensors of experts {sorted(experts_read)}, holds "
                                         f"{sorted(held)} (replicas included)")
        _slots_hold(ctx, par, ref, f"{dtype} loaded")
        x, lg = _tokens(ctx, [11, 6], 32, seed=2)
        x = x.to(dtype)
        for mode in ("all_to_all", "all_gather"):  # the gate computes the logits
            par.expert_executor.mode = mode
            expect_rel_close(ctx, par(x), ref(x), f"{dtype} gate logits {mode}", tol)
        skew = torch.zeros(E)
        skew[[0, 2]] = 5.0  # both on EP rank 0 (round_robin: even experts), both in expert group 0
        x, lg = _tokens(ctx, [14, 9], 32, seed=3, skew=skew)
        _eplb_round(ctx, ref, par, x.to(dtype), lg, tol, f"{dtype} fp8 block")


@check(2)
def loaded_mxfp4_gpt_oss_eplb_and_tp(ctx):
    # gpt-oss mxfp4 (fused blocks, interleaved gate/up rows and biases): EP linear with 2 redundant experts (replicas of
    # the other rank's experts come out of the fused stacks), rebalance; TP on the 32-value boundaries; the w2 bias once
    path = gpt_oss_mxfp4(ctx)
    ref = _only(moekit.load_moe_layers(path, **LOAD))
    par = _only(moekit.load_moe_layers(path, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2,
                                       **LOAD))
    _slots_hold(ctx, par, ref, "EP loaded")
    skew = torch.zeros(E)
    skew[[1, 3]] = 4.0  # both on EP rank 0 (linear: physical 0-4 on rank 0)
    x, lg = _tokens(ctx, [13, 4], 64, seed=4, skew=skew)
    _eplb_round(ctx, ref, par, x.bfloat16(), lg, 1e-2, "mxfp4 EP")
    tp = _only(moekit.load_moe_layers(path, tp_group=ctx.world_group, **LOAD))
    _slots_hold(ctx, tp, ref, "TP loaded")
    x, _ = _tokens(ctx, [9], 64, seed=5, same=True)
    x = x.bfloat16()
    expect_rel_close(ctx, tp(x), ref(x), "mxfp4 TP", 1e-2)


@check(2)
def loaded_int4_kimi_eplb(ctx):
    # Kimi-K2 int4 pack-quantized (per-expert packed words, bf16 group scales, weight_shape checked), EP with 2
    # redundant experts and round_robin placement, a rebalance; TP on group boundaries
    path = kimi_int4(ctx)
    ref = _only(moekit.load_moe_layers(path, **LOAD))
    for strategy in ("linear", "round_robin"):
        par = _only(moekit.load_moe_layers(path, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2,
                                           expert_placement_strategy=strategy, **LOAD))
        _slots_hold(ctx, par, ref, f"int4 {strategy} loaded")
        skew = torch.zeros(E)
        skew[[2, 4] if strategy == "round_robin" else [0, 3]] = 4.0  # both on EP rank 0
        x, lg = _tokens(ctx, [10, 7], 64, seed=6, skew=skew)
        _eplb_round(ctx, ref, par, x.bfloat16(), lg, 1e-2, f"int4 {strategy}")
    tp = _only(moekit.load_moe_layers(path, tp_group=ctx.world_group, **LOAD))
    _slots_hold(ctx, tp, ref, "int4 TP loaded")
    x, _ = _tokens(ctx, [9], 64, seed=7, same=True)
    expect_rel_close(ctx, tp(x.bfloat16()), ref(x.bfloat16()), "int4 TP", 1e-2)


@check(2)
def loaded_fp8_static_input_eplb_and_tp(ctx):
    # compressed-tensors fp8 (channel and tensor weights) with static input scales: under EP every slot holds the max
    # input scale over ALL experts (the largest sit on the last rank's experts), still after a rebalance that moves
    # slots between ranks (the 0-dim input-scale rows travel too); TP (allowed with static inputs) equal as well
    for strategy in ("channel", "tensor"):
        path = glm_fp8_static(ctx, strategy=strategy)
        ref = _only(moekit.load_moe_layers(path, **LOAD))
        rr = ref.routed_experts
        par = _only(moekit.load_moe_layers(path, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2,
                                           **LOAD))
        re = par.routed_experts
        ctx.expect(torch.equal(re.w13_input_scale, torch.full_like(re.w13_input_scale, 0.2)) and
                   torch.equal(re.w2_input_scale, torch.full_like(re.w2_input_scale, 0.3)),
                   f"{strategy}: EP input scales {re.w13_input_scale.tolist()} {re.w2_input_scale.tolist()}")
        ctx.expect(torch.equal(rr.w13_input_scale, re.w13_input_scale[:1].expand(E)),
                   f"{strategy}: reference input scale")
        _slots_hold(ctx, par, ref, f"{strategy} EP loaded")
        skew = torch.zeros(E)
        skew[[1, 2]] = 4.0  # both on EP rank 0
        x, lg = _tokens(ctx, [12, 5], 32, seed=8, skew=skew)
        _eplb_round(ctx, ref, par, x.bfloat16(), lg, 1e-2, f"{strategy} static fp8")
        ctx.expect(torch.equal(re.w2_input_scale, torch.full_like(re.w2_input_scale, 0.3)),
                   f"{strategy}: input scales after the rebalance {re.w2_input_scale.tolist()}")
        tp = _only(moekit.load_moe_layers(path, tp_group=ctx.world_group, **LOAD))
        _slots_hold(ctx, tp, ref, f"{strategy} TP loaded")
        x, _ = _tokens(ctx, [9], 32, seed=9, same=True)
        expect_rel_close(ctx, tp(x.bfloat16()), ref(x.bfloat16()), f"{strategy} static fp8 TP", 1e-2)


@check(2)
def loaded_fp8_fused_stacks_eplb_and_tp(ctx):
    # fp8 block as transformers' FP8Experts stores it: fused ``experts.gate_up_proj`` [E, 2I, H] e4m3 with ONE
    # ``_scale_inv`` grid over the 2I rows (I a multiple of the block: the per-shard grids), ``experts.down_proj``;
    # every rank reads the stacks whole and keeps its slots (replicas of the other rank's experts included) or its
    # TP slice
    from moekit.ops._quant_rules import fp8_block_quantize

    h, i = 32, 32
    cfg = dict(model_type="qwen3_moe", hidden_size=h, moe_intermediate_size=i, num_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, dtype="bfloat16", norm_topk_prob=True, quantization_config=FP8)
    w13, w2 = _stacks(h, i, seed=9)
    q13, s13 = fp8_block_quantize(w13, 16, 16)
    q2, s2 = fp8_block_quantize(w2, 16, 16)
    pre = "model.layers.0.mlp."
    gate = torch.randn(E, h, generator=torch.Generator().manual_seed(10)).bfloat16()  # the same on every rank
    path = _write(ctx, "fp8-fused", cfg, {pre + "gate.weight": gate, pre + "experts.gate_up_proj": q13,
                                         pre + "experts.gate_up_proj_scale_inv": s13, pre + "experts.down_proj": q2,
                                         pre + "experts.down_proj_scale_inv": s2})
    ref = _only(moekit.load_moe_layers(path, **LOAD))
    par = _only(moekit.load_moe_layers(path, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2,
                                       **LOAD))
    _slots_hold(ctx, par, ref, "fused fp8 EP loaded")
    skew = torch.zeros(E)
    skew[[1, 3]] = 4.0  # both on EP rank 0
    x, lg = _tokens(ctx, [12, 5], h, seed=15, skew=skew)
    _eplb_round(ctx, ref, par, x.bfloat16(), lg, 1e-2, "fused fp8 EP")
    tp = _only(moekit.load_moe_layers(path, tp_group=ctx.world_group, **LOAD))
    _slots_hold(ctx, tp, ref, "fused fp8 TP loaded")
    x, _ = _tokens(ctx, [9], h, seed=16, same=True)
    expect_rel_close(ctx, tp(x.bfloat16()), ref(x.bfloat16()), "fused fp8 TP", 1e-2)


@check(2)
def loaded_quantise_on_load_under_ep_tp(ctx):
    # quant_config= on a bf16 checkpoint (per-expert keys and fused stacks): the EP / TP layers hold the bits the
    # single-process quantise-on-load makes (quantised from the full shard, then cut), replicas included; under EP a
    # rank quantises only the experts its slots hold, fused stacks too (it quantised every expert: W times the work)
    from moekit.experts import routed

    real, calls = routed.quantize_weight, []
    routed.quantize_weight = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        _quantise_on_load(ctx, calls)
    finally:
        routed.quantize_weight = real


def _quantise_on_load(ctx, calls):
    for fused in (False, True):
        path = float_qwen3(ctx, fused=fused)
        for quant in (FP8, moekit.Int4GroupFormat(32), moekit.Mxfp4Format()):
            ref = _only(moekit.load_moe_layers(path, quant_config=quant, **LOAD))
            what = f"{'fused' if fused else 'per-expert'} {ref.routed_experts.quant.name}"
            for kw in (dict(ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2,
                            expert_placement_strategy="round_robin"), dict(tp_group=ctx.world_group)):
                calls.clear()
                par = _only(moekit.load_moe_layers(path, quant_config=quant, **kw, **LOAD))
                kind = "EP" if "ep_group" in kw else "TP"
                held = len(set(par.routed_experts.placement.local_logical_ids()))
                want = 3 * (held if kind == "EP" else E)  # gate, up, down of each expert the rank holds
                ctx.expect(len(calls) == want, f"{what} {kind}: quantised {len(calls)} shards, expected {want}")
                _slots_hold(ctx, par, ref, f"{what} {kind}")
                x, _ = _tokens(ctx, [7, 4] if kind == "EP" else [6], 64, seed=10, same=kind == "TP")
                expect_rel_close(ctx, par(x.bfloat16()), ref(x.bfloat16()), f"{what} {kind}", 1e-2)


@check(2)
def loaded_uneven_tokens(ctx):
    # loaded quantised layers (fp8 block with an fp8 shared expert; mxfp4 with biases) fed 0 tokens on one rank and 1 on
    # the other (EP, both paths, with EPLB recording), and 0 / 1 tokens on every rank (TP)
    for path, h in ((ds3_fp8(ctx), 32), (gpt_oss_mxfp4(ctx), 64)):
        ref = _only(moekit.load_moe_layers(path, **LOAD))
        ep = _only(moekit.load_moe_layers(path, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2,
                                          **LOAD))
        tp = _only(moekit.load_moe_layers(path, tp_group=ctx.world_group, **LOAD))
        name = ref.routed_experts.quant.name
        for counts in ([0, 1], [1, 0], [0, 0], [1, 1]):
            x, _ = _tokens(ctx, counts, h, seed=11)
            x = x.bfloat16()
            want = ref(x)
            for mode in ("all_to_all", "all_gather", "auto"):
                ep.expert_executor.mode = mode
                expect_rel_close(ctx, ep(x), want, f"{name} EP {counts} {mode}", 1e-2)
        for t in (0, 1):
            x, _ = _tokens(ctx, [t], h, seed=12, same=True)
            expect_rel_close(ctx, tp(x.bfloat16()), ref(x.bfloat16()), f"{name} TP T={t}", 1e-2)
        ep.rebalance()  # a window of a few tokens (and empty steps): still fine
        x, _ = _tokens(ctx, [3, 0], h, seed=13)
        expect_rel_close(ctx, ep(x.bfloat16()), ref(x.bfloat16()), f"{name} EP after rebalance", 1e-2)
        ep.expert_executor.chunk_tokens = 3  # chunks: ranks of 7 and 2 tokens (the second runs empty chunks)
        x, _ = _tokens(ctx, [7, 2], h, seed=14)
        for mode in ("all_to_all", "all_gather"):
            ep.expert_executor.mode = mode
            expect_rel_close(ctx, ep(x.bfloat16()), ref(x.bfloat16()), f"{name} EP in chunks of 3 {mode}", 1e-2)


@check(2)
def loaded_tp_off_the_boundaries_raises_everywhere(ctx):
    # a TP slice of I off the format's boundaries: every rank raises the ValueError naming them (no rank waits)
    cases = ((lambda: ds3_fp8(ctx, i=48), "fp8_block"), (lambda: gpt_oss_mxfp4(ctx, i=32), "mxfp4"),
             (lambda: kimi_int4(ctx, i=32), "int4"))
    for make, name in cases:
        path = make()
        try:
            moekit.load_moe_layers(path, tp_group=ctx.world_group, **LOAD)
            ctx.expect(False, f"{name}: a TP slice off the boundaries was accepted")
        except ValueError as err:
            ctx.expect("boundaries" in str(err), f"{name}: {err}")
        except Exception as err:  # noqa: BLE001 - reported
            ctx.expect(False, f"{name}: {type(err).__name__}: {err}")
    t = torch.ones(1)
    torch.distributed.all_reduce(t, group=ctx.world_group)
    ctx.expect(t.item() == 2.0, "the group after the failures")


@check(2)
def loaded_v4_hash_layers_rebalance_all_and_state_dict(ctx):
    # DeepSeek-V4 as it ships (mxfp4 routed experts from e8m0 ``.scale``, fp8 shared experts, a hash-routed layer and a
    # biased one) under EP with EPLB: moekit.parallel.rebalance over both loaded layers, then the rebalanced layers'
    # state dicts into freshly loaded EP layers (the placement travels with them; the EPLB maps follow)
    import sys

    from moekit.parallel.rebalance import rebalance

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loading"))
    from test_loader_deepseek_v4_quant import H, V, _checkpoint

    path = _tempdir(ctx, "v4")
    _checkpoint(path, "fp4_top_level")
    load = dict(dtype=torch.bfloat16, **LOAD)
    par_kw = dict(ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=2)
    ref = moekit.load_moe_layers(path, **load)
    par = moekit.load_moe_layers(path, **load, **par_kw)
    g = torch.Generator().manual_seed(20 + ctx.rank)
    t = (17, 6)[ctx.rank]
    x, ids = torch.randn(t, H, generator=g).bfloat16(), torch.randint(0, V, (t,), generator=g)
    skew = torch.zeros(8)
    skew[[0, 1]] = 6.0  # experts 0 and 1 (EP rank 0) hot in the biased layer; the hash layer follows its table
    logits = {name: (torch.randn(t, 8, generator=g) + skew) for name in ref}
    with torch.no_grad():
        want = {n: ref[n](x, logits[n] if "1" in n else None, input_ids=ids) for n in ref}
        before = {n: par[n](x, logits[n] if "1" in n else None, input_ids=ids) for n in par}
        for n in par:
            expect_rel_close(ctx, before[n], want[n], f"{n} before", 1e-2)
        try:  # a non-layer among them: TypeError before any layer is rebalanced (every rank alike: no collective)
            rebalance([*par.values(), "model.layers.0.mlp"])
            ctx.expect(False, "rebalance took a str for a layer")
        except TypeError as err:
            ctx.expect("MoERunner" in str(err), f"rebalance's TypeError: {err}")
        stats = rebalance(par)  # the dict load_moe_layers returns (its names were taken for layers)
        ctx.expect(any(s["moved_slots"] for s in stats), f"nothing moved: {stats}")
        for n, layer in par.items():
            _slots_hold(ctx, layer, ref[n], f"{n} after rebalance")
            expect_rel_close(ctx, layer(x, logits[n] if "1" in n else None, input_ids=ids), want[n], f"{n} after", 1e-2)
        fresh = moekit.load_moe_layers(path, **load, **par_kw)
        for n, layer in fresh.items():
            layer.load_state_dict(par[n].state_dict())
            ctx.expect(layer.routed_experts.placement == par[n].routed_experts.placement, f"{n}: placement restored")
            p2l = layer.expert_executor.eplb_state.physical_to_logical.tolist()
            ctx.expect(p2l == list(par[n].routed_experts.placement.physical_to_logical), f"{n}: EPLB maps {p2l}")
            _slots_hold(ctx, layer, ref[n], f"{n} state dict")
            expect_rel_close(ctx, layer(x, logits[n] if "1" in n else None, input_ids=ids), want[n], f"{n} state dict", 1e-2)


@check(4)
def loaded_fp8_ep_tp_grid_eplb(ctx):
    # a 2 x 2 grid (rank = 2·ep_rank + tp_rank): fp8 block DeepSeek-V3 (grouped routing, fp8 shared expert) and gpt-oss
    # mxfp4 (biases: w2's once per TP group) loaded with both groups and EPLB, rebalanced; the ranks of a TP group
    # hold the same tokens
    ep_rank, tp_rank = divmod(ctx.rank, 2)
    groups = dict(ep_group=ctx.groups[f"ep{tp_rank}"], tp_group=ctx.groups[f"tp{ep_rank}"])
    for path, h in ((ds3_fp8(ctx), 32), (gpt_oss_mxfp4(ctx), 64)):
        ref = _only(moekit.load_moe_layers(path, **LOAD))
        par = _only(moekit.load_moe_layers(path, enable_eplb=True, num_redundant_experts=2,
                                           expert_placement_strategy="round_robin", **groups, **LOAD))
        what = ref.routed_experts.quant.name
        _slots_hold(ctx, par, ref, f"{what} grid loaded")
        skew = torch.zeros(E)
        skew[[0, 2]] = 5.0  # both on EP rank 0 (round_robin)
        g = torch.Generator().manual_seed(30)
        xs = [torch.randn(n, h, generator=g) for n in (11, 0)]
        ls = [torch.randn(n, E, generator=g) + skew for n in (11, 0)]
        x, lg = xs[ep_rank].bfloat16(), ls[ep_rank]
        _eplb_round(ctx, ref, par, x, lg, 1e-2, f"{what} grid")


def _damaged_ds3(ctx, how: str) -> str:
    """Rank 1's copy of the fp8 DeepSeek-V3 checkpoint damaged outside the routed experts (rank 0's intact)."""
    from safetensors.torch import load_file

    path = ds3_fp8(ctx)
    if ctx.rank == 1:
        f = os.path.join(path, "model.safetensors")
        t = load_file(f)
        pre = "model.layers.0.mlp."
        if how == "selection bias missing":
            del t[pre + "gate.e_score_correction_bias"]
        elif how == "shared scale malformed":
            t[pre + "shared_experts.down_proj.weight_scale_inv"] = torch.ones(3, 5)
        elif how == "config unreadable":
            with open(os.path.join(path, "config.json"), "w") as cfg:
                cfg.write("{not json")
        save_file(t, f)
    return path


def _damaged_v4(ctx, how: str) -> str:
    """Rank 1's copy of the DeepSeek-V4 checkpoint (two layers, fp8 shared experts) damaged outside the experts."""
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loading"))
    from test_loader_deepseek_v4_quant import _checkpoint

    path = _tempdir(ctx, "v4-damaged")
    _checkpoint(path, "fp4_top_level")
    if ctx.rank == 1:
        f = os.path.join(path, "model.safetensors")
        t = load_file(f)
        if how == "layer 0 shared scale malformed":
            t["layers.0.ffn.shared_experts.w2.scale"] = torch.ones(3, 5)
        elif how == "layer 1 bias missing":
            del t["layers.1.ffn.gate.bias"]
        save_file(t, f)
    return path


@check(2)
def loaded_failure_outside_the_experts_reaches_every_rank(ctx):
    # round 52 made a damaged EXPERT tensor raise on every rank; a rank's copy damaged elsewhere (the selection bias,
    # read to build the layer; an fp8 shared expert's scale, read while building; config.json) raised on that rank
    # only, before the collective its peers then waited in (the layer's construction-time agreement, or the final
    # all-gather) until the group's timeout. Each case runs on a fresh group with an 8 s timeout: every rank must
    # raise well before it, rank 0 a RuntimeError naming rank 1.
    import datetime
    import time

    import torch.distributed as dist

    cases = [(how, _damaged_ds3, "ep_group") for how in ("selection bias missing", "shared scale malformed",
                                                          "config unreadable")]
    # DeepSeek-V4 (two layers): the first layer's shared scale (after that layer was built: the peers go on to build
    # the next), the second layer's selection bias (before it is built); over a TP group
    cases += [(how, _damaged_v4, "tp_group") for how in ("layer 0 shared scale malformed", "layer 1 bias missing")]
    for how, damaged, kind in cases:
        group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=8))
        path = damaged(ctx, how)
        dist.barrier(group=ctx.world_group)
        start, err = time.monotonic(), None
        try:
            moekit.load_moe_layers(path, **{kind: group}, **LOAD)
        except Exception as e:  # noqa: BLE001 - checked below
            err = e
        took = time.monotonic() - start
        ctx.expect(err is not None, f"{how}: rank {ctx.rank} loaded")
        ctx.expect(took < 6, f"{how}: rank {ctx.rank} took {took:.1f} s ({type(err).__name__}: {str(err)[:200]})")
        if ctx.rank == 0 and err is not None:
            ctx.expect(isinstance(err, RuntimeError) and "rank 1" in str(err),
                       f"{how}: rank 0 raised {type(err).__name__}: {str(err)[:300]}")
        dist.barrier(group=ctx.world_group)


@check(4)
def loaded_failure_outside_the_experts_reaches_the_grid(ctx):
    # as above on a 2 x 2 grid (rank = 2·ep_rank + tp_rank): rank 3's copy lacks the selection bias (read before the
    # layer is built), then rank 0's has a malformed shared-expert scale (read after it was built); every rank raises
    # well before the groups' 8 s timeout, those that did not fail a RuntimeError naming the one that did
    import datetime
    import time

    import torch.distributed as dist

    from safetensors.torch import load_file

    ep_rank, tp_rank = divmod(ctx.rank, 2)
    for bad, how in ((3, "selection bias missing"), (0, "shared scale malformed")):
        timeout = datetime.timedelta(seconds=8)
        made = {name: dist.new_group(ranks, timeout=timeout)
                for name, ranks in (("tp0", [0, 1]), ("tp1", [2, 3]), ("ep0", [0, 2]), ("ep1", [1, 3]))}
        path = ds3_fp8(ctx)
        if ctx.rank == bad:
            f = os.path.join(path, "model.safetensors")
            t = load_file(f)
            pre = "model.layers.0.mlp."
            if how == "selection bias missing":
                del t[pre + "gate.e_score_correction_bias"]
            else:
                t[pre + "shared_experts.down_proj.weight_scale_inv"] = torch.ones(3, 5)
            save_file(t, f)
        dist.barrier(group=ctx.world_group)
        start, err = time.monotonic(), None
        try:
            moekit.load_moe_layers(path, ep_group=made[f"ep{tp_rank}"], tp_group=made[f"tp{ep_rank}"], **LOAD)
        except Exception as e:  # noqa: BLE001 - checked below
            err = e
        took = time.monotonic() - start
        ctx.expect(took < 6, f"{how}: rank {ctx.rank} took {took:.1f} s ({type(err).__name__}: {str(err)[:200]})")
        if ctx.rank != bad:
            ctx.expect(isinstance(err, RuntimeError) and f"rank {bad}" in str(err),
                       f"{how}: rank {ctx.rank} raised {type(err).__name__}: {str(err)[:300]}")
        dist.barrier(group=ctx.world_group)


@check(4)
def loaded_fp8_ep4_hierarchical_rebalance(ctx):
    # fp8 block DeepSeek-V3 (2 expert groups) under EP over 4 ranks, round_robin, 4 redundant experts; rebalanced
    # hierarchically over 2 "nodes" (an expert group's replicas on one node) and then globally: slots and outputs
    from moekit.parallel.rebalance import rebalance

    path = ds3_fp8(ctx)
    ref = _only(moekit.load_moe_layers(path, **LOAD))
    par = moekit.load_moe_layers(path, ep_group=ctx.world_group, enable_eplb=True, num_redundant_experts=4,
                                 expert_placement_strategy="round_robin", **LOAD)
    layer = _only(par)
    _slots_hold(ctx, layer, ref, "EP4 loaded")
    skew = torch.zeros(E)
    skew[[0, 4]] = 5.0  # experts 0 and 4 (EP rank 0; one of each expert group) hot
    x, lg = _tokens(ctx, [13, 0, 6, 1], 32, seed=17, skew=skew)
    x = x.bfloat16()
    want = ref(x, lg)
    expect_rel_close(ctx, layer(x, lg), want, "EP4 before", 1e-2)
    for nodes, policy in ((2, "hierarchical"), (1, "global")):
        stats = rebalance(par, num_nodes=nodes)[0]
        ctx.expect(stats["policy"] == policy, f"num_nodes={nodes}: policy {stats['policy']}")
        _slots_hold(ctx, layer, ref, f"EP4 after num_nodes={nodes}")
        for mode in ("all_to_all", "all_gather"):
            layer.expert_executor.mode = mode
            expect_rel_close(ctx, layer(x, lg), want, f"EP4 num_nodes={nodes} {mode}", 1e-2)
        layer.expert_executor.mode = "auto"


def _grid(ctx, seconds=8):
    """A 2 x 2 grid of fresh groups with a short timeout (rank = 2·ep_rank + tp_rank): (ep group, tp group)."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=seconds)
    made = {name: dist.new_group(ranks, timeout=timeout)
            for name, ranks in (("tp0", [0, 1]), ("tp1", [2, 3]), ("ep0", [0, 2]), ("ep1", [1, 3]))}
    ep_rank, tp_rank = divmod(ctx.rank, 2)
    return made[f"ep{tp_rank}"], made[f"tp{ep_rank}"]


def _timed(fn):
    import time

    start, err = time.monotonic(), None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the caller checks it
        err = e
    return err, time.monotonic() - start


@check(4)
def grid_failures_and_mismatches_reach_every_rank(ctx):
    # round 52's review, each on a 2 x 2 EP x TP grid with an 8 s timeout; every rank must raise well before it:
    # (1) rank 1 builds the layer with another top_k: the EP agreement {1, 3} fails, {0, 2} passes, and the TP
    #     agreement ran on only for ranks 0 / 2 (ranks 1 / 3 had raised: they waited until the timeout); now every
    #     rank raises ValueError (SettingsDiffer) in the same pass, directly (FusedMoE) and through load_moe_layers
    #     (rank 1's config.json with another top_k);
    # (2) rank 1 fails inside build_layer before the agreement (its gate's allocation): its last sync met the peers'
    #     agreement, which read the failure as settings (KeyError) and then waited; now they raise PeerFailed naming
    #     rank 1, and rank 1 its own error;
    # (3) FusedMoE built directly where rank 1 fails before the agreement (another num_experts: its placement raises):
    #     the peers waited in the agreement; now they raise PeerFailed naming it
    # (4) FusedMoE ranks that differ only in a routing setting (renormalize) or swiglu_limit: they built alike and
    #     computed differently (under TP each rank routes the same tokens itself); now ValueError everywhere
    # (5) rank 0's checkpoint has one MoE layer fewer: on the grid, rank 3 (no group with rank 0) went on to the next
    #     layer's agreement and waited (or, with one layer more, returned normally); now every rank raises
    import json

    import torch.distributed as dist

    from moekit.loading import modules
    from moekit.parallel.sync import PeerFailed, SettingsDiffer

    ep, tp = _grid(ctx)
    k = 3 if ctx.rank == 1 else 2
    err, took = _timed(lambda: moekit.FusedMoE(E, k, 32, 32, ep_group=ep, tp_group=tp, backend="torch"))
    ctx.expect(isinstance(err, SettingsDiffer) and took < 6, f"(1) FusedMoE: {type(err).__name__} {took:.1f} s {err}")
    dist.barrier(group=ctx.world_group)
    path = ds3_fp8(ctx)
    if ctx.rank == 1:
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["num_experts_per_tok"] = 3
        json.dump(cfg, open(cfg_path, "w"))
    dist.barrier(group=ctx.world_group)
    ep, tp = _grid(ctx)
    err, took = _timed(lambda: moekit.load_moe_layers(path, ep_group=ep, tp_group=tp, **LOAD))
    ctx.expect(isinstance(err, SettingsDiffer) and took < 6 and "config.json: model.layers." in str(err),
               f"(1) load: {type(err).__name__} {took:.1f} s {err}")  # (round 56: the file and block named)
    dist.barrier(group=ctx.world_group)
    path = ds3_fp8(ctx)
    real = modules.build_layer

    def failing(*a, **kw):
        if ctx.rank == 1:
            raise MemoryError("out of memory allocating the gate (simulated)")
        return real(*a, **kw)

    modules.build_layer = failing
    import moekit.loading.loader as loader

    loader_real, loader.build_layer = loader.build_layer, failing
    try:
        ep, tp = _grid(ctx)
        err, took = _timed(lambda: moekit.load_moe_layers(path, ep_group=ep, tp_group=tp, **LOAD))
    finally:
        modules.build_layer, loader.build_layer = real, loader_real
    want = MemoryError if ctx.rank == 1 else PeerFailed
    ctx.expect(isinstance(err, want) and took < 6, f"(2) rank {ctx.rank}: {type(err).__name__} {took:.1f} s {err}")
    if ctx.rank != 1:
        ctx.expect("rank 1" in str(err) and "simulated" in str(err), f"(2) rank {ctx.rank}: {err}")
    dist.barrier(group=ctx.world_group)
    ep, tp = _grid(ctx)
    n = 7 if ctx.rank == 1 else 8  # (7 experts do not split over the EP group of 2: rank 1's placement raises)
    err, took = _timed(lambda: moekit.FusedMoE(n, 2, 32, 32, ep_group=ep, tp_group=tp, backend="torch"))
    want = ValueError if ctx.rank == 1 else PeerFailed
    ctx.expect(isinstance(err, want) and took < 6, f"(3) rank {ctx.rank}: {type(err).__name__} {took:.1f} s {err}")
    dist.barrier(group=ctx.world_group)
    for kw in ({"renormalize": ctx.rank != 2}, {"swiglu_limit": 7.0 if ctx.rank == 3 else None}):
        ep, tp = _grid(ctx)
        err, took = _timed(lambda: moekit.FusedMoE(E, 2, 32, 32, ep_group=ep, tp_group=tp, backend="torch", **kw))
        ctx.expect(isinstance(err, ValueError) and took < 6, f"(4) {kw}: {type(err).__name__} {took:.1f} s {err}")
        dist.barrier(group=ctx.world_group)
    for fewer in (0, 3):  # rank `fewer` has one MoE layer where the others have two
        path = _two_layers(ctx, ds3_fp8(ctx), ctx.rank != fewer)
        dist.barrier(group=ctx.world_group)
        ep, tp = _grid(ctx)
        err, took = _timed(lambda: moekit.load_moe_layers(path, ep_group=ep, tp_group=tp, **LOAD))
        ctx.expect(isinstance(err, PeerFailed) and took < 6 and "while rank" in str(err),
                   f"(5) rank {fewer} fewer: rank {ctx.rank} {type(err).__name__} {took:.1f} s {err}")
        dist.barrier(group=ctx.world_group)


def _two_layers(ctx, path: str, two: bool) -> str:
    """``path`` (one MoE layer), with a second layer copied from the first when ``two``."""
    import json

    if two:
        from safetensors.torch import load_file

        f = os.path.join(path, "model.safetensors")
        t = load_file(f)
        first = {k: v for k, v in t.items() if k.startswith("model.layers.0.")}
        t.update({k.replace("layers.0.", "layers.1."): v.clone() for k, v in first.items()})
        save_file(t, f)
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["num_hidden_layers"] = 2
        json.dump(cfg, open(cfg_path, "w"))
    return path


@check(2)
def layer_counts_differ_and_bad_groups(ctx):
    # round 52's review: ranks whose checkpoints plan different numbers of MoE layers (rank 1's config says 2 layers,
    # rank 0's 1): the shorter returned, the longer waited in its next layer's agreement; now both raise at once. And
    # a group that is no ProcessGroup names the argument (it was an AttributeError from the first sync)
    import datetime

    import torch.distributed as dist

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=8))
    path = _two_layers(ctx, ds3_fp8(ctx), ctx.rank == 1)  # a second MoE layer on rank 1, copied from the first
    dist.barrier(group=ctx.world_group)
    err, took = _timed(lambda: moekit.load_moe_layers(path, ep_group=group, **LOAD))
    ctx.expect(err is not None and took < 6, f"rank {ctx.rank}: {type(err).__name__} {took:.1f} s {err}")
    dist.barrier(group=ctx.world_group)
    for bad in ("world", 3):
        err, _ = _timed(lambda: moekit.load_moe_layers(path, ep_group=bad, **LOAD))
        ctx.expect(isinstance(err, TypeError) and "ep_group" in str(err), f"ep_group={bad!r}: {err!r}")
