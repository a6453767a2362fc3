"""Round 64's audit: defects found by review helpers and reproduced, each case names the edge it covers.

Seed conformance (vLLM's conventions where the seeds are silent): the expert-params mapping's parameter names,
names relative to the layer in ``load_weights``, keyword calls of a custom routing function, ``indices_type``'s
message for uint32, a hash router's ``routing_method_type``, and a shared selection bias that its owner rounds.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import moekit
from moekit.routing.custom import by_keyword

E, K, H, I = 4, 2, 8, 4


def _loaded(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3)
    return layer


# --- the expert-params mapping: vLLM's form, so a model's name.replace(weight_name, param_name) finds the parameter

def test_mapping_param_names_replace_into_model_parameter_names():
    # a model whose MoE layer is named "experts" (vLLM's and transformers' name): the replaced checkpoint name is a
    # parameter of the model (round 63's form, "routed_experts.w13_", dropped the "experts." and missed it)
    model = torch.nn.Module()
    model.experts = moekit.FusedMoE(E, K, H, I)
    params = dict(model.named_parameters())
    mapping = moekit.fused_moe_make_expert_params_mapping(model.experts, "gate_proj", "down_proj", "up_proj", E)
    for param_name, weight_name, expert_id, shard_id in mapping:
        ckpt = f"{weight_name}weight"
        assert ckpt.replace(weight_name, param_name) in params, (param_name, weight_name)


@pytest.mark.parametrize("prefix, head", [("routed_experts", "experts.routed_experts."), ("", "experts.")])
def test_mapping_prefix_never_gives_a_leading_dot(prefix, head):
    # "" used to give ".w13_" (edge: the empty prefix)
    mapping = moekit.fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", 2, routed_experts_prefix=prefix)
    assert {p for p, *_ in mapping} == {f"{head}w13_", f"{head}w2_"}


def test_mapping_prefix_must_be_a_str():
    with pytest.raises(TypeError, match="routed_experts_prefix"):
        moekit.fused_moe_make_expert_params_mapping(None, "w1", "w2", "w3", 2, routed_experts_prefix=None)


def test_load_weights_takes_names_relative_to_the_layer_prefix():
    # vLLM's load_weights reads f"{layer_name}.{name}": "0.gate_proj.weight" for a layer at "….mlp.experts"
    g = torch.Generator().manual_seed(1)
    w = {(e, p): torch.randn(I if p != "down_proj" else H, H if p != "down_proj" else I, generator=g)
         for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")}
    rel = moekit.FusedMoE(E, K, H, I, prefix="model.layers.3.mlp.experts")
    full = moekit.FusedMoE(E, K, H, I)
    consumed = rel.load_weights([(f"{e}.{p}.weight", t) for (e, p), t in w.items()])
    full.load_weights([(f"experts.{e}.{p}.weight", t) for (e, p), t in w.items()])
    assert len(consumed) == 3 * E and rel.routed_experts.loaded
    assert torch.equal(rel.routed_experts.w13_weight, full.routed_experts.w13_weight)
    assert torch.equal(rel.routed_experts.w2_weight, full.routed_experts.w2_weight)
    # a layer without a prefix still refuses such a name (nothing to qualify it with)
    with pytest.raises(KeyError, match="0.gate_proj.weight"):
        moekit.FusedMoE(E, K, H, I).load_weights([("0.gate_proj.weight", w[0, "gate_proj"])])


# --- custom routing functions: called by the seed's keyword names where a positional call cannot work (vLLM calls by
# keyword; positional stays where it binds, so a routing module's hooks still see the four inputs)

def _seed_route(hidden_states, gating_output, topk, renormalize):
    w, ids = torch.topk(gating_output.float().softmax(-1), topk)
    return (w / w.sum(-1, keepdim=True) if renormalize else w), ids


def _kw_only(*, hidden_states, gating_output, topk, renormalize):
    return _seed_route(hidden_states, gating_output, topk, renormalize)


def _other_names(x, logits, k, renorm):
    return _seed_route(x, logits, k, renorm)


@pytest.mark.parametrize("fn, keyword", [
    (_seed_route, False),  # the seed's names, positional parameters: positionally, as before
    (_kw_only, True),  # keyword-only: failed positionally ("takes 0 positional arguments")
    (functools.partial(_seed_route, renormalize=False), True),  # partial over renormalize: "multiple values"
    (_other_names, False),  # other names: positionally, as before
    (lambda *args: _seed_route(*args), False),  # *args only
])
def test_custom_routing_function_call_forms(fn, keyword):
    assert by_keyword(fn) is keyword
    layer = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=fn, renormalize=False))
    ref = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=_other_names, renormalize=False))
    x, logits = torch.randn(5, H), torch.randn(5, E)
    torch.testing.assert_close(layer(x, logits), ref(x, logits), rtol=0, atol=0)


class _KwOnlyModule(torch.nn.Module):
    def forward(self, *, hidden_states, gating_output, topk, renormalize):
        return _seed_route(hidden_states, gating_output, topk, renormalize)


class _SeedModule(torch.nn.Module):
    def forward(self, hidden_states, gating_output, topk, renormalize):
        return _seed_route(hidden_states, gating_output, topk, renormalize)


def test_custom_routing_modules_partials_and_hooks():
    # a partial over a module, and a keyword-only module, are read by their forward (round 64's review: both failed)
    assert by_keyword(_KwOnlyModule()) and by_keyword(functools.partial(_SeedModule(), renormalize=False))
    x, logits = torch.randn(4, H), torch.randn(4, E)
    ref = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=_other_names, renormalize=False))(x, logits)
    for fn in (_KwOnlyModule(), functools.partial(_SeedModule(), renormalize=False)):
        layer = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=fn, renormalize=False))
        torch.testing.assert_close(layer(x, logits), ref, rtol=0, atol=0)
    module, seen = _SeedModule(), []  # a module that binds positionally is called so: its hooks see the inputs
    module.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=module, renormalize=False))(x, logits)
    assert seen == [4]


def test_custom_routing_function_with_an_unusable_signature_raises_at_construction():
    with pytest.raises(TypeError, match="custom_routing_function must take"):
        moekit.FusedMoE(E, K, H, I, custom_routing_function=lambda a, b: None)


def test_custom_routing_function_reassigned_is_called_in_its_own_form():
    layer = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=_other_names, renormalize=False))
    x, logits = torch.randn(3, H), torch.randn(3, E)
    before = layer(x, logits)
    layer.router.custom_routing_function = _kw_only  # positional call would raise
    torch.testing.assert_close(layer(x, logits), before, rtol=0, atol=0)


# --- indices_type, routing_method_type

def test_uint32_indices_type_is_refused_with_the_true_reason():
    with pytest.raises(TypeError, match="no comparison or indexing kernels for uint32"):
        moekit.fused_topk(torch.randn(2, H), torch.randn(2, E), K, True, indices_type=torch.uint32)
    with pytest.raises(TypeError, match="would wrap expert ids"):
        moekit.fused_topk(torch.randn(2, H), torch.randn(2, E), K, True, indices_type=torch.int16)


def test_hash_router_is_not_classified_as_a_softmax_top_k():
    # a hash router's ids are no top-k of scores: vLLM's bias router says Unspecified, not Renormalize
    layer = moekit.FusedMoE(E, K, H, I, hash_indices_table=torch.randint(0, E, (10, K)))
    assert layer.router.routing_method_type == moekit.RoutingMethodType.Unspecified
    assert moekit.FusedMoE(E, K, H, I).router.routing_method_type == moekit.RoutingMethodType.Renormalize


# --- a selection bias shared with its owner (vLLM's DeepSeek pattern; patch() shares the block's tensor)

def test_shared_selection_bias_rounded_by_its_owner_warns_once():
    owner = torch.nn.Module()  # e.g. the model's gate, which owns the bias Parameter the layer shares
    owner.e_score_correction_bias = torch.nn.Parameter(torch.randn(E) * 1e-3, requires_grad=False)
    layer = _loaded(moekit.FusedMoE(E, K, H, I, scoring_func="sigmoid",
                                    e_score_correction_bias=owner.e_score_correction_bias))
    x, logits = torch.randn(3, H), torch.randn(3, E)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, logits)  # float32 as built: no warning
    owner.to(torch.bfloat16)  # the owner's .to() rounds the shared Parameter in place
    layer.to(torch.float32)  # (the layer's own .to() cannot undo that)
    assert layer.router.e_score_correction_bias.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="e_score_correction_bias is now torch.bfloat16"):
        layer(x, logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, logits)  # once per router and dtype


# --- odd tensors into the public ops (round 64's odd-tensor review)

def _experts_args(e=E, h=H, i=I, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, generator=g), torch.randn(e, 2 * i, h, generator=g) * 0.3,
            torch.randn(e, h, i, generator=g) * 0.3, torch.rand(t, K, generator=g),
            torch.randint(0, max(e, 1), (t, K), generator=g))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("e, h, i", [(E, H, 0), (0, H, I), (E, 0, I)])
def test_fused_experts_refuses_empty_expert_sizes(backend, e, h, i):
    # I = 0 on Triton returned uninitialised memory; E = 0 / H = 0 raised ZeroDivisionError
    x, w1, w2, w, ids = _experts_args(E, H, I)
    x, w1, w2 = torch.randn(3, h), torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    with pytest.raises(ValueError, match=r"E, H and I >= 1"):
        moekit.fused_experts(x, w1, w2, w, ids.clamp(max=max(e - 1, 0)), backend=backend)


def test_quantised_experts_with_no_experts_name_the_weights():
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    w13, w2, s13, s2 = moekit.quantize_experts(torch.randn(2, 256, 128), torch.randn(2, 128, 128), cfg)
    with pytest.raises(ValueError, match=r"w1 \[0, 256, 128\] and w2 \[0, 128, 128\] hold E = 0"):
        moekit.fused_experts(torch.randn(3, 128), w13[:0], w2[:0], torch.rand(3, 1),
                             torch.zeros(3, 1, dtype=torch.long), quant_config=cfg, w1_scale=s13[:0], w2_scale=s2[:0])
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, H, I\] with E, H and I >= 1"):
        moekit.quantize_experts(torch.randn(0, 256, 128), torch.randn(0, 128, 128), cfg)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_ids_are_widened(backend, dtype):
    # uint8 ids passed the dtype check and then failed to compile in the Triton align kernel
    x, w1, w2, w, ids = _experts_args()
    ref = moekit.fused_experts(x, w1, w2, w, ids.int(), backend=backend)
    out = moekit.fused_experts(x, w1, w2, w, ids.to(dtype), backend=backend)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_torch_experts_run_on_the_meta_device():
    # a meta layer's forward (and fused_experts on meta tensors) raised "item() cannot be called on meta tensors"
    x, w1, w2, w, ids = (t.to("meta") for t in _experts_args())
    out = moekit.fused_experts(x, w1, w2, w, ids, backend="torch")
    assert out.device.type == "meta" and out.shape == x.shape
    layer = moekit.FusedMoE(E, K, H, I, device="meta", backend="torch")  # shape inference of a whole model on meta
    layer.load_expert_weights(w1, w2)
    assert layer(x, torch.empty(3, E, device="meta")).shape == (3, H)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_routers_refuse_non_float_hidden_states(dtype):
    # the zero experts' term of integer hidden states was all zeros (bool: True/False), silently
    bias = torch.zeros(E + 2)
    router = moekit.FusedMoE(E, K, H, I, zero_expert_type="identity", e_score_correction_bias=bias).router
    with pytest.raises(TypeError, match="hidden_states must be a float tensor"):
        router.select_experts(torch.ones(3, H, dtype=dtype), torch.randn(3, E + 2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_custom_routing_uint32_ids_and_foreign_devices(backend):
    # uint32 ids: the reference range check raised NotImplementedError ("min_all" for UInt32)
    def route(hidden_states, gating_output, topk, renormalize):
        w, ids = torch.topk(gating_output.softmax(-1), topk)
        return w, ids.to(torch.uint32)

    layer = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=route, renormalize=False, backend=backend))
    ref = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=_seed_route, renormalize=False, backend=backend))
    x, logits = torch.randn(4, H), torch.randn(4, E)
    torch.testing.assert_close(layer(x, logits), ref(x, logits), rtol=0, atol=0)

    def meta_weights(hidden_states, gating_output, topk, renormalize):  # weights on another device
        w, ids = _seed_route(hidden_states, gating_output, topk, renormalize)
        return w.to("meta"), ids

    bad = _loaded(moekit.FusedMoE(E, K, H, I, custom_routing_function=meta_weights, backend=backend))
    with pytest.raises(ValueError, match="topk_weights returned by custom_routing_function is on meta"):
        bad(x, logits)


def test_user_module_output_on_another_device_is_refused():
    # routed_output_transform returning a meta tensor made the layer's output a meta tensor
    class ToMeta(torch.nn.Module):
        def forward(self, x):
            return x.to("meta")

    layer = _loaded(moekit.FusedMoE(E, K, H, I, routed_output_transform=ToMeta()))
    with pytest.raises(ValueError, match="routed_output_transform returned a tensor on meta"):
        layer(torch.randn(3, H), torch.randn(3, E))


def test_int_dtype_message_lists_what_is_accepted():
    x, w1, w2, w, ids = _experts_args()
    with pytest.raises(TypeError, match=r"int16, int8 and uint8 are widened"):
        moekit.fused_experts(x, w1, w2, w, ids.to(torch.uint16) if hasattr(torch, "uint16") else ids.bool())


# --- batch invariance of the named LFM2-MoE routing (round 64's batch-invariance review)

def test_sigmoid_eps_routing_ties_go_to_the_lowest_id_whatever_the_batch():
    # torch.sigmoid's CPU vector loop and scalar tail differ by an ulp: two equal logits got unequal scores by their
    # memory position, so a tie's winner (and a K = 1 token's expert) depended on the batch
    from moekit.loading.routings import SigmoidEpsRouting
    n = 40
    router = SigmoidEpsRouting(n, bias=False, eps=1e-6)
    ties = torch.linspace(-6, 6, 4001)
    rows = torch.full((ties.numel(), n), -9.0)
    rows[:, 3] = rows[:, 36] = ties  # experts 3 and 36 tie for the top score in every row
    for r in range(ties.numel()):  # every row alone (round 64's review: 3 of 42 sampled rows went to 36 first)
        alone_w, alone_ids = router(None, rows[r : r + 1], 2, True)
        assert alone_ids[0].tolist() == [3, 36], (r, alone_ids)
    w, ids = router(None, rows, 2, True)
    assert (ids == torch.tensor([3, 36], dtype=ids.dtype)).all()
    assert torch.equal(w[:, 0], w[:, 1])


def test_zero_experts_with_the_weight_on_the_input_are_not_implemented():
    # SPEC §1: an argument the build cannot honour raises NotImplementedError (was a ValueError: it is both now)
    with pytest.raises(NotImplementedError, match="apply_router_weight_on_input") as info:
        moekit.FusedMoE(E, 1, H, I, zero_expert_type="identity", e_score_correction_bias=torch.zeros(E + 2),
                        apply_router_weight_on_input=True)
    assert isinstance(info.value, ValueError)


# --- layers as ordinary nn.Modules (round 64's module-integration review)

def test_replacing_routed_experts_runs_the_new_experts():
    # the executor kept the replaced experts, now outside parameters(), state_dict() and .to(): they kept running
    a, b = _loaded(moekit.FusedMoE(E, K, H, I), 1), _loaded(moekit.FusedMoE(E, K, H, I), 2)
    x, logits = torch.randn(5, H), torch.randn(5, E)
    want = b(x, logits)
    a.routed_experts = b.routed_experts
    torch.testing.assert_close(a(x, logits), want, rtol=0, atol=0)
    a.routed_experts = moekit.FusedMoE(E, K, H, I).routed_experts  # never loaded: SPEC §1's RuntimeError
    with pytest.raises(RuntimeError, match="load"):
        a(x, logits)


def test_replacing_routed_experts_of_an_eplb_layer_is_refused():
    layer = _loaded(moekit.FusedMoE(E, K, H, I, enable_eplb=True))
    with pytest.raises(ValueError, match="cannot be replaced"):
        layer.routed_experts = _loaded(moekit.FusedMoE(E, K, H, I, enable_eplb=True)).routed_experts


def test_router_called_as_a_module_and_its_hooks_warn():
    # the router had no forward ("missing the required forward function"), and a hook on it never fired, silently
    layer = _loaded(moekit.FusedMoE(E, K, H, I))
    x, logits = torch.randn(3, H), torch.randn(3, E)
    result = layer.router(x, logits)
    w, ids = layer.router.select_experts(x, logits)
    assert torch.equal(result.topk_ids, ids) and torch.equal(result.topk_weights, w)
    with pytest.warns(UserWarning, match="calls its router's route\\(\\) directly"):
        layer.router.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="forward_with_scores"):
        layer.router.register_forward_pre_hook(lambda *a: None)


def test_state_dict_of_other_sizes_names_the_sizes_not_parallelism():
    small = _loaded(moekit.FusedMoE(E, K, H, I))
    big = moekit.FusedMoE(E, K, H, 2 * I)
    with pytest.raises(ValueError, match=rf"saved by a layer of other sizes\? this one has H = {H}, I = {2 * I}"):
        big.load_state_dict(small.state_dict())


# --- quantised math against SPEC §8 (round 64's quantised differential review)

@pytest.mark.parametrize("cfg", [
    {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
     "scale_fmt": "ue8m0"},
])
def test_fp8_blocks_of_tiny_weights_get_a_nonzero_scale(cfg):
    # amax < ~6e-43: amax / 448 underflowed to S = 0, codes W / 0 were NaN, and the layer returned NaN
    w13, w2 = torch.randn(2, 256, 128) * 0.05, torch.randn(2, 128, 128) * 0.05
    w13[1, :128] = 0.0
    w13[1, :128, 0] = 1e-44  # one block holding only a tiny column
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, cfg)
    assert bool((s13 > 0).all()) and not bool(q13.float().isnan().any())
    layer = moekit.FusedMoE(2, 1, 128, 128, quant_config=cfg)
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    out = layer(torch.randn(4, 128), torch.tensor([[0.0, 1.0]] * 4))
    assert bool(torch.isfinite(out).all())


def test_ue8m0_scale_below_float32_normals_is_the_spec_power_of_two():
    # SPEC §8: S = 2^ceil(log2(amax / 448)); amax < 448 · 2^-126 was clamped to S = 2^-126 (codes lost precision)
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
           "scale_fmt": "ue8m0"}
    for amax in (1e-37, 1e-40):
        w13, w2 = torch.zeros(1, 256, 128), torch.zeros(1, 128, 128)
        w13[0, 0, 0] = amax
        q13, _, s13, _ = moekit.quantize_experts(w13, w2, cfg)
        a = torch.tensor(amax, dtype=torch.float32).double() / 448
        want = torch.ldexp(torch.tensor(1.0, dtype=torch.float64), torch.ceil(torch.log2(a)).long()).float()
        assert s13[0, 0, 0] == want, (amax, s13[0, 0, 0], want)
        assert 224 < q13[0, 0, 0].float() <= 448  # the code keeps e4m3 precision


def test_torch_path_adds_biases_in_fp32_within_spec_tolerance():
    # bf16 + biases, T = 1, relu2: the bias was added in bf16 to the bf16 product (two roundings): 1.59e-2 relative
    # RMS from the float64 math, past SPEC §4's 1e-2 (the Triton kernels: 0); this case is round 64's worst seed
    g = torch.Generator().manual_seed(278)
    w13 = torch.randn(2, 32, 64, generator=g) * 64 ** -0.5
    w2 = torch.randn(2, 64, 32, generator=g) * 32 ** -0.5
    b13 = (torch.randn(2, 32, generator=g) * 0.1).bfloat16()
    b2 = (torch.randn(2, 64, generator=g) * 0.1).bfloat16()
    x = torch.randn(1, 64, generator=g).bfloat16()
    qc = {"quant_method": "mxfp4"}
    d13, d2 = moekit.dequantize_experts(*moekit.quantize_experts(w13, w2, qc), qc, dtype=torch.bfloat16)
    h = x.double() @ d13[0].double().t() + b13[0].double()
    a = torch.relu(h).square().bfloat16().double()
    ref = a @ d2[0].double().t() + b2[0].double()
    ids, tw = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    for out in (moekit.fused_experts(x, d13, d2, tw, ids, backend="torch", activation="relu2", w1_bias=b13,
                                     w2_bias=b2),
                moekit.fused_experts(x, *moekit.quantize_experts(w13, w2, qc)[:2], tw, ids, backend="torch",
                                     activation="relu2", w1_bias=b13, w2_bias=b2, quant_config=qc,
                                     w1_scale=moekit.quantize_experts(w13, w2, qc)[2],
                                     w2_scale=moekit.quantize_experts(w13, w2, qc)[3])):
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, err


# --- round 64's whole-change review and EPLB property review

def test_bias_dtype_warning_is_skipped_while_compiling_and_for_wider_dtypes(monkeypatch):
    owner = torch.nn.Module()
    owner.e_score_correction_bias = torch.nn.Parameter(torch.randn(E) * 1e-3, requires_grad=False)
    layer = _loaded(moekit.FusedMoE(E, K, H, I, scoring_func="sigmoid",
                                    e_score_correction_bias=owner.e_score_correction_bias))
    x, logits = torch.randn(3, H), torch.randn(3, E)
    owner.double()  # wider: nothing was rounded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, logits)
    owner.bfloat16()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # dynamo refuses warnings.warn (fullgraph)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.router.route(x, logits)


def test_a_refused_routed_experts_value_leaves_the_layer_working():
    layer = _loaded(moekit.FusedMoE(E, K, H, I))
    x, logits = torch.randn(3, H), torch.randn(3, E)
    want = layer(x, logits)
    with pytest.raises(TypeError):
        layer.routed_experts = "oops"
    torch.testing.assert_close(layer(x, logits), want, rtol=0, atol=0)


def test_add_module_of_routed_experts_runs_them():
    a, b = _loaded(moekit.FusedMoE(E, K, H, I), 1), _loaded(moekit.FusedMoE(E, K, H, I), 2)
    x, logits = torch.randn(3, H), torch.randn(3, E)
    a.add_module("routed_experts", b.routed_experts)  # (bypassed __setattr__)
    torch.testing.assert_close(a(x, logits), b(x, logits), rtol=0, atol=0)


@pytest.mark.interpreter
def test_graphs_come_back_when_a_router_is_swapped_back():
    layer = moekit.FusedMoE(E, K, H, I, backend="triton", eager_graph_tokens=8)
    own = layer.router
    hashed = moekit.FusedMoE(E, K, H, I, backend="triton", hash_indices_table=torch.zeros(5, K, dtype=torch.long))
    layer.router = hashed.router  # hash routing never graphs
    assert layer.eager_graph_tokens == 0
    layer.router = own
    assert layer.eager_graph_tokens == 8  # (was lost for good)


def test_agreed_load_sends_numpy_ints_as_themselves(monkeypatch):
    np = pytest.importorskip("numpy")
    import importlib
    rb = importlib.import_module("moekit.parallel.rebalance")
    peer = torch.tensor([1, 2, 3, 2, 0])  # another rank's row: load [1, 2, 3], num_nodes 2, no failure

    def gather(out, row, group):
        out.view(2, -1).copy_(torch.stack([row, peer]))

    monkeypatch.setattr(rb, "all_gather_into", gather)
    load = rb._agreed_load(torch.tensor([1, 1, 1]), np.int64(2), None, None, 2)
    assert load.tolist() == [2, 3, 4]


def _eplb_state(e=4, r=0, w=1, rank=0):
    from moekit.experts.placement import ExpertPlacement
    from moekit.parallel.eplb_state import EplbState
    return EplbState(ExpertPlacement.build(e, r, ep_size=w, ep_rank=rank))


@pytest.mark.parametrize("on_input", [False, True])
def test_dead_slots_add_no_eplb_load(on_input):
    # ids -1 (a custom routing function's out-of-range ones on the kernel path) were counted on the last slot's expert
    state = _eplb_state()
    ids = torch.tensor([[0, -1]], dtype=torch.int32)
    state.record(ids[:, :1] if on_input else ids, torch.tensor([[0.5, 0.5]])[:, : 1 if on_input else 2], on_input)
    assert state.window_load().tolist() == [1, 0, 0, 0]


def test_replicas_of_a_hot_expert_share_steady_decode():
    # one token per rank every step, all to expert 0 (a replica on each of 8 ranks): the token index alone picked the
    # same replicas every step (3 of 8 never used, max/mean 3.0)
    e, w = 8, 8
    states = [_eplb_state(e, e * (w - 1), w, r) for r in range(w)]
    hits = torch.zeros(e * w, dtype=torch.long)
    for _ in range(100):
        for st in states:
            phys = st.map_logical_to_physical(torch.zeros(1, 1, dtype=torch.int32))
            st.record(phys, torch.ones(1, 1), on_input=False)
            hits += torch.bincount(phys.reshape(-1).long(), minlength=e * w)
    per = hits[states[0].logical_to_physical[0]]
    assert (per > 0).all() and per.max() / per.float().mean() < 1.5, per.tolist()


def test_eplb_functions_take_the_layers_own_tensors():
    from moekit.parallel.eplb import assign_slots, plan_weight_moves, rank_loads
    old, new = [0, 1, 2, 3, 0, 1], [0, 1, 3, 3, 0, 2]
    assert plan_weight_moves(torch.tensor(old), torch.tensor(new), 2, "linear") == plan_weight_moves(old, new, 2,
                                                                                                     "linear")
    assert assign_slots([[0, 1, 3], [3, 0, 2]], torch.tensor(old), "linear") == assign_slots(
        [[0, 1, 3], [3, 0, 2]], old, "linear")
    assert rank_loads([1, 2, 3, 4], torch.tensor(old), 2, "linear") == rank_loads([1, 2, 3, 4], old, 2, "linear")
