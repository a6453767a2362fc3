"""Router objects (SPEC §2): FusedTopKRouter, FusedTopKBiasRouter (bias and hash), GroupedTopKRouter,
CustomRoutingRouter; routed_scaling_factor after renormalisation in every router; routing_method_type;
indices_type; batch invariance."""

import pytest
import torch

from moekit import (
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
    RoutingMethodType,
    ZeroExpertRouter,
)
from reference import (
    assert_tie_free,
    llama4_routing_function,
    ref_hash_route,
    ref_llama4_routing,
    ref_route,
    spread_logits,
)


def _check(w, ids, ref_w, ref_ids, id_dtype=torch.int32):
    assert w.dtype == torch.float32 and ids.dtype == id_dtype
    assert torch.equal(ids.long(), ref_ids), (ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ FusedTopKRouter
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("t,e,k", [(1, 6, 1), (13, 20, 4), (7, 12, 12)])
def test_fused_topk_router(scoring_func, renormalize, t, e, k):
    # every scoring func; scale applied after renormalisation (the seed ignored it here; moekit does not)
    r = FusedTopKRouter(k, e, renormalize=renormalize, scoring_func=scoring_func, routed_scaling_factor=2.5)
    logits = spread_logits(t, e)
    w, ids = r.select_experts(torch.randn(t, 8), logits)
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func=scoring_func, renormalize=renormalize,
                                       routed_scaling_factor=2.5)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)
    if renormalize:  # weights sum to the scale: renormalise first, then scale
        torch.testing.assert_close(w.sum(-1), torch.full((t,), 2.5))


def test_fused_topk_router_empty_and_ties():
    # T = 0, and tied logits pick the lower id
    r = FusedTopKRouter(2, 6)
    w, ids = r.select_experts(torch.empty(0, 4), torch.empty(0, 6))
    assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == torch.int32
    _, ids = r.select_experts(torch.zeros(2, 4), torch.tensor([[0.0, 1, 1, 1, 0, 0], [2.0, 2, 2, 2, 2, 2]]))
    assert ids.tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("indices_type", [torch.int64, torch.int32, None])
def test_indices_type_getter(indices_type):
    # indices_type_getter picks the id dtype (seed behaviour), int32 by default
    r = FusedTopKRouter(2, 8, indices_type_getter=lambda: indices_type)
    assert r.indices_type == indices_type
    _, ids = r.select_experts(torch.zeros(3, 4), spread_logits(3, 8))
    assert ids.dtype == (indices_type or torch.int32)
    g = GroupedTopKRouter(2, 8, num_expert_group=2, topk_group=1, indices_type_getter=lambda: indices_type)
    assert g.select_experts(torch.zeros(3, 4), spread_logits(3, 8))[1].dtype == (indices_type or torch.int32)


def test_router_is_batch_invariant():
    # a token's ids / weights identical alone and in a batch, for each router kind
    logits = torch.randn(19, 12)
    bias = torch.randn(12) * 0.1
    routers = [
        FusedTopKRouter(3, 12, scoring_func="sigmoid", routed_scaling_factor=1.5),
        FusedTopKBiasRouter(3, 12, e_score_correction_bias=bias, scoring_func="sigmoid"),
        GroupedTopKRouter(3, 12, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                          e_score_correction_bias=bias, routed_scaling_factor=2.0),
    ]
    for r in routers:
        w, ids = r.select_experts(torch.zeros(19, 4), logits)
        for i in (0, 9, 18):
            wi, idsi = r.select_experts(torch.zeros(1, 4), logits[i : i + 1].clone())
            assert torch.equal(idsi, ids[i : i + 1]) and torch.equal(wi, w[i : i + 1])


# ------------------------------------------------------------------ FusedTopKBiasRouter
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_topk_bias_router(scoring_func, renormalize):
    # bias-corrected selection, unbiased weights, renormalise then scale
    t, e, k = 17, 20, 6
    bias = torch.randperm(e).float() * 0.009
    r = FusedTopKBiasRouter(k, e, e_score_correction_bias=bias, scoring_func=scoring_func, renormalize=renormalize,
                            routed_scaling_factor=2.5)
    logits = spread_logits(t, e)
    w, ids = r.select_experts(torch.zeros(t, 4), logits)
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func=scoring_func, renormalize=renormalize, bias=bias,
                                       routed_scaling_factor=2.5)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)


@pytest.mark.parametrize("scoring_func", ["softmax", "sqrtsoftplus"])
def test_hash_router(scoring_func):
    # hash routing (DeepSeek-V4): ids from table[input_ids], weights from the unbiased scores, renormalise, scale
    vocab, e, k, t = 40, 12, 3, 13
    table = torch.stack([torch.randperm(e)[:k] for _ in range(vocab)])
    r = FusedTopKBiasRouter(k, e, hash_indices_table=table, scoring_func=scoring_func, renormalize=True,
                            routed_scaling_factor=1.5)
    logits = torch.randn(t, e)
    input_ids = torch.randint(0, vocab, (t,))
    w, ids = r.select_experts(torch.zeros(t, 4), logits, input_ids=input_ids)
    ref_w, ref_ids = ref_hash_route(logits, table, input_ids, scoring_func=scoring_func, renormalize=True,
                                    routed_scaling_factor=1.5)
    _check(w, ids, ref_w, ref_ids)
    # input_ids with leading dims [B, S] are flattened
    w2, ids2 = r.select_experts(torch.zeros(t - 1, 4), logits[:12], input_ids=input_ids[:12].reshape(3, 4))
    assert torch.equal(ids2, ids[:12])


# ------------------------------------------------------------------ GroupedTopKRouter
@pytest.mark.parametrize("e,g,kg,k", [(12, 4, 2, 3), (20, 5, 3, 4), (6, 6, 3, 2), (16, 8, 8, 16)])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_topk_router(e, g, kg, k, scoring_func, with_bias):
    # grouped routing incl. one-expert groups and K = E; scale after renormalisation
    t = 13
    bias = torch.randperm(e).float() * 0.011 if with_bias else None
    r = GroupedTopKRouter(k, e, num_expert_group=g, topk_group=kg, scoring_func=scoring_func,
                          routed_scaling_factor=2.5, e_score_correction_bias=bias, renormalize=True)
    logits = spread_logits(t, e)
    w, ids = r.select_experts(torch.zeros(t, 4), logits)
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func=scoring_func, renormalize=True, bias=bias,
                                       num_expert_group=g, topk_group=kg, routed_scaling_factor=2.5)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)


# ------------------------------------------------------------------ CustomRoutingRouter
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_custom_router_llama4(scale):
    # Llama 4 style function: ids = topk(logits), w = sigmoid(logits[ids]); moekit applies the scale after
    t, e = 11, 16
    r = CustomRoutingRouter(1, e, custom_routing_function=llama4_routing_function, renormalize=False,
                            routed_scaling_factor=scale)
    logits = spread_logits(t, e)
    w, ids = r.select_experts(torch.zeros(t, 4), logits)
    ref_w, ref_ids, margin = ref_llama4_routing(logits, 1, scale)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)


def test_custom_router_passes_arguments_and_casts():
    # the function receives (hidden_states, gating_output, topk, renormalize); int64 ids become int32,
    # fp16 weights become float32
    seen = {}

    def fn(hidden_states, gating_output, topk, renormalize):
        seen.update(h=hidden_states, g=gating_output, k=topk, r=renormalize)
        ids = torch.arange(topk).repeat(gating_output.shape[0], 1)  # int64
        return torch.full(ids.shape, 0.5, dtype=torch.float16), ids

    r = CustomRoutingRouter(2, 4, custom_routing_function=fn, renormalize=True)
    x, logits = torch.randn(3, 5), torch.randn(3, 4)
    w, ids = r.select_experts(x, logits)
    assert seen["h"] is x and seen["g"] is logits and seen["k"] == 2 and seen["r"] is True
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[0, 1]] * 3 and (w == 0.5).all()


# ------------------------------------------------------------------ routing_method_type
def test_routing_method_type_values():
    # the seed's classification: DeepSeekV3 for grouped sigmoid, Renormalize / Default for softmax,
    # Llama4 for sigmoid top-1, Custom for a custom function, Unspecified otherwise
    bias = torch.zeros(8)
    cases = [
        (GroupedTopKRouter(2, 8, num_expert_group=4, topk_group=2, scoring_func="sigmoid"), "DeepSeekV3"),
        (GroupedTopKRouter(2, 8, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                           e_score_correction_bias=bias), "DeepSeekV3"),
        (GroupedTopKRouter(2, 8, num_expert_group=4, topk_group=2, scoring_func="softmax"), "Unspecified"),
        (FusedTopKRouter(2, 8, renormalize=True), "Renormalize"),
        (FusedTopKRouter(2, 8, renormalize=False), "Default"),
        (FusedTopKRouter(1, 8, scoring_func="sigmoid"), "Llama4"),
        (FusedTopKRouter(2, 8, scoring_func="sigmoid"), "Unspecified"),
        (FusedTopKRouter(2, 8, scoring_func="sqrtsoftplus"), "Unspecified"),
        (FusedTopKBiasRouter(2, 8, e_score_correction_bias=bias, scoring_func="sigmoid"), "Unspecified"),
        (CustomRoutingRouter(1, 8, custom_routing_function=llama4_routing_function), "Custom"),
        (ZeroExpertRouter(2, 6, e_score_correction_bias=bias, num_logical_experts=6, zero_expert_type="identity"),
         "Unspecified"),  # bias-corrected, ungrouped
    ]
    for router, name in cases:
        assert router.routing_method_type == RoutingMethodType[name], (router, name)
    # the enum keeps the seed's values
    assert [m.name for m in sorted(RoutingMethodType)] == [
        "Default", "Renormalize", "DeepSeekV3", "Llama4", "RenormalizeNaive", "TopK", "Custom", "Simulated",
        "Unspecified",
    ]
    assert int(RoutingMethodType.DeepSeekV3) == 2 and int(RoutingMethodType.Unspecified) == 8


def test_seed_constructor_signatures():
    # the seed's positional order: (top_k, global_num_experts, eplb_state, ...)
    r = GroupedTopKRouter(2, 8, None, 4, 2, True, "sigmoid", 2.0, None, 0, False, None)
    assert (r.num_expert_group, r.topk_group, r.routed_scaling_factor) == (4, 2, 2.0)
    r = FusedTopKBiasRouter(2, 8, None, torch.zeros(8), "sigmoid", False, 1.5)
    assert r.routed_scaling_factor == 1.5 and r.renormalize is False
    # the seed's renormalize defaults: True everywhere except the zero-expert router (False)
    assert FusedTopKRouter(2, 8).renormalize is True
    assert FusedTopKBiasRouter(2, 8, e_score_correction_bias=torch.zeros(8)).renormalize is True
    assert GroupedTopKRouter(2, 8, num_expert_group=2, topk_group=1).renormalize is True
    assert CustomRoutingRouter(2, 8, custom_routing_function=llama4_routing_function).renormalize is True
    z = ZeroExpertRouter(2, 6, None, torch.zeros(8), 6, "identity")
    assert z.renormalize is False and z.scoring_func == "softmax" and z.routed_scaling_factor == 1.0


# ------------------------------------------------------------------ ties, every router kind
def _grid_logits(t, e, gen):
    """Logits on a coarse grid (few distinct values per row): many exact ties."""
    return torch.randint(-2, 3, (t, e), generator=gen).float() * 0.5


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_bias", "grouped", "grouped_bias", "zero", "sqrtsoftplus"])
def test_tied_logits_every_router(kind):
    # tied scores (and tied group scores) break toward the lower expert / group id in every router
    gen = torch.Generator().manual_seed(7)
    t, e, k = 41, 12, 4
    logits = _grid_logits(t, e, gen)
    bias = torch.randint(0, 2, (e,), generator=gen).float() * 0.25
    x = torch.zeros(t, 4)
    if kind == "softmax":
        r, kw = FusedTopKRouter(k, e, renormalize=True), dict(renormalize=True)
    elif kind == "sqrtsoftplus":
        r, kw = FusedTopKRouter(k, e, scoring_func="sqrtsoftplus"), dict(scoring_func="sqrtsoftplus", renormalize=True)
    elif kind == "sigmoid_bias":
        r = FusedTopKBiasRouter(k, e, e_score_correction_bias=bias, scoring_func="sigmoid")
        kw = dict(scoring_func="sigmoid", bias=bias, renormalize=True)
    elif kind == "grouped":
        r = GroupedTopKRouter(k, e, num_expert_group=4, topk_group=2)
        kw = dict(num_expert_group=4, topk_group=2, renormalize=True)
    elif kind == "grouped_bias":
        r = GroupedTopKRouter(k, e, num_expert_group=6, topk_group=3, scoring_func="sigmoid",
                              e_score_correction_bias=bias, routed_scaling_factor=2.5)
        kw = dict(num_expert_group=6, topk_group=3, scoring_func="sigmoid", bias=bias, renormalize=True,
                  routed_scaling_factor=2.5)
    else:  # zero experts: 8 real + 4 zero, the bias over all 12
        from moekit import ZeroExpertRouter

        r = ZeroExpertRouter(k, 8, e_score_correction_bias=bias, num_logical_experts=8, zero_expert_type="identity")
        w, ids = r.select_experts(x, logits)
        ref_w, ref_ids, margin = ref_route(logits, k, bias=bias)
        assert_tie_free(margin)
        zero_slot = ref_ids >= 8
        assert zero_slot.any()
        assert torch.equal(ids.long(), ref_ids.masked_fill(zero_slot, 0))
        torch.testing.assert_close(w.double(), ref_w.masked_fill(zero_slot, 0.0), atol=1e-6, rtol=1e-5)
        return
    w, ids = r.select_experts(x, logits)
    ref_w, ref_ids, margin = ref_route(logits, k, **kw)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)
