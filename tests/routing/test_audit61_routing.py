"""Round 61's routing audit: a zero-expert router passed as ``router=``, bool hash tables, wide custom ids, the
scaling factor's float32 range, the zero-expert bias's errors."""

import pytest
import torch

import moekit
from moekit.ops.routing import TopKSpec

E, Z, H, I = 4, 2, 8, 8


def _zero_bias(to_zero: bool = False):
    return torch.cat([torch.full((E,), -10.0 if to_zero else 0.0), torch.full((Z,), 10.0 if to_zero else 0.0)])


def test_zero_router_given_refuses_weight_on_input():
    # the edge: the keyword spelling refused zero experts with the weight on the input, router= took Z = 0 and
    # ran every masked zero slot through expert 0 on 0·x plus its biases (1.39 off an output of at most 1.26)
    router = moekit.ZeroExpertRouter(1, E, e_score_correction_bias=_zero_bias(True))
    with pytest.raises(ValueError, match="zero experts .*apply_router_weight_on_input"):
        moekit.FusedMoE(E, 1, H, I, router=router, apply_router_weight_on_input=True, has_bias=True, backend="torch")


def test_zero_router_given_takes_its_zero_experts():
    # the edge: K > E is valid with Z zero experts (LongCat); router= refused it ("top_k must be <= 4"); and the
    # layer built with router= computes what the keyword spelling computes
    torch.manual_seed(0)
    bias = torch.randn(E + Z) * 0.1
    k = E + 1
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    direct = moekit.FusedMoE(E, k, H, I, zero_expert_type="identity", e_score_correction_bias=bias, renormalize=False,
                             backend="torch")  # (the router's default)
    given = moekit.FusedMoE(E, k, H, I, router=moekit.ZeroExpertRouter(k, E, e_score_correction_bias=bias),
                            backend="torch")
    assert given.moe_config.num_zero_experts == Z == direct.moe_config.num_zero_experts
    x, logits = torch.randn(5, H), torch.randn(5, E + Z)
    for layer in (direct, given):
        layer.load_expert_weights(w13, w2)
    torch.testing.assert_close(given(x, logits), direct(x, logits), rtol=0, atol=0)


def test_bool_hash_table_is_refused():
    # the edge: a bool table was accepted and every id became 0 or 1
    table = torch.ones(10, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="hash_indices_table must be an integer tensor .*torch.bool"):
        moekit.FusedMoE(8, 2, H, I, hash_indices_table=table, backend="torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_custom_ids_beyond_int32_do_not_wrap(backend):
    # the edge: int64 ids of 2^32 + e were cast to int32 on the kernel path and wrapped to expert e (the docstring
    # promises an out-of-range id adds nothing); the reference path raises on them
    torch.manual_seed(0)

    def good(hs, lg, k, renorm):
        v, i = torch.topk(lg, k, dim=-1)
        return torch.softmax(v, -1), i

    def wide(hs, lg, k, renorm):
        w, i = good(hs, lg, k, renorm)
        return w, i + (1 << 32)

    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    w13, w2 = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    x, lg = torch.randn(3, H, device=device), torch.randn(3, E, device=device)
    layer = moekit.FusedMoE(E, 2, H, I, custom_routing_function=wide, backend=backend, device=device)
    layer.load_expert_weights(w13.to(device), w2.to(device))
    if backend == "torch":
        with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 4\)"):
            layer(x, lg)
        return
    assert torch.equal(layer(x, lg), torch.zeros(3, H, device=device))


@pytest.mark.parametrize("value", [1e39, 1e-50, -1e-50])
def test_scaling_factor_outside_float32_is_refused(value):
    # the edges: 1e39 is finite as a Python float and inf in float32 (a NaN output); 1e-50 is > 0 and 0 in float32
    # (the routed output erased)
    with pytest.raises(ValueError, match="routed_scaling_factor must be"):
        moekit.FusedMoE(E, 2, H, I, routed_scaling_factor=value, backend="torch")
    with pytest.raises(ValueError, match="routed_scaling_factor must be"):
        TopKSpec(top_k=2, routed_scaling_factor=value).validate(E)


def test_scaling_factor_float32_bounds_accepted():
    # the control: the float32 range's ends are accepted
    for value in (torch.finfo(torch.float32).tiny, 2.5, float(torch.finfo(torch.float32).max)):
        moekit.FusedMoE(E, 2, H, I, routed_scaling_factor=value, backend="torch")


@pytest.mark.parametrize("bias, err, match", [
    ([0.0] * (E + Z), TypeError, "e_score_correction_bias must be a torch.Tensor, got list"),
    (None, ValueError, r"shape \[E \+ Z\] \(E = num_experts = 4\), got None"),
    (torch.zeros(E + Z, 1), ValueError, r"got \[6, 1\]"),
])
def test_zero_expert_bias_errors_name_the_value(bias, err, match):
    # the edges: a list bias raised AttributeError from .dim(); None / 2-D did not say what was passed
    with pytest.raises(err, match=match):
        moekit.FusedMoE(E, 2, H, I, zero_expert_type="identity", e_score_correction_bias=bias, backend="torch")
