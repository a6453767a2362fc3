"""apply_activation_torch (SPEC §1 "Activations") against the float64 formulas of tests/reference.py."""

import math

import pytest
import torch

from moekit.ops.activation import (
    ACTIVATIONS,
    activation_from_hf,
    apply_activation_torch,
    canonical_activation,
    get_activation,
    is_gated,
)
from reference import ref_act

GATED = ["silu", "gelu", "gelu_tanh", "swigluoai"]


@pytest.mark.parametrize("activation", GATED)
@pytest.mark.parametrize("limit", [None, 1.5])
def test_gated_activations(activation, limit):
    # each gated activation, with and without swiglu_limit (large |h| so the clamps bite)
    h = torch.randn(37, 2 * 11) * 4
    out = apply_activation_torch(h, activation, limit)
    assert out.shape == (37, 11) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_act(h, activation, limit), atol=1e-5, rtol=1e-5)


def test_gelu_is_exact_erf_and_gelu_tanh_differs():
    # "gelu" is the erf gelu, "gelu_tanh" the tanh approximation: they must differ measurably
    g = torch.linspace(-4, 4, 101).unsqueeze(0)
    h = torch.cat([g, torch.ones_like(g)], dim=-1)
    exact = apply_activation_torch(h, "gelu")
    approx = apply_activation_torch(h, "gelu_tanh")
    erf = 0.5 * g.double() * (1 + torch.erf(g.double() / math.sqrt(2)))
    torch.testing.assert_close(exact.double(), erf, atol=1e-6, rtol=1e-6)
    assert (exact - approx).abs().max() > 1e-5


def test_swigluoai_default_limit_and_formula():
    # swigluoai: default limit 7.0; g = min(g, L) (no lower clamp); u clamped to [-L, L]; (u + 1)·g·σ(1.702 g)
    g = torch.tensor([[-20.0, -1.0, 0.0, 3.0, 10.0]])
    u = torch.tensor([[-20.0, -1.0, 0.5, 8.0, 10.0]])
    out = apply_activation_torch(torch.cat([g, u], -1), "swigluoai").double()
    gc = torch.tensor([-20.0, -1.0, 0.0, 3.0, 7.0], dtype=torch.float64)
    uc = torch.tensor([-7.0, -1.0, 0.5, 7.0, 7.0], dtype=torch.float64)
    expect = (uc + 1) * gc * torch.sigmoid(1.702 * gc)
    torch.testing.assert_close(out[0], expect, atol=1e-6, rtol=1e-6)
    # an explicit limit replaces 7.0
    out2 = apply_activation_torch(torch.cat([g, u], -1), "swigluoai", 2.0).double()
    torch.testing.assert_close(out2, ref_act(torch.cat([g, u], -1), "swigluoai", 2.0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("activation", GATED)
def test_huge_negative_gate_gives_zero_not_nan(activation):
    # round 51: swigluoai computed ((u + 1)·g)·σ(αg): for g = -1e38 and u + 1 = 8 the product overflowed to -inf and
    # -inf·0 gave NaN where the value is 0 (transformers' order (u + 1)·(g·σ(αg)) does not overflow). Every gated
    # activation's value there is 0 (or -0)
    g = torch.tensor([[-1e38, -4.5e37, -3e38]])
    u = torch.tensor([[10.0, 7.0, -3.0]])
    out = apply_activation_torch(torch.cat([g, u], -1), activation)
    assert torch.equal(out, torch.zeros_like(out)), out  # (-0 == 0)


def test_swiglu_limit_on_silu():
    # DeepSeek-V4 swiglu_limit on silu: g = min(g, L), u = clamp(u, -L, L)
    h = torch.tensor([[10.0, -10.0, 10.0, -10.0]])  # g = [10, -10], u = [10, -10]
    out = apply_activation_torch(h, "silu", 2.0).double()
    expect = torch.tensor([2.0 * torch.sigmoid(torch.tensor(2.0)).item() * 2.0,
                           -10.0 * torch.sigmoid(torch.tensor(-10.0)).item() * -2.0], dtype=torch.float64)
    torch.testing.assert_close(out[0], expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["relu2", "relu2_no_mul"])
def test_relu2_non_gated(name):
    # relu2 is non-gated (I rows in, I out); the seed-era name is an alias
    h = torch.randn(13, 7) * 3
    out = apply_activation_torch(h, name)
    assert out.shape == (13, 7)
    torch.testing.assert_close(out.double(), ref_act(h, "relu2"), atol=1e-6, rtol=1e-6)
    assert not is_gated(name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", GATED + ["relu2"])
def test_low_precision_input_computes_in_fp32(dtype, activation):
    # bf16/fp16 input: activation computed in fp32 from the (rounded) input
    h = (torch.randn(9, 16) * 2).to(dtype)
    out = apply_activation_torch(h, activation)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_act(h.float(), activation), atol=1e-5, rtol=1e-5)


def test_empty_input():
    # zero rows
    assert apply_activation_torch(torch.empty(0, 8), "silu").shape == (0, 4)


def test_names():
    # canonical names and the documented aliases; unknown names list the valid ones
    assert set(ACTIVATIONS) >= {"silu", "gelu", "gelu_tanh", "swigluoai", "relu2"}
    assert canonical_activation("relu2_no_mul") == "relu2"
    with pytest.raises(ValueError, match="activation") as err:
        canonical_activation("tanhh")
    assert "silu" in str(err.value) and "tanhh" in str(err.value)
    with pytest.raises(ValueError, match="activation"):
        apply_activation_torch(torch.zeros(2, 4), "bogus")


def test_swiglu_limit_validation():
    # a limit must be positive, and relu2 (non-gated) refuses one instead of ignoring it
    with pytest.raises(ValueError, match="swiglu_limit"):
        apply_activation_torch(torch.zeros(2, 4), "relu2", 1.0)
    with pytest.raises(ValueError, match="swiglu_limit"):
        apply_activation_torch(torch.zeros(2, 4), "silu", -2.0)
    with pytest.raises(ValueError, match="swiglu_limit"):
        apply_activation_torch(torch.zeros(2, 4), "swigluoai", float("nan"))


NAIVE = {  # float64 formulas, written out independently of the registry: (gated, f(g, u))
    "silu": (True, lambda g, u: g / (1 + torch.exp(-g)) * u),
    "gelu": (True, lambda g, u: 0.5 * g * (1 + torch.erf(g / math.sqrt(2))) * u),
    "gelu_tanh": (True, lambda g, u: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u),
    "swigluoai": (True, lambda g, u: (u + 1) * g / (1 + torch.exp(-1.702 * g))),
    "relu2": (False, lambda h, u: torch.clamp(h, min=0) ** 2),
    "silu_post_clamp": (True, lambda g, u: g / (1 + torch.exp(-g)) * u),  # its clamp: test_silu_post_clamp
    "softcap_swiglu": (True, lambda g, u: 4 * torch.tanh(g / 4) * torch.sigmoid(g) * 25 * torch.tanh(u / 25)),
}


def test_silu_post_clamp_clamps_after_silu():
    # Step-3.x: min(silu(g), L) · clamp(u, ±L); g itself is never clamped (silu(g) <= L is what is bounded)
    g = torch.tensor([[-20.0, -1.0, 0.5, 3.0, 30.0]])
    u = torch.tensor([[5.0, -4.0, 0.5, 8.0, -9.0]])
    out = apply_activation_torch(torch.cat([g, u], -1), "silu_post_clamp", 2.0).double()
    gd, ud = g.double()[0], u.double()[0]
    expect = torch.clamp(gd * torch.sigmoid(gd), max=2.0) * torch.clamp(ud, -2.0, 2.0)
    torch.testing.assert_close(out[0], expect, atol=1e-6, rtol=1e-6)
    assert out[0, 0] != 0  # silu(-20)·2 is tiny but not the min(g, L)-first value
    # without a limit it is silu
    torch.testing.assert_close(apply_activation_torch(torch.cat([g, u], -1), "silu_post_clamp"),
                               apply_activation_torch(torch.cat([g, u], -1), "silu"))


def test_softcap_swiglu_formula_and_no_limit():
    # Inkling-2: 4·tanh(g/4) · sigmoid(g) · 25·tanh(u/25); a swiglu_limit does not apply to it
    h = torch.randn(5, 2 * 9) * 20
    torch.testing.assert_close(apply_activation_torch(h, "softcap_swiglu").double(), ref_act(h, "softcap_swiglu"),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="swiglu_limit"):
        apply_activation_torch(h, "softcap_swiglu", 3.0)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_registry_torch_fn_matches_naive_formula(name):
    # every registry entry: its torch function and gated flag against the formula of SPEC §1
    act = get_activation(name)
    assert set(NAIVE) == set(ACTIVATIONS), "a registry entry without a naive formula here"
    gated, formula = NAIVE[name]
    assert act.name == name and act.gated == gated == is_gated(name)
    g, u = torch.randn(2, 7, 33, dtype=torch.float64) * 3
    got = act.torch_fn(g, u if gated else None)
    torch.testing.assert_close(got, formula(g, u), atol=1e-12, rtol=1e-12)


def test_registry_codes_and_names_are_unique():
    # the kernel codes the Triton epilogue switches on, and every name an alias may take
    acts = [get_activation(n) for n in ACTIVATIONS]
    assert len({a.code for a in acts}) == len(acts)
    names = [n for a in acts for n in (a.name, *a.aliases)]
    assert len(names) == len(set(names))
    for a in acts:  # round trip: every alias resolves to its record
        assert all(get_activation(n) is a for n in (a.name, *a.aliases))


@pytest.mark.parametrize("hidden_act,expected", [
    ("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
    ("gelu_new", "gelu_tanh"), ("relu2", "relu2"),
])
def test_activation_from_hf(hidden_act, expected):
    assert activation_from_hf(hidden_act) == expected


def test_activation_from_hf_unsupported():
    # NotImplementedError naming the act and the supported ones
    with pytest.raises(NotImplementedError, match="hidden_act='tanh'") as err:
        activation_from_hf("tanh")
    assert "swish" in str(err.value) and "gelu_pytorch_tanh" in str(err.value)
    with pytest.raises(NotImplementedError, match="hidden_act"):
        activation_from_hf(None)


def test_unknown_names_raise_listing_valid_ones():
    # get_activation / is_gated: ValueError with every valid name (aliases too); a non-str: TypeError
    for fn in (get_activation, is_gated):
        with pytest.raises(ValueError, match="activation") as err:
            fn("swish")  # a transformers name, not an activation name: activation_from_hf maps it
        assert all(n in str(err.value) for n in (*ACTIVATIONS, "relu2_no_mul"))
    with pytest.raises(TypeError, match="activation"):
        get_activation(3)
