"""create_fused_moe_router (SPEC §2): class priority order and argument pass-through."""

import torch

from moekit import (
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
    ZeroExpertRouter,
    create_fused_moe_router,
)
from reference import llama4_routing_function

E = 8
BIAS = torch.zeros(E)
TABLE = torch.zeros(16, 2, dtype=torch.int64)


def _make(**kw):
    return create_fused_moe_router(top_k=2, global_num_experts=E, **kw)


def test_priority_order():
    # ZeroExpert > Grouped > Custom > FusedTopKBias (bias or hash table) > FusedTopK
    grouped = dict(use_grouped_topk=True, num_expert_group=2, topk_group=1)
    zero = dict(zero_expert_type="identity", e_score_correction_bias=torch.zeros(E + 2), num_logical_experts=E)
    custom = dict(custom_routing_function=llama4_routing_function)
    assert type(_make(**zero, **grouped, **custom)) is ZeroExpertRouter
    assert type(_make(**grouped, **custom, e_score_correction_bias=BIAS)) is GroupedTopKRouter
    assert type(_make(**custom, e_score_correction_bias=BIAS, hash_indices_table=TABLE)) is CustomRoutingRouter
    assert type(_make(e_score_correction_bias=BIAS)) is FusedTopKBiasRouter
    assert type(_make(hash_indices_table=TABLE)) is FusedTopKBiasRouter
    assert type(_make()) is FusedTopKRouter


def test_arguments_reach_the_router():
    # scoring_func / renormalize / routed_scaling_factor / grouping land on the chosen router
    r = _make(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
              routed_scaling_factor=2.5, renormalize=False, e_score_correction_bias=BIAS)
    assert (r.num_expert_group, r.topk_group, r.scoring_func, r.routed_scaling_factor, r.renormalize) == (
        4, 2, "sigmoid", 2.5, False)
    assert torch.equal(r.e_score_correction_bias, BIAS)
    r = _make(scoring_func="sqrtsoftplus", routed_scaling_factor=1.5)
    assert r.scoring_func == "sqrtsoftplus" and r.routed_scaling_factor == 1.5
    r = _make(custom_routing_function=llama4_routing_function, routed_scaling_factor=3.0)
    assert r.routed_scaling_factor == 3.0
    r = _make(indices_type_getter=lambda: torch.int64)
    assert r.indices_type == torch.int64
    z = _make(zero_expert_type="identity", e_score_correction_bias=torch.zeros(E + 3), num_logical_experts=E)
    assert z.num_zero_experts == 3 and z.renormalize is True  # factory default renormalize=True passes through
