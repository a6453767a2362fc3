"""Whole layers in the style of real models (SPEC §1-§3), each against the naive float64 layer.

LongCat-Flash (zero experts, bias, routed_scaling_factor both ways, all-zero-expert routing), DeepSeek-V3
(grouped sigmoid, bias, scaling, shared experts), Qwen2-MoE (sigmoid shared_expert_gate), gpt-oss
(swigluoai, biases), Llama 4 (custom sigmoid top-1 on the input, shared expert), Mixtral (softmax top-2).
"""

import copy

import pytest
import torch

from moekit import CustomRoutingRouter, FusedMoE, GroupedTopKRouter, ZeroExpertRouter
from reference import (
    GatedMLP,
    assert_close_dtype,
    assert_tie_free,
    llama4_routing_function,
    make_expert_weights,
    ref_layer,
    ref_llama4_routing,
    ref_route,
    spread_logits,
)


def f64(m):
    return copy.deepcopy(m).double() if m is not None else None


def _route(k, **kw):
    def fn(x, logits):
        w, ids, margin = ref_route(logits, k, **kw)
        assert_tie_free(margin)
        return w, ids

    return fn


def _load(layer, e, inter, h, dtype=torch.float32, bias=False, gated=True):
    w13, w2, b13, b2 = make_expert_weights(e, inter, h, bias=bias, dtype=dtype, gated=gated)
    layer.load_expert_weights(w13, w2, b13, b2)
    return w13, w2, b13, b2


# ------------------------------------------------------------------ LongCat-Flash
E_LC, Z_LC, K_LC, H_LC, I_LC, S_LC = 12, 4, 4, 24, 8, 6.0


def _longcat(scale_on_output, bias, dtype=torch.float32, shared=None):
    layer = FusedMoE(E_LC, K_LC, H_LC, I_LC, params_dtype=dtype, renormalize=False, zero_expert_type="identity",
                     e_score_correction_bias=bias, routed_scaling_factor=S_LC,
                     apply_routed_scale_to_output=scale_on_output, shared_experts=shared, backend="torch")
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_longcat_flash_scale_both_ways(dtype):
    # zero experts + bias + routed_scaling_factor; weights-scaled and output-scaled layers agree with each other
    # and with the reference (zero output added before output scaling)
    bias = torch.randperm(E_LC + Z_LC).float() * 0.013
    a = _longcat(False, bias, dtype)
    w13, w2, _, _ = _load(a, E_LC, I_LC, H_LC, dtype)
    b = _longcat(True, bias, dtype)
    b.load_expert_weights(w13, w2)
    assert isinstance(a.router, ZeroExpertRouter)
    t = 31
    x = torch.randn(t, H_LC).to(dtype)
    logits = spread_logits(t, E_LC + Z_LC, scale=0.3)
    _, ids, _ = ref_route(logits, K_LC, bias=bias)
    assert (ids >= E_LC).any() and (ids < E_LC).any()  # both kinds of slot are exercised
    ref = ref_layer(x, logits, route_fn=_route(K_LC, bias=bias, routed_scaling_factor=S_LC), num_experts=E_LC,
                    w13=w13, w2=w2)
    ref_out = ref_layer(x, logits, route_fn=_route(K_LC, bias=bias), num_experts=E_LC, w13=w13, w2=w2,
                        scale_on_output=S_LC)
    torch.testing.assert_close(ref, ref_out)  # the two orders agree in exact arithmetic
    out_a, out_b = a(x, logits), b(x, logits)
    assert_close_dtype(out_a, ref, dtype)
    assert_close_dtype(out_b, ref, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_on_output", [False, True])
def test_longcat_all_zero_expert_routing(scale_on_output):
    # every slot routed to a zero expert: output is exactly the zero contribution (+ shared)
    bias = torch.tensor([0.0] * E_LC + [50.0] * Z_LC)
    shared = GatedMLP(H_LC, 8)
    layer = _longcat(scale_on_output, bias, shared=shared)
    w13, w2, _, _ = _load(layer, E_LC, I_LC, H_LC)
    x, logits = torch.randn(9, H_LC), torch.randn(9, E_LC + Z_LC)
    out = layer(x, logits)
    ref = ref_layer(x, logits, route_fn=_route(K_LC, bias=bias, routed_scaling_factor=S_LC), num_experts=E_LC,
                    w13=w13, w2=w2, shared_experts=f64(shared))
    assert_close_dtype(out, ref, torch.float32)
    if not scale_on_output:
        # exactly zero + shared: the routed experts add nothing at all
        zero = layer.router.route(x, logits).zero_contribution(x)
        assert torch.equal(out, zero + shared(x))
        no_shared = _longcat(False, bias)
        no_shared.load_expert_weights(w13, w2)
        assert torch.equal(no_shared(x, logits), zero)


def test_longcat_transform_sees_zero_output():
    # zero experts are computed from x_routed and added before routed_output_transform (SPEC §3)
    bias = torch.randperm(E_LC + Z_LC).float() * 0.0173
    down, up = torch.nn.Linear(32, H_LC, bias=False), torch.nn.Linear(H_LC, 32, bias=False)
    layer = FusedMoE(E_LC, K_LC, H_LC, I_LC, renormalize=False, zero_expert_type="identity",
                     e_score_correction_bias=bias, routed_scaling_factor=S_LC, apply_routed_scale_to_output=True,
                     routed_input_transform=down, routed_output_transform=up, backend="torch")
    w13, w2, _, _ = _load(layer, E_LC, I_LC, H_LC)
    x, logits = torch.randn(13, 32), spread_logits(13, E_LC + Z_LC, scale=0.3)
    ref = ref_layer(x, logits, route_fn=_route(K_LC, bias=bias), num_experts=E_LC, w13=w13, w2=w2,
                    scale_on_output=S_LC, routed_input_transform=f64(down), routed_output_transform=f64(up))
    assert_close_dtype(layer(x, logits), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_zero_routing_is_rounded_once(dtype):
    # every slot goes to a zero expert: the output is exactly round(x · Σw · s), with the scale applied
    # on the output, rounded once (SPEC §3)
    e, z, k, t, h = 2, 2, 2, 64, 32
    bias = torch.tensor([-100.0, -100.0, 100.0, 100.0])
    layer = FusedMoE(e, k, h, 8, e_score_correction_bias=bias, zero_expert_type="identity",
                     renormalize=False, routed_scaling_factor=2.5, apply_routed_scale_to_output=True,
                     params_dtype=dtype)
    layer.load_expert_weights(*make_expert_weights(e, 8, h, dtype=dtype)[:2])  # never used: no real slot
    x, logits = torch.randn(t, h).to(dtype), torch.randn(t, e + z)
    w = torch.softmax(logits, -1)[:, e:].sum(-1)  # both zero experts are picked for every token
    want = ((x.float() * w.unsqueeze(-1)) * 2.5).to(dtype)  # SPEC order: zero = x·Σw, then the output scale
    assert torch.equal(layer(x, logits), want)


# ------------------------------------------------------------------ DeepSeek-V3
@pytest.mark.parametrize("scale_on_output", [False, True])
def test_deepseek_v3(scale_on_output):
    # grouped sigmoid routing with bias (top-2-sum group score), renormalise, scale 2.5, a shared expert
    e, k, g, kg, h, inter, s = 32, 4, 8, 3, 32, 8, 2.5
    bias = torch.randperm(e).float() * 0.007
    shared = GatedMLP(h, 16)
    gate = torch.nn.Linear(h, e, bias=False)
    layer = FusedMoE(e, k, h, inter, use_grouped_topk=True, num_expert_group=g, topk_group=kg,
                     scoring_func="sigmoid", e_score_correction_bias=bias, routed_scaling_factor=s, renormalize=True,
                     shared_experts=shared, gate=gate, apply_routed_scale_to_output=scale_on_output, backend="torch")
    assert isinstance(layer.router, GroupedTopKRouter)
    w13, w2, _, _ = _load(layer, e, inter, h)
    x = torch.randn(23, h)
    route = _route(k, scoring_func="sigmoid", renormalize=True, bias=bias, num_expert_group=g, topk_group=kg,
                   routed_scaling_factor=1.0 if scale_on_output else s)
    ref = ref_layer(x, None, route_fn=route, num_experts=e, w13=w13, w2=w2, gate=f64(gate),
                    shared_experts=f64(shared), scale_on_output=s if scale_on_output else None)
    assert_close_dtype(layer(x), ref, torch.float32)


# ------------------------------------------------------------------ Qwen2-MoE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen2_moe_shared_expert_gate(dtype):
    # softmax top-4 without renormalisation, a shared expert scaled by sigmoid(shared_expert_gate(h))
    e, k, h, inter = 12, 4, 32, 8
    shared, sgate = GatedMLP(h, 24).to(dtype), torch.nn.Linear(h, 1, bias=False).to(dtype)
    layer = FusedMoE(e, k, h, inter, params_dtype=dtype, renormalize=False, shared_experts=shared,
                     shared_expert_gate=sgate, backend="torch")
    w13, w2, _, _ = _load(layer, e, inter, h, dtype)
    x, logits = torch.randn(3, 7, h).to(dtype), spread_logits(21, e).reshape(3, 7, e)
    out = layer(x, logits)
    assert out.shape == (3, 7, h) and out.dtype == dtype
    ref = ref_layer(x, logits, route_fn=_route(k), num_experts=e, w13=w13, w2=w2, shared_experts=f64(shared),
                    shared_expert_gate=f64(sgate))
    assert_close_dtype(out, ref, dtype)


# ------------------------------------------------------------------ gpt-oss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss(dtype):
    # swigluoai (limit 7) with w13 / w2 biases; softmax top-4 renormalised (= softmax over the top-k logits)
    e, k, h, inter = 8, 4, 32, 16
    layer = FusedMoE(e, k, h, inter, params_dtype=dtype, activation="swigluoai", has_bias=True, renormalize=True,
                     swiglu_limit=7.0, backend="torch")
    w13, w2, b13, b2 = make_expert_weights(e, inter, h, bias=True, dtype=dtype, scale=4.0)
    layer.load_expert_weights(w13, w2, b13, b2)
    x, logits = torch.randn(29, h).to(dtype), spread_logits(29, e)
    ref = ref_layer(x, logits, route_fn=_route(k, renormalize=True), num_experts=e, w13=w13, w2=w2, b13=b13, b2=b2,
                    activation="swigluoai", swiglu_limit=7.0)
    assert_close_dtype(layer(x, logits), ref, dtype)
    # renormalised softmax top-k == softmax of the top-k logits (the gpt-oss router)
    w, ids = layer.router.select_experts(x, logits)
    top = logits.gather(1, ids.long())
    torch.testing.assert_close(w, torch.softmax(top, -1))


# ------------------------------------------------------------------ Llama 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4(dtype):
    # custom routing (top-1 of the logits, sigmoid weight) applied on the input, plus a shared expert
    e, h, inter = 16, 32, 16
    shared = GatedMLP(h, 16).to(dtype)
    layer = FusedMoE(e, 1, h, inter, params_dtype=dtype, custom_routing_function=llama4_routing_function,
                     renormalize=False, apply_router_weight_on_input=True, shared_experts=shared, backend="torch")
    assert isinstance(layer.router, CustomRoutingRouter)
    w13, w2, _, _ = _load(layer, e, inter, h, dtype)
    x, logits = torch.randn(19, h).to(dtype), spread_logits(19, e)

    def route(_x, lg):
        w, ids, margin = ref_llama4_routing(lg, 1)
        assert_tie_free(margin)
        return w, ids

    ref = ref_layer(x, logits, route_fn=route, num_experts=e, w13=w13, w2=w2, apply_router_weight_on_input=True,
                    shared_experts=f64(shared))
    assert_close_dtype(layer(x, logits), ref, dtype)
    # on-input differs from on-output for this non-linear expert (the test can tell them apart)
    ref_out = ref_layer(x, logits, route_fn=route, num_experts=e, w13=w13, w2=w2, shared_experts=f64(shared))
    assert (ref_out - ref).abs().max() > 1e-2


# ------------------------------------------------------------------ Mixtral
def test_mixtral():
    # softmax top-2 renormalised, gate module, [B, S, H] input
    e, k, h, inter = 8, 2, 32, 16
    gate = torch.nn.Linear(h, e, bias=False)
    layer = FusedMoE(e, k, h, inter, renormalize=True, gate=gate, backend="torch")
    w13, w2, _, _ = _load(layer, e, inter, h)
    x = torch.randn(2, 11, h)
    ref = ref_layer(x, None, route_fn=_route(k, renormalize=True), num_experts=e, w13=w13, w2=w2, gate=f64(gate))
    assert_close_dtype(layer(x), ref, torch.float32)


# ------------------------------------------------------------------ every style: T = 0, batch invariance
def _styles():
    h = 16
    return {
        "longcat": (dict(num_experts=6, top_k=3, renormalize=False, zero_expert_type="identity",
                         e_score_correction_bias=torch.randn(9) * 0.1, routed_scaling_factor=6.0), 9),
        "deepseek_v3": (dict(num_experts=8, top_k=2, use_grouped_topk=True, num_expert_group=4, topk_group=2,
                             scoring_func="sigmoid", e_score_correction_bias=torch.randn(8) * 0.1,
                             routed_scaling_factor=2.5, shared_experts=GatedMLP(h, 8)), 8),
        "qwen2_moe": (dict(num_experts=6, top_k=2, renormalize=False, shared_experts=GatedMLP(h, 8),
                           shared_expert_gate=torch.nn.Linear(h, 1, bias=False)), 6),
        "gpt_oss": (dict(num_experts=4, top_k=2, activation="swigluoai", has_bias=True), 4),
        "llama4": (dict(num_experts=4, top_k=1, custom_routing_function=llama4_routing_function,
                        renormalize=False, apply_router_weight_on_input=True, shared_experts=GatedMLP(h, 8)), 4),
        "hash": (dict(num_experts=6, top_k=2, hash_indices_table=torch.randint(0, 6, (20, 2)),
                      scoring_func="sqrtsoftplus"), 6),
    }


@pytest.mark.parametrize("style", ["longcat", "deepseek_v3", "qwen2_moe", "gpt_oss", "llama4", "hash"])
def test_every_style_empty_batch_and_batch_invariance(style):
    # T = 0 returns [0, H] for every model style; a token's output alone equals its row in the batch
    kw, n_logits = _styles()[style]
    layer = FusedMoE(hidden_size=16, intermediate_size=8, backend="torch", **kw)
    _load(layer, layer.moe_config.num_experts, 8, 16, bias=layer.moe_config.has_bias)
    ids_kw = (lambda ids: {"input_ids": ids}) if style == "hash" else (lambda ids: {})
    out0 = layer(torch.empty(0, 16), torch.empty(0, n_logits), **ids_kw(torch.empty(0, dtype=torch.long)))
    assert out0.shape == (0, 16)
    x, logits, tok = torch.randn(11, 16), torch.randn(11, n_logits), torch.randint(0, 20, (11,))
    full = layer(x, logits, **ids_kw(tok))
    assert torch.isfinite(full).all()
    for i in (0, 5, 10):
        alone = layer(x[i : i + 1], logits[i : i + 1], **ids_kw(tok[i : i + 1]))
        torch.testing.assert_close(alone, full[i : i + 1], atol=1e-6, rtol=1e-6)
