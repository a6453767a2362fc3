"""fused_experts / fused_experts_torch (SPEC §1 step 4, §4) against the naive per-token, per-slot loop.

Covers every activation, biases, apply_router_weight_on_input, expert_map with -1, dtypes (SPEC §4
tolerances), T = 0 / 1 / primes, K = 1 / K = E, E not a power of two, a hot expert, chunk boundaries,
262,144 tokens in one call, and batch invariance.
"""

import pytest
import torch

from moekit import fused_experts, fused_experts_torch
from moekit.ops.experts import chunk_tokens
from reference import assert_close_dtype, make_expert_weights, ref_act, ref_experts

ACTS = ["silu", "gelu", "gelu_tanh", "swigluoai", "relu2"]


def _routing(t, e, k, gen=None):
    """Random distinct ids per token and positive weights (float32)."""
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k)
    w = torch.rand(t, k, generator=gen) + 0.1
    return w.float(), ids.to(torch.int32)


def _case(t, h, inter, e, k, *, activation="silu", bias=False, dtype=torch.float32):
    x = torch.randn(t, h).to(dtype)
    w13, w2, b13, b2 = make_expert_weights(e, inter, h, gated=activation != "relu2", bias=bias, dtype=dtype)
    w, ids = _routing(t, e, k)
    return x, w13, w2, b13, b2, w, ids


# ------------------------------------------------------------------ activations and biases
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_each_activation_fp32(activation, bias):
    # every activation of SPEC §1, with / without w13 and w2 biases, fp32 tolerance vs float64
    x, w13, w2, b13, b2, w, ids = _case(13, 24, 10, 6, 2, activation=activation, bias=bias)
    out = fused_experts_torch(x, w13, w2, w, ids, activation=activation, w1_bias=b13, w2_bias=b2)
    ref = ref_experts(x, w13, w2, w, ids, activation=activation, b13=b13, b2=b2)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close_dtype(out, ref, torch.float32)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "swigluoai"])
def test_swiglu_limit(activation):
    # swiglu_limit on the gated activations (and swigluoai's explicit limit); weights scaled so the clamp bites
    x = torch.randn(11, 16) * 3
    w13, w2, b13, b2 = make_expert_weights(5, 8, 16, bias=True, scale=3.0)
    w, ids = _routing(11, 5, 3)
    out = fused_experts_torch(x, w13, w2, w, ids, activation=activation, w1_bias=b13, w2_bias=b2, swiglu_limit=0.75)
    ref = ref_experts(x, w13, w2, w, ids, activation=activation, b13=b13, b2=b2, swiglu_limit=0.75)
    assert_close_dtype(out, ref, torch.float32)
    # the clamp matters here: without it the output differs
    free = ref_experts(x, w13, w2, w, ids, activation=activation, b13=b13, b2=b2,
                       swiglu_limit=None if activation != "swigluoai" else 100.0)
    assert (free - ref).abs().max() > 1e-2


def test_swigluoai_gpt_oss_style():
    # gpt-oss: swigluoai with the default limit 7, biases, softmax-renormalised weights
    x, w13, w2, b13, b2, _, ids = _case(17, 32, 12, 8, 4, activation="swigluoai", bias=True)
    w = torch.softmax(torch.randn(17, 4), -1)
    out = fused_experts(x, w13 * 4, w2, w, ids, activation="swigluoai", w1_bias=b13, w2_bias=b2)
    ref = ref_experts(x, w13 * 4, w2, w, ids, activation="swigluoai", b13=b13, b2=b2)
    assert_close_dtype(out, ref, torch.float32)


# ------------------------------------------------------------------ apply_router_weight_on_input, expert_map
@pytest.mark.parametrize("bias", [False, True])
def test_apply_router_weight_on_input(bias):
    # K == 1: expert(w · x) (differs from w · expert(x) for a non-linear expert)
    x, w13, w2, b13, b2, w, ids = _case(19, 16, 8, 6, 1, bias=bias)
    out = fused_experts_torch(x, w13, w2, w, ids, apply_router_weight_on_input=True, w1_bias=b13, w2_bias=b2)
    ref = ref_experts(x, w13, w2, w, ids, b13=b13, b2=b2, apply_router_weight_on_input=True)
    assert_close_dtype(out, ref, torch.float32)
    other = ref_experts(x, w13, w2, w, ids, b13=b13, b2=b2)
    assert (other - ref).abs().max() > 1e-3


def test_apply_router_weight_on_input_zero_weight_is_not_skipped():
    # on-input with weight 0 still runs the expert on 0 (biases make that non-zero)
    x, w13, w2, b13, b2, w, ids = _case(5, 8, 4, 3, 1, bias=True)
    w = torch.zeros_like(w)
    out = fused_experts_torch(x, w13, w2, w, ids, apply_router_weight_on_input=True, w1_bias=b13, w2_bias=b2)
    ref = ref_experts(x, w13, w2, w, ids, b13=b13, b2=b2, apply_router_weight_on_input=True)
    assert_close_dtype(out, ref, torch.float32)
    assert ref.abs().max() > 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_expert_map(bias):
    # expert_map [E] maps global ids to local slots, -1 = held elsewhere (contributes exactly 0)
    e_global, h, inter, t, k = 8, 16, 8, 23, 3
    expert_map = torch.tensor([-1, 0, -1, 1, -1, -1, 2, -1], dtype=torch.int32)
    w13, w2, b13, b2 = make_expert_weights(3, inter, h, bias=bias)
    x = torch.randn(t, h)
    w, ids = _routing(t, e_global, k)
    out = fused_experts_torch(x, w13, w2, w, ids, w1_bias=b13, w2_bias=b2, expert_map=expert_map,
                              global_num_experts=e_global)
    ref = ref_experts(x, w13, w2, w, ids, b13=b13, b2=b2, expert_map=expert_map)
    assert_close_dtype(out, ref, torch.float32)
    # tokens routed only to remote experts get exactly 0
    remote = torch.tensor([[0, 2, 4]], dtype=torch.int32)
    out0 = fused_experts_torch(x[:1], w13, w2, w[:1], remote, w1_bias=b13, w2_bias=b2, expert_map=expert_map)
    assert torch.equal(out0, torch.zeros_like(out0))


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,bias", [("silu", False), ("swigluoai", True), ("gelu", True), ("relu2", False)])
def test_low_precision(dtype, activation, bias):
    # bf16 / fp16: relative RMS <= 1e-2 and max error <= 3e-2·max|ref| vs float64 of the same (rounded) inputs
    x, w13, w2, b13, b2, w, ids = _case(31, 64, 32, 12, 4, activation=activation, bias=bias, dtype=dtype)
    out = fused_experts_torch(x, w13, w2, w, ids, activation=activation, w1_bias=b13, w2_bias=b2)
    assert out.dtype == dtype
    ref = ref_experts(x, w13, w2, w, ids, activation=activation, b13=b13, b2=b2)
    assert_close_dtype(out, ref, dtype)


@pytest.mark.parametrize("activation", ["silu", "swigluoai", "gelu", "gelu_tanh"])
def test_fp16_products_beyond_fp16_range_stay_finite(activation):
    # fp16: a gate pre-activation of about -1e5 (act ~ -0) and unweighted expert outputs of ~1.5e5 whose weighted
    # slots (weight 0.15) and sums fit fp16. The kernels keep fp32 accumulators; the twin rounded each GEMM's
    # product to fp16 first (-inf -> NaN after silu; inf before the weight)
    torch.manual_seed(0)
    e, k, h, inter, t = 3, 4, 8, 4, 5
    w13 = torch.randn(e, 2 * inter, h) * 0.1
    w13[:, 0, :] = -1000.0  # gate row 0: g = -1000·Σx = -1e5
    x = torch.full((t, h), 12.5)
    w13[:, 1, :] = 0.1  # g1 = 10
    w13[:, inter + 1, :] = 0.05  # u1 = 5: act[1] ~ 50
    w2 = torch.randn(e, h, inter) * 0.1
    w2[:, :, 1] = torch.tensor([3000.0, -3000.0, 3000.0]).view(e, 1)  # every output column ~ +-1.5e5
    x16, w13_16, w2_16 = x.half(), w13.half(), w2.half()
    ids = torch.tensor([[0, 1, 2, 0]] * t, dtype=torch.int32)  # signs +, -, +, +: the weighted sum ~ 0.3 · 1.5e5
    w = torch.full((t, k), 0.15)
    ref = ref_experts(x16, w13_16, w2_16, w, ids, activation=activation)
    unweighted = ref_experts(x16, w13_16, w2_16, torch.ones(t, 1), ids[:, :1], activation=activation)
    assert unweighted.abs().max() > 65504 and ref.abs().max() < 65504  # the case: only the product overflows
    out = fused_experts_torch(x16, w13_16, w2_16, w, ids, activation=activation)
    assert torch.isfinite(out).all()
    assert_close_dtype(out, ref, torch.float16)


def test_assert_close_dtype_can_fail():
    # the tolerance helper itself rejects a 5 % error in bf16 and a 1e-3 error in fp32
    ref = torch.randn(64, 8, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close_dtype((ref * 1.05).bfloat16(), ref, torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_close_dtype((ref + 1e-3).float(), ref, torch.float32)
    assert_close_dtype(ref.bfloat16(), ref, torch.bfloat16)


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("t,e,k", [(1, 6, 1), (7, 6, 6), (13, 20, 3), (31, 12, 12), (2, 1, 1)])
def test_shapes(t, e, k):
    # T = 1 / primes, K = 1, K = E, E = 1, 6, 12, 20
    x, w13, w2, b13, b2, w, ids = _case(t, 12, 6, e, k)
    out = fused_experts_torch(x, w13, w2, w, ids)
    assert_close_dtype(out, ref_experts(x, w13, w2, w, ids), torch.float32)


@pytest.mark.parametrize("fn", [fused_experts, fused_experts_torch])
def test_empty_batch(fn):
    # T = 0 returns [0, H]
    x, w13, w2, b13, b2, w, ids = _case(0, 12, 6, 4, 2)
    out = fn(x, w13, w2, w, ids)
    assert out.shape == (0, 12) and out.dtype == x.dtype


def test_int64_ids_and_float16_weights():
    # ids may be int64; topk_weights any float dtype
    x, w13, w2, b13, b2, w, ids = _case(9, 12, 6, 5, 2)
    out = fused_experts_torch(x, w13, w2, w.half(), ids.long())
    assert_close_dtype(out, ref_experts(x, w13, w2, w.half().float(), ids), torch.float32)


def test_hot_expert():
    # every token routed to the same expert (one big group), K = 2 with a duplicate-free second slot
    t, e = 41, 6
    x, w13, w2, _, _, w, _ = _case(t, 16, 8, e, 2)
    ids = torch.stack([torch.full((t,), 4), torch.arange(t) % 4], dim=1).to(torch.int32)
    out = fused_experts_torch(x, w13, w2, w, ids)
    assert_close_dtype(out, ref_experts(x, w13, w2, w, ids), torch.float32)
    only = torch.full((t, 1), 2, dtype=torch.int32)
    out1 = fused_experts_torch(x, w13, w2, w[:, :1], only)
    assert_close_dtype(out1, ref_experts(x, w13, w2, w[:, :1], only), torch.float32)


def test_zero_weight_slot_adds_nothing():
    # masked zero-expert slots (id 0, weight 0.0) add nothing
    x, w13, w2, _, _, w, ids = _case(7, 12, 6, 4, 2)
    w[:, 1] = 0.0
    ids[:, 1] = 0
    out = fused_experts_torch(x, w13, w2, w, ids)
    single = fused_experts_torch(x, w13, w2, w[:, :1].contiguous(), ids[:, :1].contiguous())
    torch.testing.assert_close(out, single, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ chunking, size, invariance
@pytest.mark.parametrize("activation,bias", [("silu", False), ("swigluoai", True)])
def test_chunk_boundaries(activation, bias):
    # a tiny workspace forces several chunks (ragged last one); result equals one chunk and the reference
    t, h, inter, e, k = 31, 16, 8, 6, 3
    x, w13, w2, b13, b2, w, ids = _case(t, h, inter, e, k, activation=activation, bias=bias)
    one = fused_experts_torch(x, w13, w2, w, ids, activation=activation, w1_bias=b13, w2_bias=b2)
    per_token = k * (2 * h + 3 * inter) * 4 + k * 16
    for workspace in (1, per_token * 4, per_token * 7 + 5):  # 1 token, 4 tokens, 7 tokens per chunk
        many = fused_experts_torch(x, w13, w2, w, ids, activation=activation, w1_bias=b13, w2_bias=b2,
                                   workspace_bytes=workspace)
        torch.testing.assert_close(many, one, atol=1e-6, rtol=1e-6)
    ref = ref_experts(x, w13, w2, w, ids, activation=activation, b13=b13, b2=b2)
    assert_close_dtype(one, ref, torch.float32)


@pytest.mark.parametrize("total,most,want", [
    (16384, 13740, 8192),  # DeepSeek-V3 fp8 at 4 GiB: 13740 + 2644 before, two equal chunks now
    (10, 3, 3),  # four chunks 3, 3, 3, 1: the fewest the bound allows
    (9, 4, 3),  # three chunks of 3 rather than 4, 4, 1
    (7, 7, 7), (7, 100, 7),  # one chunk
    (5, 1, 1), (5, 0, 1), (5, -3, 1),  # a bound below one token still makes progress
    (1, 1, 1),
])
def test_chunk_tokens_equal_chunks(total, most, want):
    assert chunk_tokens(total, most) == want


def test_chunk_tokens_properties():
    for total in range(1, 60):
        for most in range(1, 70):
            c = chunk_tokens(total, most)
            n = -(-total // c)
            assert c <= max(1, min(total, most))  # within the bound
            assert n == -(-total // min(total, most))  # no more chunks than the bound needs
            assert c - (total - (n - 1) * c) < n  # the last chunk is short by less than the chunk count


def test_262144_tokens_one_call():
    # 262,144 tokens in one call (int64-safe indexing); small H / I; float64 check of every token
    t, h, inter, e, k = 262_144, 8, 4, 6, 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, generator=gen)
    w13, w2, _, _ = make_expert_weights(e, inter, h)
    ids = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
    w = torch.rand(t, k, generator=gen)
    out = fused_experts(x, w13, w2, w, ids)
    assert out.shape == (t, h)
    # independent vectorised float64 check: every expert on every token, then the slot sum
    xd = x.double()
    h_all = torch.einsum("th,eih->tei", xd, w13.double())
    a_all = ref_act(h_all, "silu")
    o_all = torch.einsum("tei,ehi->teh", a_all, w2.double())  # [T, E, H]
    ref = (o_all.gather(1, ids.long().unsqueeze(-1).expand(t, k, h)) * w.double().unsqueeze(-1)).sum(1)
    assert_close_dtype(out, ref, torch.float32)
    # spot-check a few tokens with the naive loop too
    idx = torch.tensor([0, 1, 131_071, 262_143])
    torch.testing.assert_close(out[idx].double(), ref_experts(x[idx], w13, w2, w[idx], ids[idx]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    # a token's output is the same alone or inside a batch (fp32: tight tolerance; bf16: SPEC tolerance of fp32 run)
    x, w13, w2, b13, b2, w, ids = _case(37, 32, 16, 12, 4, bias=True, dtype=dtype)
    full = fused_experts_torch(x, w13, w2, w, ids, w1_bias=b13, w2_bias=b2)
    for i in (0, 18, 36):
        alone = fused_experts_torch(x[i : i + 1], w13, w2, w[i : i + 1], ids[i : i + 1], w1_bias=b13, w2_bias=b2)
        if dtype == torch.float32:
            torch.testing.assert_close(alone, full[i : i + 1], atol=1e-6, rtol=1e-6)
        else:
            torch.testing.assert_close(alone.float(), full[i : i + 1].float(), atol=1e-2, rtol=1e-2)
    again = fused_experts_torch(x, w13, w2, w, ids, w1_bias=b13, w2_bias=b2)
    assert torch.equal(again, full)  # deterministic


def test_dispatcher_matches_reference_twin():
    # fused_experts(backend="torch"/"auto" on CPU) == fused_experts_torch
    x, w13, w2, b13, b2, w, ids = _case(13, 16, 8, 6, 2, bias=True)
    a = fused_experts_torch(x, w13, w2, w, ids, w1_bias=b13, w2_bias=b2)
    for backend in ("torch", "auto"):
        b = fused_experts(x, w13, w2, w, ids, w1_bias=b13, w2_bias=b2, backend=backend)
        assert torch.equal(a, b)


def test_output_is_fresh_and_inputs_untouched():
    # no in-place edits of the caller's tensors
    x, w13, w2, b13, b2, w, ids = _case(9, 12, 6, 4, 2, bias=True)
    copies = [t.clone() for t in (x, w13, w2, b13, b2, w, ids)]
    fused_experts_torch(x, w13, w2, w, ids, w1_bias=b13, w2_bias=b2)
    for a, b in zip((x, w13, w2, b13, b2, w, ids), copies):
        assert torch.equal(a, b)
