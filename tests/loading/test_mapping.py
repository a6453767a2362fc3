"""fused_moe_make_expert_params_mapping and MoERunner.load_weights (SPEC §6), without transformers."""

import pytest
import torch

import moekit
import moekit.loading
from moekit import FusedMoE, fused_moe_make_expert_params_mapping
from reference import ref_experts, ref_route

E, K, H, I = 4, 2, 12, 8


def _layer(**kw):
    return FusedMoE(E, K, H, I, backend="torch", **kw)


def _per_expert(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = {e: dict(gate=torch.randn(I, H, generator=g), up=torch.randn(I, H, generator=g), down=torch.randn(H, I, generator=g)) for e in range(E)}
    if bias:
        for e in range(E):
            w[e].update(gate_b=torch.randn(I, generator=g), up_b=torch.randn(I, generator=g), down_b=torch.randn(H, generator=g))
    return w


def _check(layer, w, bias=False):
    re_ = layer.routed_experts
    for e in range(E):
        torch.testing.assert_close(re_.w13_weight[e], torch.cat([w[e]["gate"], w[e]["up"]]), rtol=0, atol=0)
        torch.testing.assert_close(re_.w2_weight[e], w[e]["down"], rtol=0, atol=0)
        if bias:
            torch.testing.assert_close(re_.w13_bias[e], torch.cat([w[e]["gate_b"], w[e]["up_b"]]), rtol=0, atol=0)
            torch.testing.assert_close(re_.w2_bias[e], w[e]["down_b"], rtol=0, atol=0)


def test_mapping_matches_seed_semantics():
    m = fused_moe_make_expert_params_mapping(None, "gate_proj", "down_proj", "up_proj", num_experts=3)
    assert len(m) == 9
    assert m[:3] == [
        ("experts.routed_experts.w13_", "experts.0.gate_proj.", 0, "w1"),
        ("experts.routed_experts.w2_", "experts.0.down_proj.", 0, "w2"),
        ("experts.routed_experts.w13_", "experts.0.up_proj.", 0, "w3"),
    ]
    m = fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", 3, routed_experts_prefix="experts")
    assert ("experts.experts.w13_", "experts.2.w3.", 2, "w3") in m
    # round 64: vLLM's form (param_name starts "experts." as weight_name does); "" gave ".w13_"
    m = fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", 3, routed_experts_prefix="")
    assert ("experts.w13_", "experts.2.w3.", 2, "w3") in m and ("experts.w2_", "experts.0.w2.", 0, "w2") in m


def test_mapping_redundant_experts_map_physical_to_logical():
    m = fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", num_experts=4, num_redundant_experts=3)
    physical = {(eid, shard): name for _, name, eid, shard in m}
    assert len(m) == 3 * 7
    assert physical[(4, "w1")] == "experts.0.w1." and physical[(6, "w2")] == "experts.2.w2."
    assert physical[(3, "w3")] == "experts.3.w3."


def test_mapping_bad_arguments():
    with pytest.raises(ValueError, match="num_experts"):
        fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", 0)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", 4, -1)
    with pytest.raises(ValueError, match="ckpt_up_proj_name"):
        fused_moe_make_expert_params_mapping(None, "w1", "w2", "", 4)


@pytest.mark.parametrize("style", ["proj", "mixtral"])
def test_load_per_expert_names(style):
    layer = _layer()
    w = _per_expert()
    names = {"proj": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}[style]
    pairs = [(f"model.layers.0.mlp.experts.{e}.{n}.weight", w[e][k]) for e in range(E) for n, k in zip(names, ("gate", "up", "down"))]
    consumed = layer.load_weights(iter(pairs))
    assert consumed == {n for n, _ in pairs}
    _check(layer, w)


def test_load_with_biases_and_router_and_dtype_cast():
    gate = torch.nn.Linear(H, E, bias=False)
    layer = _layer(has_bias=True, gate=gate, params_dtype=torch.bfloat16)
    w = _per_expert(1, bias=True)
    pairs = []
    for e in range(E):
        for n, k in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            pairs += [(f"experts.{e}.{n}.weight", w[e][k]), (f"experts.{e}.{n}.bias", w[e][k + "_b"])]
    router_w = torch.randn(E, H)
    pairs.append(("gate.weight", router_w))
    layer.load_weights(pairs)
    wb = {e: {k: v.bfloat16().float() for k, v in d.items()} for e, d in w.items()}
    layer.routed_experts.float()
    _check(layer, wb, bias=True)
    torch.testing.assert_close(layer.gate.weight, router_w, rtol=0, atol=0)  # the gate keeps its own dtype


def test_load_user_expert_mapping():
    mapping = fused_moe_make_expert_params_mapping(None, "fc_in_gate", "fc_out", "fc_in_up", E)
    layer = _layer(expert_mapping=mapping)
    w = _per_expert(2)
    pairs = [(f"experts.{e}.{n}.weight", w[e][k]) for e in range(E) for n, k in (("fc_in_gate", "gate"), ("fc_in_up", "up"), ("fc_out", "down"))]
    layer.load_weights(pairs)
    _check(layer, w)
    with pytest.raises(KeyError, match=r"experts\.0\.gate_proj\.weight"):  # not in the user's mapping
        layer.load_weights([("experts.0.gate_proj.weight", w[0]["gate"])])


@pytest.mark.parametrize("layout", ["rows", "transposed_interleaved", "transposed"])
def test_load_fused_layouts(layout):
    layer = _layer(has_bias=True)
    w = _per_expert(3, bias=True)
    gate = torch.stack([w[e]["gate"] for e in range(E)])  # [E, I, H]
    up = torch.stack([w[e]["up"] for e in range(E)])
    down = torch.stack([w[e]["down"] for e in range(E)])  # [E, H, I]
    gb = torch.stack([w[e]["gate_b"] for e in range(E)])
    ub = torch.stack([w[e]["up_b"] for e in range(E)])
    db = torch.stack([w[e]["down_b"] for e in range(E)])
    if layout == "rows":
        gu, dn, gub = torch.cat([gate, up], 1), down, torch.cat([gb, ub], 1)
    else:
        if layout == "transposed_interleaved":  # columns g0 u0 g1 u1 ...
            gu = torch.stack([gate, up], dim=2).reshape(E, 2 * I, H).transpose(1, 2)
            gub = torch.stack([gb, ub], dim=2).reshape(E, 2 * I)
        else:
            gu, gub = torch.cat([gate, up], 1).transpose(1, 2), torch.cat([gb, ub], 1)
        dn = down.transpose(1, 2)
    layer.load_weights(
        [("experts.gate_up_proj", gu), ("experts.down_proj", dn), ("experts.gate_up_proj_bias", gub), ("experts.down_proj_bias", db)],
        fused_layout=layout,
    )
    _check(layer, w, bias=True)
    assert layer.routed_experts.loaded


def test_load_zero_expert_rows_are_dropped():
    z = 2
    layer = FusedMoE(E, K, H, I, backend="torch", zero_expert_type="identity", e_score_correction_bias=torch.zeros(E + z))
    w = _per_expert(4)
    gu = torch.cat([torch.stack([w[e]["gate"] for e in range(E)]), torch.stack([w[e]["up"] for e in range(E)])], 1)
    gu = torch.cat([gu, torch.randn(z, 2 * I, H)])  # LongCat: E + Z rows
    layer.load_weights([("experts.gate_up_proj", gu), ("experts.down_proj", torch.stack([w[e]["down"] for e in range(E)]))])
    _check(layer, w)
    # per-expert names of zero experts (gate/up rows only) are consumed and ignored
    assert layer.load_weights([(f"experts.{E + 1}.gate_proj.weight", torch.randn(I, H))]) == {f"experts.{E + 1}.gate_proj.weight"}


def test_unknown_and_misshaped_names_raise_naming_the_key():
    layer = _layer()
    with pytest.raises(KeyError, match="mlp.foo.weight"):
        layer.load_weights([("mlp.foo.weight", torch.zeros(3))])
    with pytest.raises(KeyError, match=r"experts\.9\.w1\.weight"):
        layer.load_weights([("experts.9.w1.weight", torch.zeros(I, H))])
    with pytest.raises(ValueError, match=r"experts\.1\.down_proj\.weight.*\[8, 12\].*\[12, 8\]"):
        layer.load_weights([("experts.1.down_proj.weight", torch.zeros(I, H))])
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj.*\[4, 16, 11\]"):
        layer.load_weights([("experts.gate_up_proj", torch.zeros(E, 2 * I, H - 1))])
    gated = _layer(gate=torch.nn.Linear(H, E, bias=False))
    with pytest.raises(ValueError, match=r"gate\.weight.*\[4, 11\].*\[4, 12\]"):
        gated.load_weights([("gate.weight", torch.zeros(E, H - 1))])


def test_loaded_layer_computes_the_naive_reference():
    layer = _layer(renormalize=True)
    w = _per_expert(5)
    layer.load_weights([(f"experts.{e}.{n}.weight", w[e][k]) for e in range(E) for n, k in (("w1", "gate"), ("w3", "up"), ("w2", "down"))])
    x = torch.randn(5, H, dtype=torch.float64)
    logits = torch.randn(5, E, dtype=torch.float64)
    layer.double()
    out = layer(x, logits)
    w13 = torch.stack([torch.cat([w[e]["gate"], w[e]["up"]]) for e in range(E)]).double()
    w2 = torch.stack([w[e]["down"] for e in range(E)]).double()
    rw, ids, _ = ref_route(logits, K, renormalize=True)
    ref = ref_experts(x, w13, w2, rw, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # routing weights are float32 by contract
    assert moekit.MoERunner.load_weights  # the hook lives on the runner


def test_moekit_state_dict_round_trip():
    src = _layer(gate=torch.nn.Linear(H, E, bias=False), has_bias=True)
    src.load_expert_weights(torch.randn(E, 2 * I, H), torch.randn(E, H, I), torch.randn(E, 2 * I), torch.randn(E, H))
    dst = _layer(gate=torch.nn.Linear(H, E, bias=False), has_bias=True)
    sd = src.state_dict()
    loaded = set()
    assert moekit.loading.load_layer_weights(dst, sd.items(), loaded=loaded) == set(sd)
    assert dst.routed_experts.missing() == [] and loaded == {"gate.weight"}
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
