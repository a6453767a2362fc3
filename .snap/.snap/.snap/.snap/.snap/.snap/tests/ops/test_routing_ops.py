"""Routing ops (SPEC §2) against the naive float64 router of tests/reference.py.

fused_topk, fused_topk_bias (bias, hash routing, sqrtsoftplus), grouped_topk and the GroupedTopk module,
on awkward shapes (T = 0, 1, primes; K = 1, K = E; E not a power of two), tied logits and batch invariance.
"""

import pytest
import torch

import moekit
from moekit import GroupedTopk, fused_topk, fused_topk_bias, grouped_topk
from reference import assert_tie_free, ref_hash_route, ref_route, spread_logits

SCORING = ["softmax", "sigmoid", "sqrtsoftplus"]


def _check(w, ids, ref_w, ref_ids, k=None):
    """float32 weights / int32 ids, ids exactly equal, weights within fp32 tolerance of float64."""
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ref_w.shape and ids.shape == ref_ids.shape
    assert torch.equal(ids.long(), ref_ids), (ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ fused_topk
@pytest.mark.parametrize("scoring_func", SCORING)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("t,e,k", [(1, 6, 2), (7, 12, 3), (13, 20, 1), (31, 6, 6)])
def test_fused_topk_matches_reference(scoring_func, renormalize, t, e, k):
    # every scoring func x renormalise; T = 1 / primes; E = 6, 12, 20 (not powers of two); K = 1 and K = E
    logits = spread_logits(t, e)
    w, ids, src = fused_topk(None, logits, k, renormalize, scoring_func=scoring_func)
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func=scoring_func, renormalize=renormalize)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)
    # the seed's third output: source row k * T + t
    expect = torch.arange(k).unsqueeze(0) * t + torch.arange(t).unsqueeze(1)
    assert src.shape == (t, k) and torch.equal(src.long(), expect)


def test_fused_topk_random_logits_any_dtype():
    # non-laddered random logits in fp16 / bf16 / fp32 (routing math in fp32; compare to the f64 of the same input)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = (torch.randn(29, 10) * 2).to(dtype)
        w, ids, _ = fused_topk(torch.zeros(29, 4), logits, 3, True)
        ref_w, ref_ids, margin = ref_route(logits.float(), 3, renormalize=True)
        assert_tie_free(margin, 1e-6)
        _check(w, ids, ref_w, ref_ids)


def test_fused_topk_ties_go_to_lower_id():
    # tied logits: equal scores break toward the lower expert id, for every scoring func
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]])
    for sf in SCORING:
        _, ids, _ = fused_topk(None, logits, 4, False, scoring_func=sf)
        assert ids.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3], [0, 2, 4, 1]], sf
        _, ref_ids, _ = ref_route(logits, 4, scoring_func=sf)
        assert torch.equal(ids.long(), ref_ids)


def test_fused_topk_empty_batch():
    # T = 0: empty [0, K] outputs, right dtypes
    w, ids, src = fused_topk(torch.empty(0, 8), torch.empty(0, 6), 2, True)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and src.shape == (0, 2)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize("indices_type", [torch.int64, torch.int32])
def test_fused_topk_indices_type(indices_type):
    # indices_type picks the id dtype (seed behaviour); weights stay float32
    logits = spread_logits(5, 8)
    w, ids, _ = fused_topk(None, logits, 2, False, indices_type=indices_type)
    assert ids.dtype == indices_type and w.dtype == torch.float32
    assert torch.equal(ids.long(), ref_route(logits, 2)[1])


def test_fused_topk_batch_invariance():
    # a token's ids and weights are identical alone and inside a batch (bitwise)
    logits = torch.randn(37, 20)
    w, ids, _ = fused_topk(None, logits, 4, True)
    for i in (0, 17, 36):
        wi, idsi, _ = fused_topk(None, logits[i : i + 1].clone(), 4, True)
        assert torch.equal(idsi, ids[i : i + 1]) and torch.equal(wi, w[i : i + 1])
    # and deterministic across calls
    w2, ids2, _ = fused_topk(None, logits, 4, True)
    assert torch.equal(w, w2) and torch.equal(ids, ids2)


# ------------------------------------------------------------------ fused_topk_bias
@pytest.mark.parametrize("scoring_func", SCORING)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_fused_topk_bias_matches_reference(scoring_func, renormalize, scale):
    # bias picks, unbiased scores weigh; renormalise, then *= routed_scaling_factor
    t, e, k = 13, 12, 4
    logits = spread_logits(t, e)
    bias = torch.randperm(e).float() * 0.013
    w, ids = fused_topk_bias(None, logits, bias, k, renormalize, scoring_func=scoring_func,
                             routed_scaling_factor=scale)
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func=scoring_func, renormalize=renormalize, bias=bias,
                                       routed_scaling_factor=scale)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)


def test_fused_topk_bias_changes_selection_not_weights():
    # a large bias on expert 5 forces it into every top-k while its weight stays its unbiased score
    logits = spread_logits(7, 6)
    bias = torch.zeros(6)
    bias[5] = 100.0
    w, ids = fused_topk_bias(None, logits, bias, 2, False, scoring_func="sigmoid")
    assert (ids[:, 0] == 5).all()
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits[:, 5]))


@pytest.mark.parametrize("scoring_func", SCORING)
@pytest.mark.parametrize("renormalize", [False, True])
def test_hash_routing_matches_reference(scoring_func, renormalize):
    # hash routing: ids = table[input_ids]; weights from unbiased scores; renormalise; scale
    vocab, e, k, t = 50, 12, 3, 17
    table = torch.stack([torch.randperm(e)[:k] for _ in range(vocab)]).to(torch.int32)
    input_ids = torch.randint(0, vocab, (t,))
    logits = torch.randn(t, e)
    w, ids = fused_topk_bias(None, logits, None, k, renormalize, scoring_func=scoring_func,
                             routed_scaling_factor=1.5, input_tokens=input_ids, hash_indices_table=table)
    ref_w, ref_ids = ref_hash_route(logits, table, input_ids, scoring_func=scoring_func, renormalize=renormalize,
                                    routed_scaling_factor=1.5)
    _check(w, ids, ref_w, ref_ids)


def test_hash_routing_ignores_bias():
    # with a hash table the bias does not select (ids come from the table)
    table = torch.tensor([[3, 1], [0, 2]])
    logits = torch.randn(4, 4)
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])
    _, ids = fused_topk_bias(None, logits, bias, 2, False, input_tokens=torch.tensor([1, 1, 0, 1]),
                             hash_indices_table=table)
    assert ids.tolist() == [[0, 2], [0, 2], [3, 1], [0, 2]]


# ------------------------------------------------------------------ grouped_topk
GROUPED_CASES = [
    # (E, G, topk_group, K)
    (12, 4, 2, 3),
    (20, 5, 3, 4),
    (6, 3, 1, 2),
    (6, 6, 2, 2),  # one-expert groups (G == E)
    (8, 8, 8, 8),  # K = E, all groups kept
    (12, 1, 1, 5),  # G = 1: ungrouped
]


@pytest.mark.parametrize("e,g,kg,k", GROUPED_CASES)
@pytest.mark.parametrize("scoring_func", SCORING)
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_topk_matches_reference(e, g, kg, k, scoring_func, with_bias):
    # group score = top-2 sum with bias / max without; 1-expert groups; renormalise then scale
    t = 31
    logits = spread_logits(t, e)
    bias = torch.randperm(e).float() * 0.011 if with_bias else None
    w, ids = grouped_topk(None, logits, k, True, g, kg, scoring_func, 2.5, bias)
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func=scoring_func, renormalize=True, bias=bias,
                                       num_expert_group=g, topk_group=kg, routed_scaling_factor=2.5)
    assert_tie_free(margin)
    _check(w, ids, ref_w, ref_ids)


def test_grouped_topk_excludes_dropped_groups():
    # experts of dropped groups are never picked, even when their own score is the global best
    # group 0 = {0, 1}: max 5 (best single expert overall); group 1 = {2, 3}; group 2 = {4, 5}
    logits = torch.tensor([[5.0, -9.0, 4.0, 4.5, 3.0, 3.2]])
    # with a (zero) bias the group score is the top-2 sum: g0 = -4, g1 = 8.5, g2 = 6.2 -> keep g1, g2
    _, ids = grouped_topk(None, logits, 2, False, 3, 2, "softmax", 1.0, None)
    assert sorted(ids[0].tolist()) == [0, 3]  # without bias: max per group -> g0 (5) and g1 (4.5) kept
    _, ids = grouped_topk(None, logits, 2, False, 3, 2, "sigmoid", 1.0, torch.zeros(6))
    assert ids[0].tolist() == [3, 2]  # g0 dropped despite holding the top expert


def test_grouped_topk_dropped_group_is_minus_inf_not_zero():
    # with sigmoid scores pushed negative by the bias, a dropped expert scored 0 would win: it must not
    logits = torch.full((1, 4), -30.0)
    logits[0, 0] = 30.0  # group 0 strongest
    bias = torch.tensor([0.0, -5.0, -5.0, -5.0])
    _, ids = grouped_topk(None, logits, 2, False, 2, 1, "sigmoid", 1.0, bias)
    assert ids[0].tolist() == [0, 1]


def test_grouped_topk_ties():
    # tied group scores keep the lower group; tied experts pick the lower id
    logits = torch.zeros(3, 8)
    _, ids = grouped_topk(None, logits, 3, False, 4, 2, "softmax")
    assert ids.tolist() == [[0, 1, 2]] * 3
    _, ids = grouped_topk(None, logits, 3, False, 4, 2, "sigmoid", 1.0, torch.zeros(8))
    assert ids.tolist() == [[0, 1, 2]] * 3


def test_grouped_topk_empty_and_output_dtypes():
    # T = 0 and the float32 / int32 contract
    w, ids = grouped_topk(None, torch.empty(0, 8), 2, True, 4, 2)
    assert w.shape == (0, 2) and w.dtype == torch.float32 and ids.dtype == torch.int32
    w, ids = grouped_topk(None, torch.randn(3, 8, dtype=torch.bfloat16), 2, True, 4, 2, "sigmoid")
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


def test_grouped_topk_batch_invariance():
    # ids/weights of a token identical alone and in a batch
    logits = torch.randn(23, 16)
    bias = torch.randn(16) * 0.1
    w, ids = grouped_topk(None, logits, 4, True, 4, 2, "sigmoid", 2.0, bias)
    for i in (0, 11, 22):
        wi, idsi = grouped_topk(None, logits[i : i + 1].clone(), 4, True, 4, 2, "sigmoid", 2.0, bias)
        assert torch.equal(idsi, ids[i : i + 1]) and torch.equal(wi, w[i : i + 1])


# ------------------------------------------------------------------ GroupedTopk module
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_topk_module(with_bias):
    # forward (best backend for the device) and forward_native (torch twin) agree with the reference
    e, g, kg, k, t = 20, 4, 2, 3, 13
    mod = GroupedTopk(k, True, g, kg, "sigmoid", 1.7)
    assert isinstance(mod, torch.nn.Module)
    logits = spread_logits(t, e)
    bias = torch.randperm(e).float() * 0.012 if with_bias else None
    ref_w, ref_ids, margin = ref_route(logits, k, scoring_func="sigmoid", renormalize=True, bias=bias,
                                       num_expert_group=g, topk_group=kg, routed_scaling_factor=1.7)
    assert_tie_free(margin)
    for fn in (mod.forward_native, mod, mod.forward):
        w, ids = fn(torch.zeros(t, 4), logits, bias)
        _check(w, ids, ref_w, ref_ids)


def test_grouped_topk_module_keeps_seed_attributes():
    # the seed's constructor arguments are attributes
    mod = GroupedTopk(topk=2, renormalize=False, num_expert_group=2, topk_group=1, scoring_func="softmax",
                      routed_scaling_factor=3.0, num_fused_shared_experts=0)
    assert (mod.topk, mod.renormalize, mod.num_expert_group, mod.topk_group) == (2, False, 2, 1)
    assert mod.scoring_func == "softmax" and mod.routed_scaling_factor == 3.0 and mod.num_fused_shared_experts == 0


def test_top_level_exports():
    # SPEC: public names importable from moekit
    for name in ("fused_topk", "fused_topk_bias", "grouped_topk", "GroupedTopk", "RoutingMethodType"):
        assert hasattr(moekit, name)


def test_deepseek_v3_size_and_non_contiguous_logits():
    # DeepSeek-V3 sizes (E = 256, G = 8, topk_group = 4, K = 8) from transposed (non-contiguous) logits
    t, e = 13, 256
    logits = spread_logits(t, e, scale=0.05).t().contiguous().t()
    assert not logits.is_contiguous()
    bias = torch.randperm(e).float() * 1e-3
    w, ids = grouped_topk(None, logits, 8, True, 8, 4, "sigmoid", 2.5, bias)
    ref_w, ref_ids, margin = ref_route(logits, 8, scoring_func="sigmoid", renormalize=True, bias=bias,
                                       num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)
    assert_tie_free(margin, 1e-6)
    _check(w, ids, ref_w, ref_ids)
    w2, ids2, _ = fused_topk(None, logits[:, ::2], 6, True, scoring_func="sqrtsoftplus")
    ref_w2, ref_ids2, margin2 = ref_route(logits[:, ::2], 6, scoring_func="sqrtsoftplus", renormalize=True)
    assert_tie_free(margin2, 1e-6)
    _check(w2, ids2, ref_w2, ref_ids2)


def test_float64_logits_beyond_float32_range_are_refused():
    # SPEC §1: any float dtype; the math runs in float32. A float64 logit of 1e39 passed the finiteness check and
    # became +inf in float32: softmax NaN weights, the wrong ids, no error. Now refused like an inf logit
    logits = torch.tensor([[1e39, 0.0, -1.0, 2.0], [0.5, 0.1, 0.2, 0.3]], dtype=torch.float64)
    with pytest.raises(ValueError, match="gating_output holds float64 values beyond float32's range"):
        fused_topk(torch.zeros(2, 8), logits, 2, True)
    with pytest.raises(ValueError, match="gating_output holds float64"):
        fused_topk_bias(torch.zeros(2, 8), logits, torch.zeros(4), 2, True)
    w, ids, *_ = fused_topk(torch.zeros(2, 8), logits.clamp(max=3e38), 2, True)  # within range: routed
    assert ids[0, 0] == 0 and torch.isfinite(w).all()
