"""ZeroExpertRouter (SPEC §2, §3): routing over E + Z with the bias, zero-expert contribution, masking,
the read-and-clear ``zero_expert_output``."""

import pytest
import torch

from moekit import ZeroExpertRouter
from moekit.ops.zero_experts import mask_zero_experts, zero_experts_compute_torch
from reference import assert_close_dtype, assert_tie_free, ref_zero_expert_route, spread_logits


def _router(e, z, k, *, bias=None, scale=1.0, renormalize=False, scoring_func="softmax"):
    bias = torch.randperm(e + z).float() * 0.013 if bias is None else bias
    r = ZeroExpertRouter(k, e, e_score_correction_bias=bias, num_logical_experts=e, zero_expert_type="identity",
                         scoring_func=scoring_func, renormalize=renormalize, routed_scaling_factor=scale)
    return r, bias


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_zero_expert_router_matches_reference(scoring_func, renormalize, scale):
    # bias-corrected top-k over E + Z; zero[t] = x[t]·Σ_{id>=E} w (scaled weights); zero slots -> (id 0, w 0)
    e, z, k, t, h = 12, 4, 4, 31, 10
    r, bias = _router(e, z, k, scale=scale, renormalize=renormalize, scoring_func=scoring_func)
    assert r.num_zero_experts == z
    logits = spread_logits(t, e + z, scale=0.3)
    x = torch.randn(t, h)
    w, ids = r.select_experts(x, logits)
    _, raw_ids, ref_w, ref_ids, ref_zero, margin = ref_zero_expert_route(
        logits, x, bias, e, k, scoring_func=scoring_func, renormalize=renormalize, routed_scaling_factor=scale)
    assert_tie_free(margin)
    assert (raw_ids >= e).any() and (raw_ids < e).any()  # the case exercises both kinds of slot
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), ref_ids)
    assert int(ids.max()) < e
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    zero = r.zero_expert_output
    assert zero.shape == (t, h) and zero.dtype == x.dtype
    assert_close_dtype(zero, ref_zero, torch.float32)


def test_zero_expert_output_read_and_clear():
    # the seed's property: returns the last contribution, then None
    r, _ = _router(6, 2, 2)
    assert r.zero_expert_output is None
    x = torch.randn(5, 8)
    r.select_experts(x, torch.randn(5, 8))
    first = r.zero_expert_output
    assert isinstance(first, torch.Tensor) and first.shape == (5, 8)
    assert r.zero_expert_output is None


def test_zero_expert_output_is_per_thread():
    # round 49: one router's side channel was one attribute: a thread read another thread's contribution (or None,
    # the other having read first). Each thread reads its own last select_experts' contribution
    import threading

    r, _ = _router(6, 2, 2)
    xs = [torch.randn(5, 8), torch.randn(7, 8)]
    got = {}

    def work(i):
        r.select_experts(xs[i], torch.randn(xs[i].shape[0], 8))
        barrier.wait()  # both have routed before either reads
        got[i] = r.zero_expert_output
        got[(i, "again")] = r.zero_expert_output

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0].shape == (5, 8) and got[1].shape == (7, 8)
    assert got[(0, "again")] is None and got[(1, "again")] is None
    assert r.zero_expert_output is None  # this thread routed nothing


def test_route_returns_zero_output_without_side_channel():
    # route() hands the contribution in the RoutingResult and equals select_experts + zero_expert_output
    r, _ = _router(6, 3, 3)
    x, logits = torch.randn(9, 8), torch.randn(9, 9)
    res = r.route(x, logits)
    w, ids = r.select_experts(x, logits)
    assert torch.equal(res.topk_weights, w) and torch.equal(res.topk_ids, ids)
    assert res.zero_scale.shape == (9,)  # [T]: the [T, H] contribution is never stored
    assert torch.equal(res.zero_contribution(x), r.zero_expert_output)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_output_low_precision(dtype):
    # zero output has the dtype of hidden_states; sum of weights in fp32
    e, z, k, t = 6, 6, 4, 13
    r, bias = _router(e, z, k, scale=2.0)
    x = torch.randn(t, 16).to(dtype)
    logits = spread_logits(t, e + z).to(dtype)
    r.select_experts(x, logits)
    zero = r.zero_expert_output
    assert zero.dtype == dtype
    *_, ref_zero, _ = ref_zero_expert_route(logits.float(), x.float(), bias, e, k, routed_scaling_factor=2.0)
    assert_close_dtype(zero, ref_zero, dtype)


def test_all_zero_expert_routing():
    # all slots to zero experts: every real slot masked (weight exactly 0), zero = x·Σw
    e, z, k = 4, 4, 3
    bias = torch.tensor([0.0] * e + [100.0] * z)
    r, _ = _router(e, z, k, bias=bias, scale=1.5)
    x, logits = torch.randn(7, 8), torch.randn(7, 8)
    w, ids = r.select_experts(x, logits)
    assert (w == 0).all() and (ids == 0).all()
    zero = r.zero_expert_output
    *_, ref_zero, _ = ref_zero_expert_route(logits, x, bias, e, k, routed_scaling_factor=1.5)
    assert_close_dtype(zero, ref_zero, torch.float32)


def test_no_zero_expert_selected_gives_zero_contribution():
    # zero experts never selected: contribution exactly 0, ids untouched
    e, z, k = 6, 2, 2
    bias = torch.tensor([0.0] * e + [-100.0] * z)
    r, _ = _router(e, z, k, bias=bias)
    x = torch.randn(5, 8)
    w, ids = r.select_experts(x, torch.randn(5, 8))
    assert (w > 0).all()
    assert torch.equal(r.zero_expert_output, torch.zeros(5, 8))


def test_zero_expert_ops():
    # the stateless helpers: contribution from slots id >= E, masking to (0, 0.0), new tensors
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = torch.tensor([[0.25, 0.5], [0.125, 0.75]])
    ids = torch.tensor([[5, 1], [4, 6]], dtype=torch.int32)
    zero = zero_experts_compute_torch(x, w, ids, 4)
    torch.testing.assert_close(zero, torch.tensor([[0.25, 0.5], [3 * 0.875, 4 * 0.875]]))
    mw, mids = mask_zero_experts(w, ids, 4)
    assert mids.tolist() == [[0, 1], [0, 0]] and mw.tolist() == [[0.0, 0.5], [0.0, 0.0]]
    assert ids.tolist() == [[5, 1], [4, 6]]  # inputs untouched


def test_zero_expert_router_requirements():
    # bias required, of length E + Z; logits must have E + Z columns; top_k <= E + Z; unknown type
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        ZeroExpertRouter(2, 4, e_score_correction_bias=None, num_logical_experts=4, zero_expert_type="identity")
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        ZeroExpertRouter(2, 4, e_score_correction_bias=torch.zeros(3), num_logical_experts=4,
                         zero_expert_type="identity")
    with pytest.raises(ValueError, match="zero_expert_type"):
        ZeroExpertRouter(2, 4, e_score_correction_bias=torch.zeros(6), num_logical_experts=4,
                         zero_expert_type="copy")
    with pytest.raises(ValueError, match="top_k"):
        ZeroExpertRouter(7, 4, e_score_correction_bias=torch.zeros(6), num_logical_experts=4,
                         zero_expert_type="identity")
    r = ZeroExpertRouter(6, 4, e_score_correction_bias=torch.zeros(6), num_logical_experts=4,
                         zero_expert_type="identity")  # K = E + Z is fine
    with pytest.raises(ValueError, match="router_logits"):
        r.select_experts(torch.zeros(3, 4), torch.zeros(3, 4))  # E columns instead of E + Z


def test_routing_result_names_the_round_56_change():
    # edges: the old [T, H] zero output handed to RoutingResult, a [T] float64 sum, and reading .zero_output
    from moekit.types import RoutingResult
    w, ids = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"zero_scale must be \[T\] float32 .*got shape \[3, 8\].*no longer taken"):
        RoutingResult(w, ids, torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"got shape \[3\] torch.float64$"):
        RoutingResult(w, ids, torch.zeros(3, dtype=torch.float64))
    res = RoutingResult(w, ids, torch.zeros(3))
    with pytest.raises(AttributeError, match="replaced in round 56 by zero_scale"):
        res.zero_output
    assert res.zero_contribution(torch.ones(3, 4)).shape == (3, 4)


def test_a_kernel_table_with_round_55_zero_signatures_is_refused_when_built():
    # edge: a custom table built for the old zero_slots(x, w, ids, E) / zero_combine(routed, zero, scale): refused when
    # the table is made (it failed at the first LongCat forward with Python's argument-count TypeError); the shipped
    # tables and a replace() with the current twins pass
    import dataclasses

    from moekit.ops.kernels import kernels_for
    from moekit.ops.zero_experts import zero_combine_torch, zero_slots_torch
    table = kernels_for("torch")
    with pytest.raises(TypeError, match=r"zero_slots must take \(topk_weights, topk_ids, num_experts\)"):
        dataclasses.replace(table, zero_slots=lambda x, w, ids, e, extra: None)
    with pytest.raises(TypeError, match=r"zero_combine must take \(routed, x, zero_scale, scale\)"):
        dataclasses.replace(table, zero_combine=lambda routed, zero, scale: None)
    assert dataclasses.replace(table, zero_slots=zero_slots_torch, zero_combine=zero_combine_torch).name == "torch"
