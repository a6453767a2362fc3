"""Round 66's audit: defects found by review helpers (and the round's own checks) and reproduced; each case names the
edge it covers."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from test_audit65 import nemotron_h_model


def _nemotron_h(tmp_path):
    nemotron_h_model().save_pretrained(tmp_path)
    return tmp_path


def test_a_non_gated_expert_with_gate_and_up_keys_is_refused(tmp_path):
    # edge: a relu2 expert has one input projection (Nemotron-H: up_proj); a checkpoint holding gate_proj AND up_proj
    # for one expert is a gated one, and the second key silently overwrote the first (the load "succeeded")
    path = _nemotron_h(tmp_path)
    (f,) = path.glob("*.safetensors")
    t = load_file(f)
    (up,) = [k for k in t if k.endswith("experts.0.up_proj.weight")]
    t[up.replace("up_proj", "gate_proj")] = torch.randn_like(t[up])
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="expert 0 also has a up_proj key|expert 0 also has a gate_proj key"):
        moekit.load_moe_layers(str(path), progress=False)


def test_a_non_gated_layer_refuses_gate_and_up_in_load_weights():
    # edge: the same through layer.load_weights (one call), with w1 / w3 names as well
    layer = moekit.FusedMoE(4, 2, 8, 6, activation="relu2", params_dtype=torch.float32)
    for gate, up in (("gate_proj", "up_proj"), ("w1", "w3")):
        w = {f"experts.0.{gate}.weight": torch.randn(6, 8), f"experts.0.{up}.weight": torch.randn(6, 8)}
        with pytest.raises(ValueError, match="not gated"):
            layer.load_weights(w.items())
    # one input projection per expert still loads, under either name, and a reload of the same key is fine
    w = {f"experts.{e}.{'up_proj' if e % 2 else 'gate_proj'}.weight": torch.randn(6, 8) for e in range(4)}
    layer.load_weights(list(w.items()) * 2)
    for e, t in enumerate(w.values()):
        torch.testing.assert_close(layer.routed_experts.w13_weight[e], t)


def test_tp_refusal_names_sizes_that_fit():
    # edge: the refusal of a TP slice off the fp8 block boundaries advised "a TP size that divides I / 128 = 1.5625"
    # when I itself is no multiple of the block (partial blocks: no TP size above 1 fits); else it names those that do
    from moekit.experts.params import check_tp_split
    fmt = moekit.parse_quant_config({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="200 is not a multiple of 128, so no TP size above 1 fits") as err:
        check_tp_split(fmt, 200, 2)
    assert "1.5625" not in str(err.value)
    with pytest.raises(ValueError, match="TP sizes that fit: 2, 3, 4, 6, 12;"):
        check_tp_split(fmt, 1536, 8)
    check_tp_split(fmt, 1536, 12)  # 128 rows a rank: fits


def _qwen3_fp8(path, **fmt_extra):
    import json
    E, K, H, I = 4, 2, 128, 128
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / 11, torch.randn(E, H, I, generator=g) / 11
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, moekit.parse_quant_config(fp8))
    pre, t = "model.layers.0.mlp.", {"model.layers.0.mlp.gate.weight": torch.randn(E, H, generator=g)}
    for e in range(E):
        for p, (w, s) in {"gate_proj": (q13[e, :I], s13[e, :1]), "up_proj": (q13[e, I:], s13[e, 1:]),
                          "down_proj": (q2[e], s2[e])}.items():
            t[f"{pre}experts.{e}.{p}.weight"], t[f"{pre}experts.{e}.{p}.weight_scale_inv"] = w, s
    cfg = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, norm_topk_prob=True, dtype="float32", hidden_act="silu",
               quantization_config=dict(fp8, **fmt_extra))
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(t, path / "model.safetensors")
    return fp8


def test_asking_for_the_shipped_format_loads_it(tmp_path):
    # edge: a Qwen3-FP8-style checkpoint lists modules_to_not_convert; load_moe_layers(path, quant_config=<the same fp8
    # dict>) was refused as a re-quantisation (format equality included the module list); another format still is
    fp8 = _qwen3_fp8(tmp_path, modules_to_not_convert=["lm_head", "mlp.gate"])
    (name, shipped), = moekit.load_moe_layers(str(tmp_path), progress=False).items()
    (_, asked), = moekit.load_moe_layers(str(tmp_path), quant_config=fp8, progress=False).items()
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(asked(x), shipped(x))
    assert asked.routed_experts.quant == shipped.routed_experts.quant
    with pytest.raises(NotImplementedError, match="already quantised"):
        moekit.load_moe_layers(str(tmp_path), quant_config=dict(fp8, weight_block_size=[64, 64]), progress=False)


class _WithBias(torch.nn.Module):
    """Returns vLLM's (output, skipped bias) pair with a bias of ``shape``."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x, torch.ones(self.shape)


def _loaded(**kw):
    E, H, I = 8, 16, 8
    layer = moekit.FusedMoE(E, 2, H, I, backend="torch", **kw)
    g = torch.Generator().manual_seed(0)
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 4)
    return layer


@pytest.mark.parametrize("where", ["shared_experts", "routed_output_transform"])
def test_a_skipped_bias_of_the_wrong_shape_is_refused(where):
    # edge: a module returning (output [T, H], bias) had any broadcastable bias added ([T, 1], [1]: silently) and a
    # wrong one failed in torch's words; a bias is [H] (skip_bias_add's [out_features]) or the output's shape
    x, lg = torch.randn(5, 16), torch.randn(5, 8)
    for shape in ((5, 1), (1,), (5, 16, 1), (17,)):
        said = rf"{where} returned \(output \[5, 16\], bias \[{', '.join(map(str, shape))}\]\)"
        with pytest.raises(ValueError, match=said):
            _loaded(**{where: _WithBias(shape)})(x, lg)
    for shape in ((16,), (1, 16), (5, 16)):  # added, as before ([1, H] broadcasts as [H] does: review)
        plain = _loaded(**{where: torch.nn.Identity()})(x, lg)
        torch.testing.assert_close(_loaded(**{where: _WithBias(shape)})(x, lg), plain + 1)


def test_custom_weights_past_float32_once_scaled_are_refused():
    # edge: the reference path checked a custom routing function's weights before routed_scaling_factor, so finite
    # weights that overflow once scaled reached the output as inf
    fn = lambda h, g, k, r: (torch.tensor([[3e38, 0.5]] * 4), torch.tensor([[0, 1]] * 4))  # noqa: E731
    layer = _loaded(custom_routing_function=fn, routed_scaling_factor=10.0)
    with pytest.raises(ValueError, match="times routed_scaling_factor=10.0 contains non-finite"):
        layer(torch.randn(4, 16), torch.randn(4, 8))


def _meta_layer(**kw):
    E, H, I = 8, 16, 8
    layer = moekit.FusedMoE(E, 2, H, I, device="meta", backend="torch", **kw).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 4)
    return layer


def _bias_case():
    """(bias, the meta layer's keywords, a loaded-bias reference layer without weights, x, logits)"""
    bias = torch.randn(8)
    kw = dict(scoring_func="sigmoid", e_score_correction_bias=torch.zeros(8, device="meta"))
    ref = moekit.FusedMoE(8, 2, 16, 8, scoring_func="sigmoid", e_score_correction_bias=bias, backend="torch")
    return bias, kw, ref, torch.randn(6, 16), torch.randn(6, 8)


def test_a_selection_bias_materialised_by_to_empty_must_be_loaded():
    # edge: a layer built on meta (as the meta-bias error advises), then to_empty: the expert weights are guarded, but
    # the router routed with whatever memory to_empty left in its selection bias (output 34.7 off, no error)
    bias, kw, ref, x, lg = _bias_case()
    layer = _meta_layer(**kw)
    assert torch.isnan(layer.router.e_score_correction_bias).all()
    with pytest.raises(RuntimeError, match="e_score_correction_bias came from to_empty"):
        layer(x, lg)
    # each way of writing it clears the refusal: a state dict, load_weights, an assignment
    ref.load_expert_weights(layer.routed_experts.w13_weight.clone(), layer.routed_experts.w2_weight.clone())
    want = ref(x, lg)
    layer.load_state_dict(ref.state_dict())
    torch.testing.assert_close(layer(x, lg), want)
    layer = _meta_layer(**kw)
    layer.load_weights([("router.e_score_correction_bias", bias)])
    torch.testing.assert_close(layer(x, lg), want)
    layer = _meta_layer(**kw)
    layer.router.e_score_correction_bias = bias.clone()
    torch.testing.assert_close(layer(x, lg), want)


def test_a_hash_table_materialised_by_to_empty_must_be_loaded():
    # edge: the same for hash routing's table (to_empty's memory as expert ids)
    table = torch.randint(0, 8, (32, 2))
    layer = _meta_layer(hash_indices_table=torch.zeros(32, 2, dtype=torch.int64, device="meta"))
    x, lg, ids = torch.randn(5, 16), torch.randn(5, 8), torch.randint(0, 32, (5,))
    with pytest.raises(RuntimeError, match="hash_indices_table came from to_empty"):
        layer(x, lg, input_ids=ids)
    layer.load_weights([("router.hash_indices_table", table)])
    w, got = layer.router.select_experts(x, lg, input_ids=ids)
    assert torch.equal(got.long(), table[ids])


def test_devices_this_machine_lacks_are_named():
    # edge: to_empty(device="cuda") and FusedMoE(device="xpu" / "mps") on a machine without them raised torch's
    # "Torch not compiled with ..." AssertionError / NotImplementedError; layer.to("cuda") was already checked
    def here(dev):
        return torch.backends.mps.is_available() if dev == "mps" else getattr(torch, dev).is_available()

    gone = [d for d in ("cuda", "xpu", "mps") if not here(d)]
    for dev in gone:
        with pytest.raises(ValueError, match=f"device='{dev}': no {'CUDA' if dev == 'cuda' else dev} device"):
            moekit.FusedMoE(4, 2, 8, 4, device=dev)
        with pytest.raises(ValueError, match=f"no {'CUDA' if dev == 'cuda' else dev} device"):
            moekit.FusedMoE(4, 2, 8, 4, device="meta").to_empty(device=dev)


def test_grouped_topk_num_fused_shared_experts_type():
    # edge: a string '1' was refused as NotImplementedError printed "=1"; a type error is a TypeError
    with pytest.raises(TypeError, match="num_fused_shared_experts must be an int.*'1'"):
        moekit.GroupedTopk(2, True, 2, 1, num_fused_shared_experts="1")
    with pytest.raises(NotImplementedError, match="num_fused_shared_experts=1:"):
        moekit.GroupedTopk(2, True, 2, 1, num_fused_shared_experts=1)
    moekit.GroupedTopk(2, True, 2, 1, num_fused_shared_experts=None)  # the seed-era None: none


def test_a_non_strict_export_keeps_the_routing_weights_gradient():
    # edge: torch.export (non-strict) inlined the straight-through Function's forward (the detached kernel weights):
    # the exported layer trained with the gate path of d hidden_states missing (0.21 off) and no gate.weight gradient
    import copy
    from torch.export import Dim, export
    E, H, I = 8, 32, 16
    torch.manual_seed(0)
    layer = moekit.FusedMoE(E, 2, H, I, backend="torch", gate=torch.nn.Linear(H, E, bias=False))
    layer.load_expert_weights(torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5)
    exported = export(copy.deepcopy(layer), (torch.randn(7, H),), dynamic_shapes=({0: Dim("T", min=0, max=1024)},),
                      strict=False).module()
    x0, dy = torch.randn(9, H), torch.randn(9, H)
    grads = []
    for m in (layer, exported):
        x = x0.clone().requires_grad_()
        m(x).backward(dy)
        grads.append((x.grad, dict(m.named_parameters())["gate.weight"].grad))
    (dx, dg), (dx_e, dg_e) = grads
    assert dg_e is not None
    torch.testing.assert_close(dx_e, dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg_e, dg, rtol=1e-5, atol=1e-6)


def test_expert_tensors_swapped_in_are_checked():
    # edge: unquantised expert tensors given through functional_call (or assigned) were never checked: torch's matmul
    # errors, an IndexError for fewer experts, or a dtype error blamed on hidden_states
    from torch.func import functional_call
    layer = _loaded()
    x, lg = torch.randn(3, 16), torch.randn(3, 8)
    w13, w2 = layer.routed_experts.w13_weight, layer.routed_experts.w2_weight
    cases = {"w13_weight": (w13[:4], r"w13_weight must have shape \[8, 16, 16\].*got \[4, 16, 16\]"),
             "w2_weight": (torch.zeros(8, 16, 9), r"w2_weight must have shape \[8, 16, 8\].*got \[8, 16, 9\]")}
    for name, (t, said) in cases.items():
        with pytest.raises(ValueError, match=said):
            functional_call(layer, {f"routed_experts.{name}": t}, (x, lg))
    with pytest.raises(TypeError, match="one float dtype, got w13_weight torch.float32, w2_weight torch.float64"):
        functional_call(layer, {"routed_experts.w2_weight": w2.double()}, (x, lg))
    # right tensors are followed (twice the down projection: twice the output), and the layer's own still work
    want = layer(x, lg)
    torch.testing.assert_close(functional_call(layer, {"routed_experts.w2_weight": 2 * w2}, (x, lg)), 2 * want)
    torch.testing.assert_close(layer(x, lg), want)


def test_to_empty_refusal_clears_on_every_kind_of_load_and_covers_non_meta_layers():
    # review of this round's refusal: a load under inference_mode (no version counter) or through .data.copy_ (its
    # own counter) was refused forever; to_empty of a layer not on meta (or twice) left the bias uninitialised
    bias, kw, ref, x, lg = _bias_case()
    layer = _meta_layer(**kw)
    ref.load_expert_weights(layer.routed_experts.w13_weight.clone(), layer.routed_experts.w2_weight.clone())
    want = ref(x, lg)
    with torch.inference_mode():
        layer = moekit.FusedMoE(8, 2, 16, 8, device="meta", backend="torch", **kw).to_empty(device="cpu")
        layer.load_state_dict(ref.state_dict())
        torch.testing.assert_close(layer(x, lg), want)
    layer = _meta_layer(**kw)
    layer.router.e_score_correction_bias.data.copy_(bias)
    torch.testing.assert_close(layer(x, lg), want)
    for make in (lambda: _meta_layer(**kw).to_empty(device="cpu"), lambda: copy.deepcopy(ref).to_empty(device="cpu")):
        layer = make()
        with pytest.raises(RuntimeError, match="e_score_correction_bias came from to_empty"):
            layer.router.select_experts(x, lg)
    moved = copy.deepcopy(ref).to(torch.float64).to(torch.float32)  # casts and moves keep the values: no refusal
    torch.testing.assert_close(moved(x, lg), want)


def test_functional_call_on_a_template_layer_needs_no_load():
    # edge: functional_call supplying every expert tensor of a never-loaded layer (MAML, stack_module_state) was
    # refused as "forward before the expert weights were loaded"; a partial supply still is
    from torch.func import functional_call
    template, loaded = moekit.FusedMoE(8, 2, 16, 8, backend="torch"), _loaded()
    x, lg = torch.randn(3, 16), torch.randn(3, 8)
    given = {f"routed_experts.{n}": t.detach().clone() for n, t in loaded.routed_experts.expert_tensors().items()}
    torch.testing.assert_close(functional_call(template, given, (x, lg)), loaded(x, lg))
    with pytest.raises(RuntimeError, match="forward before the expert weights were loaded"):
        functional_call(template, {"routed_experts.w2_weight": given["routed_experts.w2_weight"]}, (x, lg))


def test_a_parametrized_never_loaded_layer_is_still_refused():
    # review: the functional_call exemption (no expert tensor a Parameter) let a never-loaded layer whose expert
    # tensors are parametrized (computed plain tensors) compute with its unset NaN values
    from torch.nn.utils import parametrize

    class Same(torch.nn.Module):
        def forward(self, w):
            return w * 1.0

    layer = moekit.FusedMoE(8, 2, 16, 8, backend="torch")
    for name in ("w13_weight", "w2_weight"):
        parametrize.register_parametrization(layer.routed_experts, name, Same())
    with pytest.raises(RuntimeError, match="forward before the expert weights were loaded"):
        layer(torch.randn(3, 16), torch.randn(3, 8))


def test_a_held_state_dict_of_relaid_4bit_weights_follows_a_rebalance():
    # review: a 4-bit layer stored re-laid ("rega", the Triton table on CUDA) saves its codes as copies and its scales
    # by reference; after a rebalance (slots moved in place) a held dict paired the old codes with the moved scales.
    # Simulated on CPU: the torch table allowed the re-laid layout, a slot swap as rebalance's weight moves do.
    import dataclasses
    from moekit.config import MoEConfig
    from moekit.experts.placement import ExpertPlacement
    from moekit.experts.routed import RoutedExperts
    from moekit.ops.kernels import kernels_for
    kernels = dataclasses.replace(kernels_for("torch"), packed_layouts=frozenset({"spec", "rega"}))
    E, H, I = 4, 128, 128
    c = MoEConfig(E, 2, H, I, params_dtype=torch.bfloat16, quant_config=moekit.parse_quant_config(
        {"quant_method": "mxfp4"}))
    placement = ExpertPlacement.build(E, 2, ep_size=2, ep_rank=0)
    g = torch.Generator().manual_seed(0)
    w13, w2 = (torch.randn(E, 2 * I, H, generator=g) / 8).bfloat16(), (torch.randn(E, H, I, generator=g) / 8).bfloat16()
    experts = RoutedExperts("l", torch.bfloat16, c, placement=placement, kernels=kernels)
    assert experts.packed_layout == "rega"
    experts.load_expert_weights(w13, w2)
    experts.placement_movable = True  # (what an EPLB layer's executor sets)
    held = experts.state_dict()
    p2l = list(placement.physical_to_logical)
    p2l[0], p2l[1] = p2l[1], p2l[0]
    with torch.no_grad():
        for t in experts.expert_tensors().values():
            first = t[0].clone()
            t[0].copy_(t[1])
            t[1].copy_(first)
    experts.set_physical_to_logical(tuple(p2l))
    fresh = RoutedExperts("l", torch.bfloat16, c, placement=placement)
    fresh.load_state_dict(held)
    want = RoutedExperts("l", torch.bfloat16, c, placement=placement.with_physical_to_logical(tuple(p2l)))
    want.load_expert_weights(w13, w2)
    assert fresh.placement == want.placement
    for name in ("w13_weight", "w2_weight", "w13_scale", "w2_scale"):
        assert torch.equal(getattr(fresh, name), getattr(want, name)), name


def test_layers_with_this_rounds_caches_pickle_and_copy():
    # CI of this round: the weakly held caches (the swapped-in check's, an EPLB layer's remembered state dicts) made a
    # layer that ran a forward or saved a state dict unpicklable ("cannot pickle 'weakref.ReferenceType'")
    import pickle
    layer = _loaded()
    layer.routed_experts.placement_movable = True  # (an EPLB layer's: its saved dicts are remembered)
    x, lg = torch.randn(3, 16), torch.randn(3, 8)
    want = layer(x, lg)
    held = layer.state_dict()
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(other(x, lg), want)
        bad = other.routed_experts.w2_weight.data[:4].clone()
        with pytest.raises(ValueError, match="w2_weight must have shape"):  # the copy checks its own swaps
            torch.func.functional_call(other, {"routed_experts.w2_weight": bad}, (x, lg))
    assert held  # (kept alive across the pickles)
