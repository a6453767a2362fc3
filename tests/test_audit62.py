"""Round 62's audit: defects found by review helpers and checked with repros (config.json fields of the wrong type,
valid zero scales read as "never loaded", fused scale stacks the loader refused, errors naming the wrong thing)."""

import json
import re

import pytest
import torch

import moekit
from moekit.experts.mapping import load_layer_weights
from moekit.loading.architectures import plan_layers

E, K, H, I, T = 4, 2, 64, 64, 3
_MIXTRAL = {"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 16, "num_local_experts": 4,
            "num_experts_per_tok": 2, "num_hidden_layers": 1, "hidden_act": "silu"}


@pytest.mark.parametrize("field, value, said", [
    ("num_experts_per_tok", True, "num_experts_per_tok = True"),  # a bool: read as top_k 1
    ("num_experts_per_tok", "2", "num_experts_per_tok = '2'"),  # a string: read as 2
    ("num_local_experts", None, "num_local_experts = null"),  # null: read as the class default, 8 experts
])
def test_a_count_of_the_wrong_type_is_refused(field, value, said):
    with pytest.raises(ValueError, match=said):
        plan_layers(dict(_MIXTRAL, **{field: value}))


def test_a_null_count_beside_a_given_alias_plans():
    # the edge: the null is refused only where no field of the count gives it (num_experts stands for it here)
    _, plans = plan_layers(dict(_MIXTRAL, num_local_experts=None, num_experts=6))
    assert plans[0].num_experts == 6


def test_inspect_refuses_a_bool_top_k(tmp_path, capsys):
    from moekit.loading.inspect import inspect_main
    (tmp_path / "config.json").write_text(json.dumps(dict(_MIXTRAL, num_experts_per_tok=True)))
    assert inspect_main([str(tmp_path)]) == 1
    assert "num_experts_per_tok = True" in capsys.readouterr().err


_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}


@pytest.mark.parametrize("qc", [{"quant_method": "mxfp4"}, _FP8], ids=["mxfp4", "fp8-block"])
def test_an_all_zero_scale_shard_survives_a_state_dict_round_trip(qc):
    # the edge: an all-zero expert (padding) whose scales are byte 0 (e8m0 2^-127) / S = 0, both valid, read back as
    # "never loaded": the reloaded layer refused its forward
    torch.manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    w2[1] = 0
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, qc)
    s2[1] = 0
    a = moekit.FusedMoE(E, K, H, I, quant_config=qc, backend="torch")
    a.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    b = moekit.FusedMoE(E, K, H, I, quant_config=qc, backend="torch")
    b.load_state_dict(a.state_dict())
    x, lg = torch.randn(T, H), torch.randn(T, E)
    torch.testing.assert_close(b(x, lg), a(x, lg), rtol=0, atol=0)


@pytest.mark.parametrize("qc", [{"quant_method": "mxfp4"}, _FP8], ids=["mxfp4", "fp8-block"])
def test_a_never_loaded_quantised_layer_still_loads_as_not_loaded(qc):
    # the edge: the new unset mark (NaN / e8m0 255) is not refused as a bad scale, and still reads as "not loaded"
    a = moekit.FusedMoE(E, K, H, I, quant_config=qc, backend="torch")
    b = moekit.FusedMoE(E, K, H, I, quant_config=qc, backend="torch")
    b.load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match="never loaded"):
        b(torch.randn(T, H), torch.randn(T, E))


def test_a_half_loaded_quantised_layer_keeps_its_loaded_experts_only():
    # the edge: one expert's shards loaded, the others unset: the copy knows which
    a = moekit.FusedMoE(E, K, H, I, quant_config=_FP8, backend="torch")
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(E, 2 * I, H), torch.randn(E, H, I), _FP8)
    a.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    sd = a.state_dict()
    sd["routed_experts.w2_scale"][2] = float("nan")  # expert 2's w2 as a never-loaded layer holds it
    b = moekit.FusedMoE(E, K, H, I, quant_config=_FP8, backend="torch")
    b.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="expert 2 w2"):
        b(torch.randn(T, H), torch.randn(T, E))
    sd["routed_experts.w2_scale"][3, 0, 0] = float("nan")  # a NaN inside a set shard is a bad value, not a mark
    with pytest.raises(ValueError, match="w2_scale"):
        b.load_state_dict(sd)


def _ct(strategy):
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                              "dynamic": True}}}}


def _interleave(t):  # [E, 2I, ...] gate rows then up rows -> g0 u0 g1 u1 ...
    g, u = t.chunk(2, 1)
    return torch.stack([g, u], 2).flatten(1, 2)


@pytest.mark.parametrize("strategy, layout", [("tensor", "rows"), ("channel", "transposed_interleaved"),
                                              ("tensor", "transposed_interleaved")])
def test_fused_scale_stacks_of_one_dim_per_expert_load(strategy, layout):
    # the edges: a per-tensor down scale stacked as [E] (the layer's own shape) was refused; an interleaved per-row
    # gate/up scale [E, 2I] raised IndexError
    torch.manual_seed(1)
    qc, inter = _ct(strategy), 96
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(E, 2 * inter, H) * 0.1, torch.randn(E, H, inter) * 0.1, qc)
    a = moekit.FusedMoE(E, K, H, inter, quant_config=qc, backend="torch")
    a.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    if strategy == "channel":
        s13 = s13.reshape(E, -1)  # [E, 2I]
    interleaved = layout.endswith("interleaved")
    pairs = [("experts.gate_up_proj", _interleave(q13) if interleaved else q13),
             ("experts.gate_up_proj_scale", _interleave(s13) if interleaved and s13.dim() > 1 else s13),
             ("experts.down_proj", q2), ("experts.down_proj_scale", s2.reshape(E, -1)[:, 0] if s2.dim() > 1 else s2)]
    if strategy == "channel":
        pairs[3] = ("experts.down_proj_scale", s2)
    b = moekit.FusedMoE(E, K, H, inter, quant_config=qc, backend="torch")
    load_layer_weights(b, pairs, fused_layout=layout)
    x, lg = torch.randn(T, H), torch.randn(T, E)
    torch.testing.assert_close(b(x, lg), a(x, lg), rtol=0, atol=0)


@pytest.fixture
def layer():
    out = moekit.FusedMoE(8, K, 16, 12, backend="torch")
    out.load_expert_weights(torch.randn(8, 24, 16), torch.randn(8, 16, 12))
    return out


@pytest.mark.parametrize("shape", [(40,), (8,), (1, 1, 40)])
def test_router_logits_of_a_wrong_rank_are_quoted_as_given(layer, shape):
    # the edge: they were reshaped first, and the error said "got 1" row
    with pytest.raises(ValueError, match=re.escape("[5, 8]") + ".*" + re.escape(f"got {list(shape)}")):
        layer(torch.randn(5, 16), torch.randn(*shape))


def test_router_logits_of_one_token_may_be_flat(layer):
    # the edge: [E] for T = 1 routed before and still does
    x, lg = torch.randn(1, 16), torch.randn(8)
    torch.testing.assert_close(layer(x, lg), layer(x, lg[None]), rtol=0, atol=0)


def test_a_transform_output_of_the_wrong_dtype_is_named():
    # the edge: the error blamed hidden_states (bf16, right) for the transform's float32 output
    m = moekit.FusedMoE(4, K, 16, 12, backend="torch", params_dtype=torch.bfloat16,
                        routed_input_transform=lambda h: h.float())
    m.load_expert_weights(torch.randn(4, 24, 16), torch.randn(4, 16, 12))
    with pytest.raises(TypeError, match="routed_input_transform's output has dtype torch.float32"):
        m(torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(3, 4))


def test_an_expert_bias_the_layer_has_no_place_for_is_a_key_error(tmp_path):
    # the edge: a routed-expert bias in a checkpoint whose layer has no expert biases raised the experts' ValueError,
    # without the config fields other tensors without a place name
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps(_MIXTRAL))
    t = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.randn(shape) for e in range(4)
         for w, shape in (("w1", (16, 8)), ("w3", (16, 8)), ("w2", (8, 16)))}
    t["model.layers.0.block_sparse_moe.gate.weight"] = torch.randn(4, 8)
    t["model.layers.0.block_sparse_moe.experts.1.w1.bias"] = torch.zeros(16)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="experts.1.w1.bias'?: a routed-expert bias.*config.json fields likely"):
        moekit.load_moe_layers(tmp_path, progress=False)


# ---- round 62's public-API error audit (SPEC §7): each case raised from deep inside torch, named the wrong
# argument, or passed silently
def _layer4():
    out = moekit.FusedMoE(4, 2, 8, 16, backend="torch")
    out.load_expert_weights(torch.randn(4, 32, 8), torch.randn(4, 8, 16))
    return out


def test_float8_router_logits_route():
    # the edge: the NaN check had no float8 kernel (NotImplementedError from torch); the logits are any float dtype
    layer, x, lg = _layer4(), torch.randn(5, 8), torch.randn(5, 4)
    torch.testing.assert_close(layer(x, lg.to(torch.float8_e4m3fn)), layer(x, lg.to(torch.float8_e4m3fn).float()))
    with pytest.raises(ValueError, match="router_logits contains non-finite"):
        layer(x, torch.full((5, 4), float("nan")).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("call, err, match", [
    (lambda: moekit.FusedMoE(4, 2, 8, 16, swiglu_limit=1e40), ValueError, "swiglu_limit must be representable"),
    (lambda: moekit.ops.route(torch.randn(3, 4), None), TypeError, "spec must be a moekit.TopKSpec"),
    (lambda: moekit.ZeroExpertRouter(top_k=2, global_num_experts="4", e_score_correction_bias=torch.randn(6)),
     TypeError, "global_num_experts must be an int"),
    (lambda: moekit.Fp8BlockFormat(ignore=5), TypeError, "ignore must be a sequence of str"),
    (lambda: moekit.quantize_experts(torch.randn(4, 256, 128), torch.randn(4, 128, 128).to("meta"), _FP8),
     ValueError, "w2 is on meta but w13 is on cpu"),
    (lambda: moekit.resolve_backend("auto", "bogus"), ValueError, "device='bogus' is not a device"),
    (lambda: _layer4().load_weights(None), TypeError, "weights must be"),
    (lambda: _layer4().load_weights([("experts.0.gate_proj.weight", torch.randn(16, 8, device="meta"))]),
     ValueError, "is on the meta device"),
    (lambda: moekit.parallel.local_physical_ids("12", 4, 1, "linear"), TypeError, "num_physical must be an int"),
    (lambda: moekit.parallel.ExpertPlacement.build(8, 0, tp_size=4.0), TypeError, "tp_size must be an int"),
    (lambda: moekit.parallel.initial_physical_to_logical(8, 0, 4, "linear"), ValueError, "num_physical \\(0\\)"),
    (lambda: moekit.parallel.EplbState(None), TypeError, "placement must be"),
    (lambda: moekit.parallel.EplbState(moekit.parallel.ExpertPlacement.build(8, 0), num_groups="x"), TypeError,
     "num_groups must be an int"),
], ids=["swiglu-1e40", "route-spec", "zero-router-E", "format-ignore", "quantize-devices", "backend-device",
        "load-none", "load-meta", "ids-str", "tp-float", "p2l-physical", "eplb-none", "eplb-groups"])
def test_bad_arguments_are_named(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_a_dict_of_weights_loads_and_a_module_tuple_is_named():
    # the edges: load_weights({name: tensor}) raised "too many values to unpack"; a gate returning a 1-tuple was "a
    # module"
    a, b = _layer4(), moekit.FusedMoE(4, 2, 8, 16, backend="torch")
    b.load_weights(dict(a.state_dict()))
    x, lg = torch.randn(3, 8), torch.randn(3, 4)
    torch.testing.assert_close(b(x, lg), a(x, lg), rtol=0, atol=0)
    g = moekit.FusedMoE(4, 2, 8, 16, backend="torch", gate=lambda h: (torch.randn(h.shape[0], 4),))
    g.load_expert_weights(torch.randn(4, 32, 8), torch.randn(4, 8, 16))
    with pytest.raises(TypeError, match="gate returned a tuple of 1"):
        g(x)


# ---- round 62's command-line audit: benchmark scripts that checked their arguments after the run, or not at all
@pytest.mark.parametrize("argv, said", [
    (["--tokens", "0"], "argument --tokens"),  # wrote NaN into the JSON
    (["--models", "foo"], "argument --models"),  # KeyError
    (["--out", "."], "is a folder"),  # IsADirectoryError after the whole run
])
def test_train_step_checks_its_arguments_first(argv, said, capsys):
    from bench_scripts import bench_script
    with bench_script("train_step") as mod, pytest.raises(SystemExit) as err:
        mod.main(argv)
    assert err.value.code == 2 and said in capsys.readouterr().err


def test_tuned_check_without_a_gpu_says_so(tmp_path, capsys):
    # the edge: an AssertionError traceback from torch.cuda on a machine without a GPU
    from bench_scripts import bench_script
    if torch.cuda.is_available():
        pytest.skip("the no-GPU message needs a machine without one")
    with bench_script("tuned_check") as mod:
        assert mod.main([str(tmp_path)]) == 1
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_compare_writes_its_files_before_a_closed_pipe(tmp_path):
    # the edge: `compare.py R.json --md OUT.md | head -1` raised BrokenPipeError before writing OUT.md
    import glob
    import subprocess
    import sys
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    results = sorted(glob.glob(str(root / "benchmarks/results/NVIDIA_H200-*-bench.json")))[-1]
    md = tmp_path / "q.md"
    cmd = f"{sys.executable} {root}/benchmarks/compare.py {results} --md {md} | head -1; echo rc ${{PIPESTATUS[0]}}"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env={"PYTHONPATH": str(root / "src"),
                                                                                  "PATH": "/usr/bin:/bin"})
    assert md.read_text().startswith("# moekit bench") and out.stdout.strip().endswith(("rc 141", "rc 0"))
    assert "Traceback" not in out.stderr


# ---- the review of round 62's change
def test_a_dense_gemma4_config_plans_no_block():
    # the edge: transformers writes num_experts / top_k_experts null for a Gemma 4 without MoE blocks; the null check
    # refused every dense Gemma 4 (patch(), load_moe_layers, inspect)
    transformers = pytest.importorskip("transformers")
    if "gemma4_text" not in transformers.CONFIG_MAPPING:
        pytest.skip("no gemma4_text in this transformers")
    cfg = transformers.CONFIG_MAPPING["gemma4_text"](enable_moe_block=False, num_hidden_layers=2).to_dict()
    assert plan_layers(cfg)[1] == []


def test_tensor_labels_pack_by_value():
    # the edge: labels compared by hash put two items of one label (0-d tensors, hashed by identity) in one pack
    from moekit.parallel import balanced_packing
    want = balanced_packing([4, 1, 3, 2], 2, labels=[0, 0, 1, 1])
    assert balanced_packing([4, 1, 3, 2], 2, labels=torch.tensor([0, 0, 1, 1])) == want == [[0, 3], [2, 1]]


@pytest.mark.parametrize("qc", [{"quant_method": "mxfp4"}, _FP8], ids=["mxfp4", "fp8-block"])
def test_a_state_dict_saved_before_round_62_keeps_the_old_unset_rule(qc):
    # the edge: a never-loaded layer's state dict saved with version 1 holds all-zero scales; it still loads as not
    # loaded (the new mark would have read the zeros as values and computed zeros)
    a, b = (moekit.FusedMoE(E, K, H, I, quant_config=qc, backend="torch") for _ in range(2))
    sd = a.state_dict()
    for key in ("routed_experts.w13_scale", "routed_experts.w2_scale"):
        sd[key] = torch.zeros_like(sd[key])
    sd._metadata["routed_experts"]["version"] = 1
    b.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="never loaded"):
        b(torch.randn(T, H), torch.randn(T, E))


def test_eplb_state_takes_numpy_ints():
    np = pytest.importorskip("numpy")
    p = moekit.parallel.ExpertPlacement.build(8, 0)
    s = moekit.parallel.EplbState(p, window_size=np.int64(64), num_groups=np.int64(2))
    assert (s.window_size, s.num_groups) == (64, 2) and type(s.window_size) is int
