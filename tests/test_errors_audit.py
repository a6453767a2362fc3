"""Bad input found by round 46's audit of the public entry points: each case was a silent wrong answer, a crash
with an unrelated exception (ZeroDivisionError, IndexError, KeyError ...), a message naming the wrong argument,
or an error that came late. Each now raises ``ValueError`` / ``TypeError`` naming the argument (CPU, torch path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit import Fp8ChannelFormat, FusedMoE, FusedTopKRouter, GroupedTopk
from moekit.loading.architectures import plan_layers
from moekit.loading.files import CheckpointNotFoundError, config_dtype
from moekit.loading.keys import check_construction as _check_construction

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 16, "intermediate_size": 8, "num_local_experts": 4,
           "num_experts_per_tok": 2, "num_hidden_layers": 2}


def _experts(t=5, h=12, inter=4, e=4, k=1):
    x, w1, w2 = torch.randn(t, h), torch.randn(e, 2 * inter, h), torch.randn(e, h, inter)
    w, ids = torch.rand(t, k) + 0.1, torch.randint(0, e, (t, k), dtype=torch.int32)
    return x, w1, w2, w, ids


def _layer(**kw):
    layer = FusedMoE(6, 2, 8, 4, params_dtype=torch.float32, **kw)
    layer.load_expert_weights(torch.randn(6, 8, 8), torch.randn(6, 8, 4))
    return layer


# -- silent wrong answers ------------------------------------------------------------------------------------
def test_nan_selection_bias_in_the_routing_ops():
    # a NaN bias won every top-k on the torch path (argmax ranks NaN first); the routers already refused it
    logits, bias = torch.randn(3, 8), torch.zeros(8)
    bias[3] = float("nan")
    with pytest.raises(ValueError, match="e_score_correction_bias contains non-finite"):
        moekit.fused_topk_bias(None, logits, bias, 2, True, backend="torch")
    with pytest.raises(ValueError, match="e_score_correction_bias contains non-finite"):
        moekit.grouped_topk(None, logits, 2, True, 4, 2, "sigmoid", 1.0, bias, backend="torch")
    with pytest.raises(ValueError, match="e_score_correction_bias contains non-finite"):
        GroupedTopk(2, True, 4, 2, scoring_func="sigmoid").forward_native(None, logits, bias)
    bias[3] = float("inf")  # +inf: that expert always chosen
    with pytest.raises(ValueError, match="e_score_correction_bias contains non-finite"):
        moekit.fused_topk_bias(None, logits, bias, 2, True, backend="torch")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_indices_type_is_refused(dtype):
    # uint8 turned expert 290 into 34: a valid-looking wrong expert
    logits = torch.randn(4, 300)
    logits[:, 290] = 10.0
    with pytest.raises(TypeError, match="indices_type must be torch.int32, torch.int64 or None"):
        moekit.fused_topk(None, logits, 1, True, indices_type=dtype)
    router = FusedTopKRouter(1, 300, indices_type_getter=lambda: dtype)
    with pytest.raises(TypeError, match="indices_type"):
        router.select_experts(torch.randn(4, 8), logits)
    assert moekit.fused_topk(None, logits, 1, True, indices_type=torch.int64)[1].tolist() == [[290]] * 4


def test_string_flags_of_the_ops_are_refused():
    # "no" / "False" read as True: renormalised weights, the router weight applied to the input
    logits = torch.randn(3, 8)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        moekit.fused_topk(None, logits, 2, "no")
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        moekit.grouped_topk(None, logits, 2, "False", 4, 2)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        moekit.fused_topk_bias(None, logits, torch.zeros(8), 2, None)
    x, w1, w2, w, ids = _experts()
    with pytest.raises(TypeError, match="apply_router_weight_on_input must be a bool"):
        moekit.fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input="False")


@pytest.mark.parametrize("block", [[128.9, 64.5], [True, 128], ["a", 128], [0, 128], [128], 128])
def test_weight_block_size_is_not_rounded(block):
    # int() made [128.9, 64.5] blocks of 128 x 64 and [True, 128] a block_n of 1
    with pytest.raises(ValueError, match=r"weight_block_size'\] must be two positive ints"):
        moekit.parse_quant_config(dict(FP8, weight_block_size=block))
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "block",
                                           "block_structure": block, "symmetric": True, "dynamic": False},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "group", "group_size": 128,
                              "dynamic": True, "symmetric": True}}}}
    with pytest.raises(ValueError, match="block_structure must be two positive ints"):
        moekit.parse_quant_config(ct)


def test_custom_routing_function_with_integer_weights():
    # cast silently to float before; fused_experts itself refuses integer topk_weights
    def fn(hidden_states, logits, top_k, renormalize):
        ids = torch.topk(logits, top_k, dim=-1).indices
        return torch.ones_like(ids), ids.to(torch.int32)

    layer = _layer(custom_routing_function=fn)
    with pytest.raises(TypeError, match="topk_weights of dtype torch.int64"):
        layer(torch.randn(3, 8), torch.randn(3, 6))


# -- crashes with an unrelated exception ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_experts_with_k_zero(backend):
    # ZeroDivisionError in the workspace chunking (torch) and the plan (Triton)
    if backend == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x, w1, w2, _, _ = (t.to(dev) for t in _experts())
    with pytest.raises(ValueError, match=r"topk_ids must have shape \[T=5, K\] with K >= 1"):
        moekit.fused_experts(x, w1, w2, torch.rand(5, 0, device=dev), torch.zeros(5, 0, dtype=torch.int32, device=dev),
                             backend=backend)


def test_zero_dim_router_logits_in_the_layer():
    with pytest.raises(ValueError, match=r"router_logits must have shape \[T, E \+ Z\] = \[1, 6\], got \[\]"):
        _layer()(torch.randn(1, 8), torch.tensor(1.0))


def test_hidden_states_of_the_routing_ops():
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        moekit.fused_topk([[0.0]] * 5, torch.randn(5, 8), 2, True)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[T, H\]"):
        moekit.fused_topk(torch.tensor(1.0), torch.randn(1, 8), 2, True)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[T, H\]"):
        moekit.grouped_topk(torch.randn(2, 1, 4), torch.randn(2, 8), 2, True, 4, 2)


def test_config_json_fields_missing_or_wrong():
    # a bare KeyError 'hidden_size' (also printed so by `moekit inspect`), IndexError, "could not convert"
    # round 49: a field config.json lacks takes the transformers config class's default (Mixtral: hidden_size 4096,
    # 32 layers, as transformers reads the file); one the class has no usable default for is named
    assert len(plan_layers({"model_type": "mixtral"}, "ckpt/config.json")[1]) == 32
    with pytest.raises(ValueError, match="model_type 'deepseek_v2'.*needs the field 'num_experts_per_tok'"):
        plan_layers({"model_type": "deepseek_v2"}, "ckpt/config.json")
    with pytest.raises(ValueError, match="ckpt/config.json: model_type 'mixtral'.*wrong value"):
        plan_layers(dict(MIXTRAL, num_experts_per_tok="x"), "ckpt/config.json")
    assert len(plan_layers(MIXTRAL)[1]) == 2  # the valid config plans both blocks


def test_top_k_of_config_json_named_before_tensor_shapes():
    # num_experts_per_tok 0 or > E surfaced as a wrong-looking tid2eid / bias shape
    plan = plan_layers(MIXTRAL)[1][0]
    for k in (0, 5):
        with pytest.raises(ValueError, match=rf"config.json gives top_k = {k} \(num_experts_per_tok\)"):
            _check_construction(dataclasses.replace(plan, top_k=k), {}, {})
    _check_construction(plan, {}, {})


def test_non_callable_expert_output_norm_at_construction():
    with pytest.raises(TypeError, match="expert_output_norm must be a callable"):
        FusedMoE(6, 2, 8, 4, expert_output_norm="x")


@pytest.mark.parametrize("mapping, err", [
    ("x", TypeError),  # a string (was: "not enough values to unpack" at load_weights)
    ([("routed_experts.w13_", "experts.0.gate_proj.", 0)], ValueError),  # three fields
    ([("routed_experts.w13_", "experts.0.gate_proj.", 0, "w4")], ValueError),  # unknown shard
    ([("routed_experts.w13_", "experts.0.gate_proj.", -1, "w1")], ValueError),  # negative expert id
])
def test_expert_mapping_checked_at_construction(mapping, err):
    with pytest.raises(err, match="expert_mapping"):
        FusedMoE(6, 2, 8, 4, expert_mapping=mapping)


def test_malformed_compressed_tensors_group():
    # "'int' object is not iterable"
    with pytest.raises(ValueError, match=r"\['config_groups'\]\['group_0'\] must be a dict"):
        moekit.parse_quant_config({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "config_groups": {"group_0": 3}})


# -- messages naming the wrong argument ----------------------------------------------------------------------
def test_a_wrong_w2_is_not_blamed_on_w1():
    x, w1, w2, w, ids = _experts(inter=4)
    with pytest.raises(ValueError, match=r"w2 must have shape \[E, H=12, I\]"):
        moekit.fused_experts(x, w1, w2.transpose(1, 2), w, ids)
    with pytest.raises(ValueError, match=r"w13 \[4, 64, 64\] and w2 \[4, 32, 64\] do not fit together"):
        moekit.quantize_experts(torch.randn(4, 64, 64), torch.randn(4, 32, 64), FP8)
    with pytest.raises(ValueError, match=r"w13 must have shape \[E, 2I, H\]"):
        moekit.quantize_experts(torch.randn(64, 64), torch.randn(32, 64), FP8)  # 2-D: the w13 named first
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(2, 256, 128), torch.randn(2, 128, 128), FP8)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    w, ids = torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w1 \[2, 256, 128\] and w2 \[2, 256, 128\] disagree on H"):
        moekit.fused_experts(x, q13, q13[:, :, :128].contiguous(), w, ids, quant_config=FP8, w1_scale=s13,
                             w2_scale=s2)


def test_quantised_fused_experts_names_its_own_arguments():
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(2, 256, 128), torch.randn(2, 128, 128), FP8)
    x, w, ids = torch.randn(3, 128, dtype=torch.bfloat16), torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(TypeError, match="w1_scale must be a torch.Tensor"):
        moekit.fused_experts(x, q13, q2, w, ids, quant_config=FP8)
    with pytest.raises(ValueError, match="w2_scale must have shape"):
        moekit.fused_experts(x, q13, q2, w, ids, quant_config=FP8, w1_scale=s13, w2_scale=s13)


def test_a_gate_returning_integer_logits_is_named():
    class IntGate(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 6, dtype=torch.int64)

    with pytest.raises(TypeError, match="gate returned router_logits of dtype torch.int64"):
        _layer(gate=IntGate())(torch.randn(3, 8))


def test_meta_weights_are_named():
    layer = FusedMoE(6, 2, 8, 4, params_dtype=torch.float32)
    with pytest.raises(ValueError, match="w13 is on the meta device"):
        layer.load_expert_weights(torch.randn(6, 8, 8, device="meta"), torch.randn(6, 8, 4))
    meta = FusedMoE(6, 2, 8, 4, params_dtype=torch.float32, device="meta")  # a meta layer takes meta tensors
    meta.load_expert_weights(torch.randn(6, 8, 8, device="meta"), torch.randn(6, 8, 4, device="meta"))


# -- late or silently ignored --------------------------------------------------------------------------------
def test_grouping_without_use_grouped_topk():
    with pytest.raises(ValueError, match="need use_grouped_topk=True"):
        FusedMoE(6, 2, 8, 4, topk_group=2)
    with pytest.raises(ValueError, match="need use_grouped_topk=True"):
        moekit.create_fused_moe_router(2, 8, num_expert_group=2, topk_group=1)
    FusedMoE(6, 2, 8, 4, num_expert_group=1, topk_group=1)  # ungrouped values stay allowed


def test_empty_hash_table():
    with pytest.raises(ValueError, match=r"hash_indices_table must have shape \[vocab >= 1, top_k=2\]"):
        FusedMoE(6, 2, 8, 4, hash_indices_table=torch.zeros(0, 2, dtype=torch.int64))


def test_load_expert_shard_id_out_of_range():
    layer = FusedMoE(6, 2, 8, 4, params_dtype=torch.float32)
    for bad in (6, -1):
        with pytest.raises(ValueError, match="logical_id must be"):
            layer.routed_experts.load_expert_shard(bad, "w1", torch.randn(4, 8))
    assert layer.routed_experts.load_expert_shard(5, "w1", torch.randn(4, 8)) == 1


def test_static_fp8_input_scales_must_be_positive_and_finite():
    # a zero input scale made every forward NaN with no error
    fmt = Fp8ChannelFormat(per_tensor=True, static_input=True)
    layer = FusedMoE(4, 1, 16, 8, params_dtype=torch.bfloat16, quant_config=fmt)
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(4, 16, 16), torch.randn(4, 16, 8), fmt)
    ok = torch.full((4,), 0.01)
    for bad, match in ((torch.zeros(4), "must be > 0"), (torch.full((4,), float("nan")), "non-finite")):
        with pytest.raises(ValueError, match=f"w13_input_scale.*{match}|w13_input_scale contains {match}"):
            layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2, w13_input_scale=bad, w2_input_scale=ok)
    s13_bad = s13.clone()
    s13_bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="w13_scale contains non-finite"):
        layer.load_expert_weights(q13, q2, w13_scale=s13_bad, w2_scale=s2, w13_input_scale=ok, w2_input_scale=ok)
    with pytest.raises(ValueError, match="input_scale must be > 0"):
        layer.routed_experts.load_expert_shard(0, "w1", torch.zeros(()), kind="input_scale")
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2, w13_input_scale=ok, w2_input_scale=ok)


def test_config_json_dtype():
    # "int8" (and "torch.bfloat16", which as_float_dtype accepts) fell back to float32 silently
    assert config_dtype({"torch_dtype": "torch.bfloat16"}, "c") is torch.bfloat16
    assert config_dtype({"dtype": "float16"}, "c") is torch.float16
    assert config_dtype({}, "c") is torch.float32
    with pytest.raises(ValueError, match="c: dtype 'int8' is not a float dtype"):
        config_dtype({"dtype": "int8"}, "c")


def test_missing_checkpoint_directory(tmp_path):
    # a ValueError, as every bad argument, and still the FileNotFoundError it was
    for exc in (ValueError, FileNotFoundError):
        with pytest.raises(exc, match="is not a checkpoint directory"):
            moekit.load_moe_layers(tmp_path / "nowhere")
    assert issubclass(CheckpointNotFoundError, ValueError)


def test_loose_types():
    with pytest.raises(TypeError, match="progress must be a bool"):
        moekit.load_moe_layers("anywhere", progress="yes")
    with pytest.raises(TypeError, match="prefix must be a str"):
        FusedMoE(6, 2, 8, 4, prefix=3)
    q = moekit.quantize_experts(torch.randn(2, 256, 128), torch.randn(2, 128, 128), FP8)
    with pytest.raises(TypeError, match="dtype must be one of"):
        moekit.dequantize_experts(*q, FP8, dtype=torch.int32)
    x, w1, w2, w, ids = _experts()
    with pytest.raises(ValueError, match="workspace_bytes must be >= 1"):
        moekit.fused_experts_torch(x, w1, w2, w, ids, workspace_bytes=0)


def test_input_tokens_without_a_hash_table():
    with pytest.raises(ValueError, match="input_tokens was given but hash_indices_table is None"):
        moekit.fused_topk_bias(None, torch.randn(3, 8), torch.zeros(8), 2, True,
                               input_tokens=torch.zeros(3, dtype=torch.int64))


# -- round 48's audit --------------------------------------------------------------------------------------
def test_router_instance_and_output_scale_do_not_scale_twice():
    # router= with its own routed_scaling_factor and apply_routed_scale_to_output=True: the output was scaled by the
    # factor twice (x4 for 2.0), silently; a router with factor 1.0 is the way (SPEC §1 step 6)
    with pytest.raises(ValueError, match="would apply twice"):
        FusedMoE(6, 2, 8, 4, router=FusedTopKRouter(2, 6, routed_scaling_factor=2.0), routed_scaling_factor=2.0,
                 apply_routed_scale_to_output=True)
    layer = FusedMoE(6, 2, 8, 4, router=FusedTopKRouter(2, 6), routed_scaling_factor=2.0,
                     apply_routed_scale_to_output=True)
    plain = FusedMoE(6, 2, 8, 4)
    w13, w2 = torch.randn(6, 8, 8), torch.randn(6, 8, 4)
    for m in (layer, plain):
        m.load_expert_weights(w13, w2)
    x, lg = torch.randn(3, 8), torch.randn(3, 6)
    torch.testing.assert_close(layer(x, lg), 2 * plain(x, lg))


def test_logits_and_input_ids_with_other_leading_dims():
    # [S, B, E] logits (or [S, B] ids) for [B, S, H] hidden states were reshaped to fit and routed the wrong tokens;
    # flat ones and ones with the hidden states' leading dims still work
    layer = _layer()
    x, lg = torch.randn(2, 3, 8), torch.randn(2, 3, 6)
    ref = layer(x, lg)
    torch.testing.assert_close(layer(x, lg.reshape(6, 6)), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"router_logits must be flat .*\[2, 3, E \+ Z\]; got \[3, 2, 6\]"):
        layer(x, lg.transpose(0, 1).contiguous())
    with pytest.raises(ValueError, match="router_logits must be flat"):
        layer.forward_with_scores(x, lg.transpose(0, 1).contiguous())
    hashed = _layer(hash_indices_table=torch.randint(0, 6, (10, 2)))
    ids = torch.randint(0, 10, (2, 3))
    torch.testing.assert_close(hashed(x, lg, input_ids=ids), hashed(x, lg, input_ids=ids.reshape(6)))
    with pytest.raises(ValueError, match=r"input_ids must be flat .*got \[3, 2\]"):
        hashed(x, lg, input_ids=ids.t().contiguous())


@pytest.mark.parametrize("bad", ["w2_inter", "w2_experts", "w1_inter"])
def test_fused_experts_w1_w2_disagreement_names_both(bad):
    # a wrong w2 was reported as a wrong w1 ("w1 must have shape [4, 10, 12]", E and I read from w2): the message now
    # names both shapes and what each would have to be
    x, w1, w2, w, ids = _experts()
    if bad == "w2_inter":
        w2 = torch.randn(4, 12, 5)
    elif bad == "w2_experts":
        w2 = torch.randn(5, 12, 4)
    else:
        w1 = torch.randn(4, 6, 12)
    with pytest.raises(ValueError, match=r"w1 \[.*\] and w2 \[.*\] disagree on E or I") as err:
        moekit.fused_experts(x, w1, w2, w, ids)
    want = "w1 must have shape [4, 8, 12] or w2 shape [4, 12, 3]" if bad == "w1_inter" else "or w2 shape [4, 12, 4]"
    assert want in str(err.value), str(err.value)


def test_fused_topk_bias_names_input_tokens():
    # its argument is input_tokens (the seed's name); the errors said input_ids
    logits, table = torch.randn(3, 6), torch.randint(0, 6, (5, 2))
    for tokens, match in ((None, "input_tokens is required"), (torch.tensor([1, 2]), "input_tokens must hold one id"),
                          (torch.tensor([1, 2, 9]), r"input_tokens must lie in \[0, 5\)")):
        with pytest.raises(ValueError, match=match):
            moekit.fused_topk_bias(None, logits, torch.zeros(6), 2, True, input_tokens=tokens,
                                   hash_indices_table=table)


def test_selection_bias_keeps_its_dtype_under_to():
    # model.to(torch.bfloat16) rounded the router's float32 selection bias (SPEC §8: never rounded to bf16); it keeps
    # its dtype (and its storage, on the same device) while the layer's weights convert
    bias = torch.randn(6) * 1e-3 + 1.0  # bf16 would flatten these differences
    layer = _layer(e_score_correction_bias=bias, scoring_func="sigmoid")
    layer.to(torch.bfloat16)
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    assert layer.router.e_score_correction_bias.data_ptr() == bias.data_ptr()
    assert layer.routed_experts.w13_weight.dtype == torch.bfloat16
    from moekit.loading.routings import LogitBiasRouting, SigmoidEpsRouting  # the named routings' biases too

    for mod in (LogitBiasRouting(6), SigmoidEpsRouting(6, bias=True, eps=1e-6)):
        assert mod.half().e_score_correction_bias.dtype == torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # round 49: built under another default dtype, the bias was bf16
    try:
        for mod in (LogitBiasRouting(6), SigmoidEpsRouting(6, bias=True, eps=1e-6)):
            assert mod.e_score_correction_bias.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_state_dict_carries_the_selection_bias_and_the_hash_table():
    # both were non-persistent buffers: a layer built with placeholders (zeros, another table) took a saved state_dict
    # with "All keys matched" and routed by the placeholders, silently (round 48's audit)
    bias, table = torch.rand(6), torch.randint(0, 6, (10, 2))
    for kw, fresh in ((dict(e_score_correction_bias=bias, scoring_func="sigmoid"),
                       dict(e_score_correction_bias=torch.zeros(6), scoring_func="sigmoid")),
                      (dict(hash_indices_table=table), dict(hash_indices_table=torch.zeros_like(table)))):
        layer, other = _layer(**kw), FusedMoE(6, 2, 8, 4, params_dtype=torch.float32, **fresh)
        sd = layer.state_dict()
        assert {"router.e_score_correction_bias", "router.hash_indices_table"} & set(sd)
        other.load_state_dict(sd)
        x, lg, ids = torch.randn(5, 8), torch.randn(5, 6), torch.randint(0, 10, (5,))
        extra = dict(input_ids=ids) if "hash_indices_table" in kw else {}
        torch.testing.assert_close(other(x, lg, **extra), layer(x, lg, **extra), rtol=0, atol=0)


def test_meta_then_to_empty_is_not_loaded():
    # .to("meta") drops the values and to_empty() leaves uninitialised memory: the forward ran on it (NaN / inf)
    layer = _layer()
    layer.to("meta")
    layer.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        layer(torch.randn(3, 8), torch.randn(3, 6))


def test_triton_interpret_set_after_the_kernels_were_imported():
    # round 49: Triton reads TRITON_INTERPRET when a kernel is defined, moekit when a layer is built: set late, the
    # backend check passed and the first forward failed inside Triton ("Cannot call @triton.jit'd outside of the
    # scope of a kernel"). Now the layer's construction says why (a fresh process: the import state is the point)
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import moekit, moekit.ops.triton_experts\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    moekit.FusedMoE(4, 2, 32, 16, backend='triton', device='cpu')\n"
        "except RuntimeError as err:\n"
        "    print('REFUSED', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(moekit.__file__), "..")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED" in run.stdout and "TRITON_INTERPRET=1 was set after" in run.stdout, run.stdout + run.stderr
