"""FusedMoE / MoERunner (SPEC §1) against the naive float64 layer of tests/reference.py.

Forward order, gate, leading dims, T = 0, dtypes, transforms, router_logits_dtype, batch invariance,
load_expert_weights, construction hooks (router=, runner_cls, routed_experts_cls).
"""

import copy

import pytest
import torch

import moekit
from moekit import FusedMoE, FusedTopKRouter, MoERunner, RoutedExperts
from reference import (
    GatedMLP,
    assert_close_dtype,
    assert_tie_free,
    make_expert_weights,
    ref_layer,
    ref_route,
    spread_logits,
)


def f64(module):
    """A float64 copy of a module, for the reference."""
    return copy.deepcopy(module).double() if module is not None else None


def build(e=6, k=2, h=16, inter=8, *, dtype=torch.float32, activation="silu", has_bias=False, **kw):
    """A layer with loaded random weights; returns (layer, w13, w2, b13, b2)."""
    layer = FusedMoE(e, k, h, inter, params_dtype=dtype, activation=activation, has_bias=has_bias,
                     backend="torch", **kw)
    w13, w2, b13, b2 = make_expert_weights(e, inter, h, gated=activation not in ("relu2", "relu2_no_mul"),
                                           bias=has_bias, dtype=dtype)
    layer.load_expert_weights(w13, w2, b13, b2)
    return layer, w13, w2, b13, b2


def load_random(layer):
    """Load random expert weights into ``layer`` (global shapes from its config); returns it."""
    c = layer.moe_config
    w13, w2, b13, b2 = make_expert_weights(c.num_experts, c.intermediate_size, c.hidden_size, gated=c.gated,
                                           bias=c.has_bias, dtype=c.params_dtype)
    layer.load_expert_weights(w13, w2, b13, b2)
    return layer


def route_fn(k, **kw):
    """Reference routing closure for ref_layer, asserting tie-free input."""

    def fn(x, logits):
        w, ids, margin = ref_route(logits, k, **kw)
        assert_tie_free(margin)
        return w, ids

    return fn


MLP = GatedMLP  # a small SiLU-gated MLP (shared expert / transform)


# ------------------------------------------------------------------ basics
@pytest.mark.parametrize("t,k", [(1, 2), (7, 2), (31, 2), (13, 1), (13, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_default_layer_matches_reference(t, k, renormalize):
    # Mixtral-like default (softmax top-k); T = 1 and primes; K = 1 and K = E = 6 (not a power of two)
    layer, w13, w2, *_ = build(k=k, renormalize=renormalize)
    assert isinstance(layer, MoERunner) and isinstance(layer, torch.nn.Module)
    x, logits = torch.randn(t, 16), spread_logits(t, 6)
    out = layer(x, logits)
    ref = ref_layer(x, logits, route_fn=route_fn(k, renormalize=renormalize), num_experts=6, w13=w13, w2=w2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_dtype(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,has_bias", [("silu", False), ("swigluoai", True), ("gelu_tanh", False),
                                                 ("relu2", True)])
def test_dtypes_and_activations(dtype, activation, has_bias):
    # a layer in fp32 / bf16 / fp16 with each activation family; SPEC §4 tolerances
    t, e, k = 29, 12, 3
    layer, w13, w2, b13, b2 = build(e, k, 32, 16, dtype=dtype, activation=activation, has_bias=has_bias)
    x = torch.randn(t, 32).to(dtype)
    logits = spread_logits(t, e).to(dtype)
    out = layer(x, logits)
    assert out.dtype == dtype and out.shape == x.shape
    ref = ref_layer(x, logits.float(), route_fn=route_fn(k, renormalize=True), num_experts=e, w13=w13, w2=w2,
                    b13=b13, b2=b2, activation=activation)
    assert_close_dtype(out, ref, dtype)


def test_leading_dims_restored():
    # hidden_states [B, S, H] and router_logits [B, S, E]: flattened, then restored
    layer, w13, w2, *_ = build()
    x, logits = torch.randn(3, 5, 16), spread_logits(15, 6).reshape(3, 5, 6)
    out = layer(x, logits)
    assert out.shape == (3, 5, 16)
    flat = layer(x.reshape(15, 16), logits.reshape(15, 6))
    torch.testing.assert_close(out.reshape(15, 16), flat, atol=1e-6, rtol=1e-6)
    ref = ref_layer(x, logits, route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2)
    assert_close_dtype(out, ref, torch.float32)


def test_single_token_without_batch_dim_and_non_contiguous_input():
    # hidden_states [H] (no leading dims) -> [H]; a non-contiguous [T, H] view works like its copy
    layer, w13, w2, *_ = build()
    x, logits = torch.randn(16), spread_logits(1, 6)[0]
    out = layer(x, logits)
    assert out.shape == (16,)
    ref = ref_layer(x.unsqueeze(0), logits.unsqueeze(0), route_fn=route_fn(2, renormalize=True), num_experts=6,
                    w13=w13, w2=w2)
    assert_close_dtype(out, ref[0], torch.float32)
    big = torch.randn(9, 32)
    view = big[:, ::2]
    assert not view.is_contiguous()
    logits = spread_logits(9, 6)
    torch.testing.assert_close(layer(view, logits), layer(view.contiguous(), logits), atol=1e-6, rtol=1e-6)


def test_selection_bias_is_shared_not_copied():
    # the layer routes with the caller's bias tensor: an in-place update (weight loading) takes effect
    bias = torch.nn.Parameter(torch.zeros(6), requires_grad=False)
    layer, *_ = build(e_score_correction_bias=bias)
    x, logits = torch.randn(5, 16), spread_logits(5, 6)
    with torch.no_grad():
        bias[4] = 100.0
    _, ids = layer.router.select_experts(x, logits)
    assert (ids[:, 0] == 4).all()


def test_tuple_returning_modules():
    # transforms / shared experts returning (out, bias) tuples, as vLLM linear layers do
    class Tup(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x), None

    down, up, shared = torch.nn.Linear(24, 16, bias=False), torch.nn.Linear(16, 24, bias=False), MLP(24, 4)
    plain, w13, w2, *_ = build(routed_input_transform=down, routed_output_transform=up, shared_experts=shared)
    tup = FusedMoE(6, 2, 16, 8, routed_input_transform=Tup(down), routed_output_transform=Tup(up),
                   shared_experts=Tup(shared), backend="torch")
    tup.load_expert_weights(w13, w2)
    x, logits = torch.randn(7, 24), spread_logits(7, 6)
    torch.testing.assert_close(tup(x, logits), plain(x, logits))


@pytest.mark.parametrize("with_gate", [False, True])
def test_empty_batch(with_gate):
    # T = 0 returns an empty [0, H] (also through gate and shared experts)
    gate = torch.nn.Linear(16, 6, bias=False) if with_gate else None
    layer, *_ = build(gate=gate, shared_experts=MLP(16, 4) if with_gate else None)
    x = torch.empty(0, 16)
    out = layer(x, None if with_gate else torch.empty(0, 6))
    assert out.shape == (0, 16) and out.dtype == torch.float32
    out3 = layer(torch.empty(2, 0, 16), None if with_gate else torch.empty(2, 0, 6))
    assert out3.shape == (2, 0, 16)


def test_gate_computes_logits():
    # router_logits=None: the layer calls gate(x_routed); a (out, bias) tuple-returning gate also works
    gate = torch.nn.Linear(16, 6, bias=False)
    layer, w13, w2, *_ = build(gate=gate)
    x = torch.randn(13, 16)
    out = layer(x)
    ref = ref_layer(x, None, gate=f64(gate), route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2)
    assert_close_dtype(out, ref, torch.float32)
    # given logits win over the gate
    logits = spread_logits(13, 6)
    ref2 = ref_layer(x, logits, route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2)
    assert_close_dtype(layer(x, logits), ref2, torch.float32)

    class TupleGate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gate

        def forward(self, x):
            return self.lin(x), None

    layer.gate = TupleGate()
    torch.testing.assert_close(layer(x), out)


def test_router_logits_any_float_dtype():
    # router_logits in bf16 / fp16 with fp32 hidden states: routing math in fp32 on the given values
    layer, w13, w2, *_ = build()
    x = torch.randn(11, 16)
    for dtype in (torch.bfloat16, torch.float16):
        logits = spread_logits(11, 6).to(dtype)
        ref = ref_layer(x, logits.float(), route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2)
        assert_close_dtype(layer(x, logits), ref, torch.float32)


def test_router_logits_dtype():
    # router_logits_dtype casts the logits before routing (seed behaviour)
    layer, w13, w2, *_ = build(router_logits_dtype=torch.bfloat16)
    x = torch.randn(9, 16)
    logits = torch.randn(9, 6) * 3
    rounded = logits.bfloat16().float()
    w, ids, margin = ref_route(rounded, 2, renormalize=True)
    assert_tie_free(margin)
    ref = ref_layer(x, rounded, route_fn=lambda _x, _l: (w, ids), num_experts=6, w13=w13, w2=w2)
    assert_close_dtype(layer(x, logits), ref, torch.float32)


def test_routed_transforms_latent_projection():
    # routed_input_transform 24 -> 16 (router, experts and zero experts at 16), routed_output_transform 16 -> 24,
    # shared experts read the original 24-wide input
    down = torch.nn.Linear(24, 16, bias=False)
    up = torch.nn.Linear(16, 24, bias=False)
    shared = MLP(24, 8)
    gate = torch.nn.Linear(16, 6, bias=False)
    layer, w13, w2, *_ = build(routed_input_transform=down, routed_output_transform=up, shared_experts=shared,
                               gate=gate)
    x = torch.randn(2, 7, 24)
    out = layer(x)
    assert out.shape == (2, 7, 24)
    ref = ref_layer(x, None, route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2, gate=f64(gate),
                    routed_input_transform=f64(down), routed_output_transform=f64(up), shared_experts=f64(shared))
    assert_close_dtype(out, ref, torch.float32)
    # with given logits (over the transformed input's tokens)
    logits = spread_logits(14, 6).reshape(2, 7, 6)
    ref2 = ref_layer(x, logits, route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2,
                     routed_input_transform=f64(down), routed_output_transform=f64(up), shared_experts=f64(shared))
    assert_close_dtype(layer(x, logits), ref2, torch.float32)


def test_scaling_without_zero_experts_both_ways():
    # routed_scaling_factor on the weights or on the output: same result (no zero experts, renormalised)
    kw = dict(routed_scaling_factor=2.5, renormalize=True)
    a, w13, w2, *_ = build(**kw)
    b = FusedMoE(6, 2, 16, 8, apply_routed_scale_to_output=True, backend="torch", **kw)
    b.load_expert_weights(w13, w2)
    assert b.router.routed_scaling_factor == 1.0  # the router then uses 1.0
    x, logits = torch.randn(13, 16), spread_logits(13, 6)
    ref = ref_layer(x, logits, route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2,
                    scale_on_output=2.5)
    assert_close_dtype(a(x, logits), ref, torch.float32)
    assert_close_dtype(b(x, logits), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_batch_invariance(dtype):
    # a token's output alone equals its row inside a batch (fp32 tight; bf16 within 1 % of its scale)
    layer, *_ = build(12, 4, 32, 16, dtype=dtype, has_bias=True, shared_experts=MLP(32, 8).to(dtype))
    x, logits = torch.randn(41, 32).to(dtype), torch.randn(41, 12)
    full = layer(x, logits)
    for i in (0, 20, 40):
        alone = layer(x[i : i + 1], logits[i : i + 1])
        if dtype == torch.float32:
            torch.testing.assert_close(alone, full[i : i + 1], atol=1e-6, rtol=1e-6)
        else:
            torch.testing.assert_close(alone.float(), full[i : i + 1].float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(layer(x, logits), full)


def test_grouped_layer_matches_reference():
    # use_grouped_topk through the factory, E = 20 in 5 groups, bias, scale
    bias = torch.randperm(20).float() * 0.01
    layer, w13, w2, *_ = build(20, 4, 16, 8, use_grouped_topk=True, num_expert_group=5, topk_group=2,
                               scoring_func="sigmoid", e_score_correction_bias=bias, routed_scaling_factor=2.0)
    x, logits = torch.randn(17, 16), spread_logits(17, 20)
    ref = ref_layer(x, logits, num_experts=20, w13=w13, w2=w2,
                    route_fn=route_fn(4, scoring_func="sigmoid", renormalize=True, bias=bias, num_expert_group=5,
                                      topk_group=2, routed_scaling_factor=2.0))
    assert_close_dtype(layer(x, logits), ref, torch.float32)


def test_hash_routing_layer():
    # hash routing through the layer: input_ids required, ids from the table
    table = torch.stack([torch.randperm(6)[:2] for _ in range(32)])
    layer, w13, w2, *_ = build(hash_indices_table=table, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5)
    x, logits = torch.randn(2, 5, 16), torch.randn(2, 5, 6)
    input_ids = torch.randint(0, 32, (2, 5))
    out = layer(x, logits, input_ids=input_ids)

    def fn(_x, lg):
        from reference import ref_hash_route

        return ref_hash_route(lg, table, input_ids, scoring_func="sqrtsoftplus", renormalize=True,
                              routed_scaling_factor=1.5)

    ref = ref_layer(x, logits, route_fn=fn, num_experts=6, w13=w13, w2=w2)
    assert_close_dtype(out, ref, torch.float32)


# ------------------------------------------------------------------ weights and hooks
@pytest.mark.parametrize("activation,has_bias", [("silu", False), ("swigluoai", True), ("relu2", True)])
def test_load_expert_weights_round_trip(activation, has_bias):
    # global [E, ...] tensors land exactly in w13_weight / w2_weight (and biases); shapes per SPEC §1
    e, h, inter = 6, 16, 8
    layer, w13, w2, b13, b2 = build(e, 2, h, inter, activation=activation, has_bias=has_bias)
    rows = inter if activation == "relu2" else 2 * inter
    ex = layer.routed_experts
    assert isinstance(ex, RoutedExperts)
    assert ex.w13_weight.shape == (e, rows, h) and ex.w2_weight.shape == (e, h, inter)
    assert torch.equal(ex.w13_weight, w13) and torch.equal(ex.w2_weight, w2)
    if has_bias:
        assert ex.w13_bias.shape == (e, rows) and ex.w2_bias.shape == (e, h)
        assert torch.equal(ex.w13_bias, b13) and torch.equal(ex.w2_bias, b2)
    else:
        assert ex.w13_bias is None and ex.w2_bias is None
    # loading copies: later edits of the source do not leak into the layer
    w13.add_(1.0)
    assert not torch.equal(ex.w13_weight, w13)


def test_load_expert_weights_casts_to_params_dtype():
    # fp32 checkpoint tensors into a bf16 layer
    layer = FusedMoE(4, 2, 8, 4, params_dtype=torch.bfloat16, backend="torch")
    w13, w2, _, _ = make_expert_weights(4, 4, 8)
    layer.load_expert_weights(w13, w2)
    assert layer.routed_experts.w13_weight.dtype == torch.bfloat16
    assert torch.equal(layer.routed_experts.w13_weight, w13.bfloat16())


def test_layer_attributes_and_backend():
    # layer.router is the router object, layer.backend the resolved backend ("auto" on CPU -> torch)
    layer = load_random(FusedMoE(6, 2, 16, 8))
    assert isinstance(layer.router, moekit.BaseRouter)
    assert layer.backend == "torch" and layer.router.backend == "torch"
    assert layer.router.kernels is layer.routed_experts.kernels  # one table, resolved once
    out = layer(torch.randn(3, 16), torch.randn(3, 6))
    assert torch.isfinite(out).all()


def test_custom_router_object_and_classes():
    # router= replaces the factory; runner_cls / runner_args / routed_experts_cls / routed_experts_args are used
    calls = []

    class MyRunner(MoERunner):
        def __init__(self, *args, tag=None, **kw):
            super().__init__(*args, **kw)
            self.tag = tag

    class MyExperts(RoutedExperts):
        def __init__(self, *args, marker=None, **kw):
            super().__init__(*args, **kw)
            self.marker = marker

        def forward(self, x, w, ids):
            calls.append(ids.clone())
            return super().forward(x, w, ids)

    router = FusedTopKRouter(1, 6, renormalize=False, scoring_func="sigmoid")
    layer = FusedMoE(6, 1, 16, 8, router=router, runner_cls=MyRunner, runner_args={"tag": "t"},
                     routed_experts_cls=MyExperts, routed_experts_args={"marker": 7}, backend="torch")
    assert isinstance(layer, MyRunner) and layer.tag == "t"
    assert isinstance(layer.routed_experts, MyExperts) and layer.routed_experts.marker == 7
    assert layer.router is router
    w13, w2, _, _ = make_expert_weights(6, 8, 16)
    layer.load_expert_weights(w13, w2)
    x, logits = torch.randn(5, 16), spread_logits(5, 6)
    out = layer(x, logits)
    assert len(calls) == 1
    ref = ref_layer(x, logits, route_fn=route_fn(1, scoring_func="sigmoid"), num_experts=6, w13=w13, w2=w2)
    assert_close_dtype(out, ref, torch.float32)


def test_seed_keywords_accepted():
    # keywords of the seed signature with their default values are accepted
    layer = FusedMoE(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, params_dtype=None, renormalize=True,
                     use_grouped_topk=False, num_expert_group=None, topk_group=None, quant_config=None, tp_size=None,
                     dp_size=None, pcp_size=None, prefix="model.layers.0.mlp.experts", custom_routing_function=None,
                     router=None, scoring_func="softmax", routed_scaling_factor=1.0, swiglu_limit=None,
                     e_score_correction_bias=None, apply_router_weight_on_input=False, activation="silu",
                     enable_eplb=False, num_redundant_experts=0, has_bias=False, is_sequence_parallel=False,
                     expert_mapping=None, n_shared_experts=None, router_logits_dtype=None, gate=None,
                     shared_experts=None, shared_expert_gate=None, routed_input_transform=None,
                     routed_output_transform=None, apply_routed_scale_to_output=False, zero_expert_type=None,
                     hash_indices_table=None, runner_cls=None, runner_args=None, routed_experts_cls=None,
                     routed_experts_args=None, device=None)
    load_random(layer)
    assert layer.layer_name == "model.layers.0.mlp.experts"
    assert layer(torch.randn(2, 8), torch.randn(2, 4)).shape == (2, 8)


def test_forward_does_not_modify_inputs():
    # hidden_states and router_logits are not modified in place
    layer, *_ = build(has_bias=True, routed_scaling_factor=2.0)
    x, logits = torch.randn(7, 16), torch.randn(7, 6)
    xc, lc = x.clone(), logits.clone()
    layer(x, logits)
    assert torch.equal(x, xc) and torch.equal(logits, lc)



def test_262144_tokens_through_the_layer():
    # 262,144 tokens in one layer call (routing, zero experts, experts, scaling): int64-safe and exact per token
    e, z, k, h, inter = 6, 2, 3, 8, 4
    bias = torch.randn(e + z) * 0.1
    layer, w13, w2, *_ = build(e, k, h, inter, zero_expert_type="identity", e_score_correction_bias=bias,
                               renormalize=False, routed_scaling_factor=2.0)
    t = 262_144
    gen = torch.Generator().manual_seed(3)
    x, logits = torch.randn(t, h, generator=gen), torch.randn(t, e + z, generator=gen)
    out = layer(x, logits)
    assert out.shape == (t, h) and torch.isfinite(out).all()
    idx = torch.tensor([0, 1, 65_535, 65_536, 131_072, 262_142, 262_143])
    ref = ref_layer(x[idx], logits[idx], num_experts=e, w13=w13, w2=w2,
                    route_fn=route_fn(k, bias=bias, routed_scaling_factor=2.0))
    assert_close_dtype(out[idx], ref, torch.float32)


def test_enable_eplb_single_process_keeps_outputs():
    # once EPLB exists: a single-process layer with enable_eplb=True computes the reference output,
    # before and after a rebalance (until then FusedMoE raises NotImplementedError, see test_errors)
    try:
        layer, w13, w2, *_ = build(12, 3, 16, 8, enable_eplb=True)
    except NotImplementedError:
        pytest.skip("EPLB is not implemented in this build")
    x, logits = torch.randn(23, 16), spread_logits(23, 12)
    ref = ref_layer(x, logits, route_fn=route_fn(3, renormalize=True), num_experts=12, w13=w13, w2=w2)
    assert_close_dtype(layer(x, logits), ref, torch.float32)
    if hasattr(layer, "rebalance"):
        layer.rebalance()
        assert_close_dtype(layer(x, logits), ref, torch.float32)


def test_output_dtype_follows_hidden_states_whatever_modules_return():
    # SPEC §1: same dtype as hidden_states even when shared experts / gate / transform return float32
    class ToF32(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x).float()

    shared, sgate = MLP(16, 8).bfloat16(), torch.nn.Linear(16, 1, bias=False).bfloat16()
    up = torch.nn.Linear(16, 16, bias=False).bfloat16()
    layer, w13, w2, *_ = build(dtype=torch.bfloat16, shared_experts=ToF32(shared), shared_expert_gate=ToF32(sgate),
                               routed_output_transform=ToF32(up))
    x, logits = torch.randn(9, 16).bfloat16(), spread_logits(9, 6)
    out = layer(x, logits)
    assert out.dtype == torch.bfloat16
    ref = ref_layer(x, logits, route_fn=route_fn(2, renormalize=True), num_experts=6, w13=w13, w2=w2,
                    shared_experts=f64(shared), shared_expert_gate=f64(sgate), routed_output_transform=f64(up))
    assert_close_dtype(out, ref, torch.bfloat16)


def test_skip_bias_add_tuples_add_their_bias():
    # a module returning (output, bias) with a real bias (vLLM's skip_bias_add) gets the bias added
    class SkipBias(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return torch.nn.functional.linear(x, self.lin.weight), self.lin.bias

    shared = torch.nn.Linear(16, 16)
    plain, w13, w2, *_ = build(shared_experts=shared)
    skip = FusedMoE(6, 2, 16, 8, shared_experts=SkipBias(shared), backend="torch")
    skip.load_expert_weights(w13, w2)
    x, logits = torch.randn(5, 16), spread_logits(5, 6)
    torch.testing.assert_close(skip(x, logits), plain(x, logits))


def test_three_tuple_module_output_raises():
    class Three(torch.nn.Module):
        def forward(self, x):
            return x, None, None

    layer = load_random(FusedMoE(6, 2, 16, 8, shared_experts=Three(), backend="torch"))
    with pytest.raises(TypeError, match="tuple of 3"):
        layer(torch.randn(2, 16), torch.randn(2, 6))


# ------------------------------------------------------------------ construction (bottom-up)
def test_construction_hands_every_part_in():
    # the runner's parts are constructor arguments: the executor runs the runner's experts, nothing stamped
    from moekit.experts import LocalExecutor

    layer = FusedMoE(6, 2, 16, 8, n_shared_experts=None, expert_mapping=None, backend="torch")
    ex = layer.expert_executor
    assert isinstance(ex, LocalExecutor) and ex.name == "local" and ex.experts is layer.routed_experts
    assert ex.__doc__ and layer.router.eplb_state is None
    for stamped in ("fused_layout", "plan", "_loaded"):
        assert not hasattr(layer, stamped)
    runner = MoERunner("r", layer.moe_config, layer.router, layer.routed_experts)  # default executor: local
    assert isinstance(runner.expert_executor, LocalExecutor) and runner.expert_executor.experts is runner.routed_experts
    with pytest.raises(ValueError, match="expert_executor"):
        MoERunner("r", layer.moe_config, layer.router, layer.routed_experts,
                  expert_executor=LocalExecutor(build()[0].routed_experts))


def test_expert_placement_has_one_owner():
    # moekit.parallel.ExpertPlacement is the experts' class; the experts hold the only instance
    from moekit.experts.placement import ExpertPlacement

    assert moekit.parallel.ExpertPlacement is ExpertPlacement
    layer = load_random(FusedMoE(4, 2, 8, 4, enable_eplb=True, backend="torch"))
    ex = layer.expert_executor
    assert ex.name == "parallel" and ex.experts is layer.routed_experts and not hasattr(ex, "placement")
    assert layer.router.eplb_state is ex.eplb_state  # handed to the router at construction
    layer(torch.randn(5, 8), torch.randn(5, 4))
    stats = layer.rebalance()
    assert tuple(stats["physical_to_logical"]) == layer.routed_experts.placement.physical_to_logical


def test_router_instance_with_eplb_raises():
    router = FusedTopKRouter(2, 4)
    with pytest.raises(ValueError, match="enable_eplb"):
        FusedMoE(4, 2, 8, 4, router=router, enable_eplb=True)
