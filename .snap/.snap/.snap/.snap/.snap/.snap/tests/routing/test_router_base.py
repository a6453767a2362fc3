"""The router base (issue #8 item 5, issue #12 items 5 and 6): scoring, renormalisation, scaling and the bias
checked in one place; EPLB state given at construction; the kernel table called, never the backend name;
a custom routing function's non-finite weights; every router documents its math and its parameters."""

import inspect
import math

import pytest
import torch

from moekit import (
    BaseRouter,
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopk,
    GroupedTopKRouter,
    ZeroExpertRouter,
    create_fused_moe_router,
)
from moekit.ops.kernels import Kernels, kernels_for
from moekit.routing import ScoredRouter
from reference import llama4_routing_function, spread_logits

E = 8
HASH_TABLE = torch.randint(0, E, (16, 2), generator=torch.Generator().manual_seed(0))
BUILDERS = {  # name -> (**kw) -> router; kw: renormalize / routed_scaling_factor / eplb_state / enable_eplb / kernels
    "fused": lambda **kw: FusedTopKRouter(2, E, **kw),
    "bias": lambda **kw: FusedTopKBiasRouter(2, E, e_score_correction_bias=torch.zeros(E), **kw),
    "hash": lambda **kw: FusedTopKBiasRouter(2, E, hash_indices_table=HASH_TABLE, **kw),
    "grouped": lambda **kw: GroupedTopKRouter(2, E, num_expert_group=4, topk_group=2, **kw),
    "zero": lambda **kw: ZeroExpertRouter(2, E, e_score_correction_bias=torch.zeros(E + 2), num_logical_experts=E,
                                          **kw),
    "custom": lambda **kw: CustomRoutingRouter(2, E, custom_routing_function=llama4_routing_function, **kw),
    "factory": lambda **kw: create_fused_moe_router(2, E, **kw),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_renormalize_must_be_a_bool(name):
    # issue #12 item 5: renormalize="no" was truthy and silently renormalised
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="renormalize"):
            BUILDERS[name](renormalize=bad)
    assert BUILDERS[name](renormalize=False).renormalize is False


@pytest.mark.parametrize("name", BUILDERS)
def test_routed_scaling_factor_checked_once(name):
    # type (bool / str / None -> TypeError) and finiteness (ValueError), naming the argument; ints become floats
    for bad in ("2.5", None, True, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="routed_scaling_factor"):
            BUILDERS[name](routed_scaling_factor=bad)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="routed_scaling_factor"):
            BUILDERS[name](routed_scaling_factor=bad)
    r = BUILDERS[name](routed_scaling_factor=2)
    assert r.routed_scaling_factor == 2.0 and type(r.routed_scaling_factor) is float


def test_grouped_topk_module_checks_the_same_way():
    with pytest.raises(TypeError, match="renormalize"):
        GroupedTopk(2, "no", 4, 2)
    with pytest.raises(TypeError, match="routed_scaling_factor"):
        GroupedTopk(2, True, 4, 2, routed_scaling_factor="2.5")
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        GroupedTopk(2, True, 4, 2, routed_scaling_factor=math.nan)


def test_scored_routers_keep_their_settings_in_the_spec():
    # one store: the seed's attribute names read the validated spec
    r = GroupedTopKRouter(2, E, None, 4, 2, False, "sigmoid", 2.5, torch.zeros(E))
    assert isinstance(r, ScoredRouter)
    assert (r.scoring_func, r.renormalize, r.routed_scaling_factor, r.num_expert_group, r.topk_group) == (
        r.spec.scoring_func, False, 2.5, 4, 2)
    f = FusedTopKRouter(2, E, scoring_func="sqrtsoftplus")
    assert (f.spec.scoring_func, f.num_expert_group, f.topk_group) == ("sqrtsoftplus", 1, 1)


class _Eplb:
    """A stand-in EPLB state: physical id = logical id + 100."""

    def map_logical_to_physical(self, ids):
        return ids + 100


@pytest.mark.parametrize("name", BUILDERS)
def test_eplb_state_given_at_construction(name):
    # enable_eplb is True exactly when eplb_state is given; the map is applied in select_experts
    assert BUILDERS[name]().enable_eplb is False
    r = BUILDERS[name](eplb_state=_Eplb())
    assert r.enable_eplb is True
    cols = E + 2 if name == "zero" else E
    x, logits = torch.zeros(5, 4), spread_logits(5, cols)
    plain = BUILDERS[name]()
    kw = dict(input_ids=torch.arange(5)) if name == "hash" else {}
    _, ids = r.select_experts(x, logits, **kw)
    _, ref = plain.select_experts(x, logits, **kw)
    assert torch.equal(ids, ref + 100)
    assert BUILDERS[name](eplb_state=_Eplb(), enable_eplb=True).enable_eplb is True
    with pytest.raises(ValueError, match="eplb_state"):
        BUILDERS[name](enable_eplb=True)
    with pytest.raises(TypeError, match="eplb_state"):
        BUILDERS[name](eplb_state=object())


def _recording_table(checks_values: bool):
    """A kernel table under a name no router knows: it records the calls and runs the torch twins."""
    torch_table = kernels_for("torch")
    calls = []

    def route(logits, spec, bias, indices_type):
        calls.append(("route", spec, bias))
        return torch_table.route(logits, spec, bias, indices_type)

    def hash_route(logits, table, input_ids, spec, indices_type):
        calls.append(("hash_route", spec, table))
        return torch_table.hash_route(logits, table, input_ids, spec, indices_type)

    return Kernels("recording", route=route, hash_route=hash_route, experts=None, checks_values=checks_values), calls


@pytest.mark.parametrize("name", ["fused", "bias", "hash", "grouped", "zero"])
def test_routers_call_the_kernel_table(name):
    # the table is called with the router's spec and bias; the backend name is only displayed
    table, calls = _recording_table(checks_values=True)
    r = BUILDERS[name](kernels=table)
    assert r.kernels is table and r.backend == "recording"
    cols = E + 2 if name == "zero" else E
    kw = dict(input_ids=torch.arange(3)) if name == "hash" else {}
    r.select_experts(torch.zeros(3, 4), spread_logits(3, cols), **kw)
    (op, spec, extra), = calls
    assert spec is r.spec
    assert op == ("hash_route" if name == "hash" else "route")
    assert extra is (r.hash_indices_table if name == "hash" else r.e_score_correction_bias)
    assert BUILDERS[name]().kernels is kernels_for("torch")  # the default table
    with pytest.raises(TypeError, match="kernels"):
        BUILDERS[name](kernels="torch")


def _nan_weights(h, g, k, r):
    w, ids = llama4_routing_function(h, g, k, r)
    w[1, 0] = float("nan")
    return w, ids


def _inf_weights(h, g, k, r):
    w, ids = llama4_routing_function(h, g, k, r)
    return w.double() * 1e300, ids  # finite in float64, inf once cast to float32


@pytest.mark.parametrize("fn", [_nan_weights, _inf_weights])
def test_custom_router_non_finite_weights(fn):
    # issue #12 item 6: the reference path refuses them; the kernel path lets them through (documented)
    x, logits = torch.zeros(3, 4), spread_logits(3, E)
    with pytest.raises(ValueError, match="topk_weights.*custom_routing_function.*non-finite"):
        CustomRoutingRouter(2, E, custom_routing_function=fn).select_experts(x, logits)
    table, _ = _recording_table(checks_values=False)
    w, _ = CustomRoutingRouter(2, E, custom_routing_function=fn, kernels=table).select_experts(x, logits)
    assert not bool(torch.isfinite(w).all())
    bad = logits.clone()
    bad[0, 0] = float("nan")  # nor are the logits checked there: the function sees them as they are
    CustomRoutingRouter(2, E, custom_routing_function=llama4_routing_function, kernels=table).select_experts(x, bad)


ROUTERS = [FusedTopKRouter, FusedTopKBiasRouter, GroupedTopKRouter, ZeroExpertRouter, CustomRoutingRouter,
           BaseRouter, ScoredRouter, GroupedTopk]


@pytest.mark.parametrize("cls", ROUTERS + [create_fused_moe_router], ids=lambda c: c.__name__)
def test_docstrings_give_the_math_and_every_parameter(cls):
    # help(cls) shows the class's own docstring (not the base's): math first, then every parameter
    doc = cls.__dict__.get("__doc__") if inspect.isclass(cls) else cls.__doc__
    assert doc, f"{cls.__name__} has no docstring of its own"
    first = doc.strip().splitlines()[0]
    assert "=" in first or "->" in first, f"{cls.__name__}: the docstring should open with the math: {first!r}"
    params = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls).parameters
    missing = [p for p in params if p != "self" and p not in doc]
    assert not missing, f"{cls.__name__} does not describe {missing}"
