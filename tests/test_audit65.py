"""Round 65's audit: defects found by review helpers and reproduced, each case names the edge it covers.

Checkpoint folders laid out the awkward ways real repositories are (unindexed duplicates, a missing shard, a malformed
index, a dtype only in the text tower, a selection bias kept in a buffer), the command line (``--eager-only`` options
that were ignored, the ``--device`` message, ``inspect``'s bytes of a relu² shared expert), process-wide state
(transformers' experts switch names, torch's thread count across loading threads, the graph pool of a copied model).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit.cli import main
from moekit.experts.graph_lock import GraphPool
from moekit.loading.files import CheckpointNotFoundError, checkpoint_files
from moekit.loading.plan import LayerPlan
from moekit.loading.reader import one_thread
from ckpt_blocks import qwen3_block
from test_audit53_cli import _one_line

H, I, E, K = 16, 12, 6, 2


def _qwen3(n_layers=1, **kw):
    return dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                num_hidden_layers=n_layers, norm_topk_prob=True, dtype="float32", hidden_act="silu", **kw)


def _block(prefix, seed=0):
    return qwen3_block(prefix, E, H, I, seed)


def _write(path, config, files, index=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, name))
    if index is not None:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f)
    return str(path)


# --- checkpoint folders

def test_a_key_in_two_unindexed_files_is_refused(tmp_path):
    # edge: no index and a stale second export holding one key again: the alphabetically last file's copy was loaded
    t = _block("model.layers.0.mlp.")
    key = "model.layers.0.mlp.experts.1.gate_proj.weight"
    path = _write(tmp_path, _qwen3(), {"model.safetensors": t, "zz-old.safetensors": {key: torch.zeros(I, H)}})
    with pytest.raises(ValueError, match=r"experts\.1\.gate_proj\.weight.*both model\.safetensors and zz-old"):
        moekit.load_moe_layers(path, progress=False)


def test_a_missing_shard_is_the_documented_value_error(tmp_path):
    # edge: the index names a shard file that is absent: FileNotFoundError, which `except ValueError` missed
    t = _block("model.layers.0.mlp.")
    keys = sorted(t)
    half = {k: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
            for i, k in enumerate(keys)}
    path = _write(tmp_path, _qwen3(), {"model-00001-of-00002.safetensors": {k: t[k] for k in keys[1::2]}}, half)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors .* does not exist") as err:
        moekit.load_moe_layers(path, progress=False)
    assert isinstance(err.value, CheckpointNotFoundError)


@pytest.mark.parametrize("weight_map, needle", [
    ([["a", "b"]], "'weight_map' is a list"),  # edge: a list: AttributeError before
    (None, "'weight_map' is a NoneType"),  # edge: null
    ({"a": 1}, "weight_map['a'] is 1"),  # edge: a shard that is no file name: TypeError from os.path.join
])
def test_a_malformed_index_is_a_value_error_naming_it(tmp_path, weight_map, needle):
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(ValueError, match="index.json is not a valid safetensors index") as err:
        checkpoint_files(str(tmp_path))
    assert needle in str(err.value)


def test_a_header_dtype_that_is_no_name_is_a_value_error(tmp_path):
    # edge: a shard header whose "dtype" is a number (AttributeError later, which inspect blamed on config.json)
    header = json.dumps({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ValueError, match="'w' has dtype 7"):
        checkpoint_files(str(tmp_path))


def test_a_dtype_declared_in_the_text_tower_only_is_the_layers_dtype(tmp_path):
    # edge: a wrapper (Qwen3-VL-MoE) whose config.json declares bf16 only in text_config: the layers loaded float32
    text = {k: v for k, v in _qwen3().items() if k != "dtype"}
    text.update(model_type="qwen3_vl_moe_text", dtype="bfloat16")
    t = {k: v.bfloat16() for k, v in _block("model.language_model.layers.0.mlp.").items()}
    path = _write(tmp_path, {"model_type": "qwen3_vl_moe", "text_config": text}, {"model.safetensors": t})
    layer = next(iter(moekit.load_moe_layers(path, progress=False).values()))
    assert layer.routed_experts.w13_weight.dtype == torch.bfloat16


@pytest.mark.parametrize("cfg, prefix, bias_key", [
    # edge: LFM2-MoE / Kolibri-1 keep the selection bias in a buffer of their routing; a checkpoint without it loaded
    # with a zero bias (the completeness check read parameters only)
    (dict(model_type="lfm2_moe", moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, num_hidden_layers=2,
          num_dense_layers=1, use_expert_bias=True, layer_types=["full_attention"] * 2), "model.layers.1.feed_forward.",
     "expert_bias"),
    (dict(model_type="kolibri1", moe_intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
          num_hidden_layers=1, shared_expert_intermediate_size=0), "model.layers.0.mlp.",
     "gate.e_score_correction_bias"),
])
def test_a_missing_selection_bias_buffer_is_a_key_error(tmp_path, cfg, prefix, bias_key):
    cfg = dict(cfg, hidden_size=H, dtype="float32")
    path = _write(tmp_path / "without", cfg, {"model.safetensors": _block(prefix)})
    with pytest.raises(KeyError, match=f"{prefix}{bias_key}".replace(".", r"\.")):
        moekit.load_moe_layers(path, progress=False)
    bias = torch.linspace(-0.3, 0.3, E)  # with it: loaded exactly
    path = _write(tmp_path / "with", cfg, {"model.safetensors": {**_block(prefix), prefix + bias_key: bias}})
    layer = next(iter(moekit.load_moe_layers(path, progress=False).values()))
    assert torch.equal(layer.router.custom_routing_function.e_score_correction_bias, bias)


def test_inspect_counts_a_relu2_shared_expert_without_a_gate():
    # edge: a non-gated shared MLP (Nemotron-H, Ergo) holds up + down only; it was counted gate + up + down (+50 %)
    kw = dict(name="b", layer_idx=0, ckpt_prefixes=("b.",), num_experts=E, top_k=K, hidden_size=H,
              intermediate_size=I, shared_intermediate_size=32, routing="softmax top-k")
    relu2 = LayerPlan(**kw, activation="relu2", shared_activation="relu2")
    silu = LayerPlan(**kw)
    assert relu2.shared_bytes(2) == (32 * H + H * 32) * 2
    assert silu.shared_bytes(2) == (2 * 32 * H + H * 32) * 2
    layer = moekit.loading.modules.SharedMLP(H, 32, "relu2")
    assert sum(p.numel() for p in layer.parameters()) * 2 == relu2.shared_bytes(2)


# --- the command line

@pytest.mark.parametrize("argv, needle", [
    # edge: accepted with --eager-only and ignored (its rows time 4 rotations, no settle; the JSON recorded them)
    (["bench", "--eager-only", "--rotations", "9"], "--rotations"),
    (["bench", "--eager-only", "--settle-ms", "5"], "--settle-ms"),
    (["bench", "--eager-only", "--fast"], "--fast"),
])
def test_eager_only_refuses_the_options_it_ignores(argv, needle, capsys):
    assert main(argv) == 2
    _one_line(capsys, needle, "--eager-only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_device_error_speaks_the_command_lines_words(capsys):
    # edge: it repeated the option ("--device='cuda'") and advised Python syntax ("use device='cpu'")
    assert main(["demo", "--device", "cuda"]) == 2
    err = _one_line(capsys, "--device cpu", "got 'cuda'")
    assert "device='cpu'" not in err and "--device=" not in err


# --- process-wide state

def test_register_refuses_transformers_own_implementation_names():
    # edge: register("eager") / register("grouped_mm") replaced transformers' own for every model of the process,
    # the float32 reference a comparison builds with experts_implementation="eager" included
    pytest.importorskip("transformers")
    from transformers.integrations.moe import ExpertsInterface

    from moekit.integrations.transformers import register
    before = dict(ExpertsInterface._global_mapping)
    for name in ("eager", "grouped_mm"):
        with pytest.raises(ValueError, match=repr(name)):
            register(name)
    assert dict(ExpertsInterface._global_mapping) == before
    assert register("moekit") == "moekit" and register("moekit") == "moekit"  # (again: its own entry)


def test_one_thread_restores_each_loading_threads_own_count():
    # edge: overlapping loads in two threads, the first ending first: the process-wide save / restore (by the first
    # and the last load) restored in the other thread, and the first thread stayed at 1 intra-op thread
    before = torch.get_num_threads()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with one_thread():
            inside.set()
            release.wait(10)
        seen["other"] = torch.get_num_threads()

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with one_thread():
        seen["during"] = torch.get_num_threads()
    release.set()
    t.join(10)
    assert seen["during"] == 1 and torch.get_num_threads() == before


@pytest.mark.interpreter  # (layers on the Triton backend hold graph caches; a GPU host builds them on CUDA)
def test_a_copied_models_layers_share_one_fresh_graph_pool():
    # edge: load_moe_layers / patch give a model's layers one pool (and allow 2048-token graphs for that reason);
    # a deep copy gave each layer its own pool, keeping the 2048
    pool = GraphPool()
    model = torch.nn.ModuleList(moekit.FusedMoE(E, K, H, I, runner_args={"graph_pool": pool}, eager_graph_tokens=2048,
                                                backend="triton") for _ in range(2))
    assert model[0]._graphs.pool is model[1]._graphs.pool is pool
    twin = copy.deepcopy(model)
    pools = [m._graphs.pool for m in twin]
    assert pools[0] is pools[1] and pools[0] is not pool and isinstance(pools[0], GraphPool)
    assert twin[0]._graphs.lock is twin[1]._graphs.lock is pools[0].lock


# --- kernel configs: the tuner and the lookup

def _raw_table(bk):  # a table as a user may hold it: the optional fp8_acc absent, a 4-bit table's raw BK
    p = {"BN": 64, "BK": bk, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    return {str(t): {"BLOCK_M": 64, "w13": dict(p), "w2": dict(p)} for t in (1, 8, 64, 256, 1024, 4096, 16384)}


@pytest.mark.parametrize("quant, raw_bk, want_bk", [("fp8", 128, 128), ("mxfp4", 64, 128)])
def test_tune_fixes_a_shapes_invariants_as_the_launcher_runs_them(tmp_path, monkeypatch, quant, raw_bk, want_bk):
    # edge: the shape's BLOCK_K and fp8_acc were read from the raw entries but compared with fix_config'd candidates:
    # every candidate of the first bucket was refused, and the table written was refused by the next run
    from moekit.benchmarking import tune
    from moekit.benchmarking.shapes import ModelShape
    from moekit.ops import triton_configs as tc
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tune, "_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(tune, "_device_traits", lambda: (132, (9, 0)))
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    m = ModelShape("custom", E=4, K=2, H=256, I=256)
    key = tc.shape_key(4, 256, 256, 2, torch.bfloat16, True, tune.quant_spec(quant)[1].key)
    (tmp_path / "Fake_GPU.json").write_text(json.dumps({"device": "Fake GPU", "entries": {key: _raw_table(raw_bk)}}))
    tc.clear_config_cache()
    seen = []

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, before, **kw):
        seen.append((tuple(fixed_bk), (fixed_arith or {}).get("fp8_acc")))
        space, base = tune.config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith)
        assert space.refusal(base) is None, space.refusal(base)  # the config in use joins its own shape
        return base, "w", {"base_us": 10.0, "best_us": 10.0, "timed": 1}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    logs = []
    tune.run_tune([(m, [16384, 1])], out=tmp_path, quant=quant, log=logs.append, bar=False)
    assert seen == [((want_bk, want_bk), 128 if quant == "fp8" else None)] * 2
    assert not any("SPEC §9" in s for s in logs), logs


@pytest.mark.parametrize("entries, needle", [
    ({"E=128, H=2048, I=768, K=8, dtype=bf16, gated=1": {}}, "shape key"),  # edge: spaces (a misspelt key was unused)
    ({"E=128,H=2048,I=768,K=8,dtype=bfloat16,gated=1": {}}, "shape key"),  # edge: torch's dtype name
    ({"garbage": {}}, "shape key"),
    # edge: buckets of an fp8 shape on two dot instructions (a token's bits would follow its batch, SPEC §9)
    ({"E=4,H=256,I=256,K=2,dtype=bf16,gated=1,quant=fp8_block128x128": {
        "1": dict(_raw_table(128)["1"], fp8_acc=0), "4096": _raw_table(128)["4096"]}}, "disagree on fp8_acc"),
])
def test_a_config_file_with_a_bad_shape_is_refused(tmp_path, entries, needle):
    from moekit.ops.triton_configs import ConfigFileError, read_config_file
    path = tmp_path / "NVIDIA_H200.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "entries": entries}))
    with pytest.raises(ConfigFileError, match=needle):
        read_config_file(path)


def test_the_shipped_config_files_pass_their_own_reader():
    from moekit.ops.triton_configs import read_config_file
    folder = os.path.join(os.path.dirname(moekit.__file__), "configs")
    for name in os.listdir(folder):
        assert read_config_file(os.path.join(folder, name))["entries"]


def test_a_bucket_that_cannot_be_tuned_is_one_line(monkeypatch, capsys):
    # edge: tune_checks.BucketNotTuned (a RuntimeError) escaped `moekit tune` as a traceback
    from moekit.benchmarking import tune
    from moekit.benchmarking.tune_checks import BucketNotTuned

    def fails(*a, **k):
        raise BucketNotTuned("moekit tune: custom at T=1: the config in use does not run here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune, "run_tune", fails)
    assert main(["tune", "-E", "4", "-H", "256", "-I", "256", "-K", "2", "--tokens", "1", "--out", "/tmp"]) == 1
    _one_line(capsys, "BucketNotTuned", "does not run here")


# --- architectures: activations and construction tensors

@pytest.mark.parametrize("cfg", [
    dict(model_type="mixtral", hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
         num_hidden_layers=1),
    dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
         num_hidden_layers=1),
])
def test_a_gated_architectures_relu2_is_refused(cfg):
    # edge: transformers' gated experts compute relu(g)^2 * u; moekit's relu2 is non-gated (act(up x)): the plan took
    # it, the up rows overwrote the gate rows and the layer computed w2 relu(up x)^2 (relative error ~1 vs transformers)
    from moekit.loading.architectures import plan_layers
    with pytest.raises(NotImplementedError, match="hidden_act='relu2' on gated experts"):
        plan_layers(dict(cfg, hidden_act="relu2"))
    assert plan_layers(dict(cfg, hidden_act="gelu_pytorch_tanh"))[1][0].activation == "gelu_tanh"


def test_nemotron_h_keeps_its_non_gated_relu2():
    from moekit.loading.architectures import plan_layers
    cfg = dict(model_type="nemotron_h", hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
               num_experts_per_tok=K, num_hidden_layers=2, layers_block_type=["mamba", "moe"], n_group=1, topk_group=1)
    assert plan_layers(cfg)[1][0].activation == "relu2"


def _plan_of(cfg):
    from moekit.loading.architectures import plan_layers
    spec, plans = plan_layers(cfg)
    return spec, plans[0]


_LONGCAT = dict(model_type="longcat_flash", hidden_size=H, expert_ffn_hidden_size=I, n_routed_experts=8,
                zero_expert_num=4, moe_topk=3, num_layers=1)
_DSV4 = dict(model_type="deepseek_v4", hidden_size=H, moe_intermediate_size=I, n_routed_experts=8,
             num_experts_per_tok=2, num_hidden_layers=2, num_hash_layers=1)


def test_a_missing_selection_bias_is_named_as_the_checkpoint_has_it():
    # edge: the message named {prefix}gate.e_score_correction_bias, a key LongCat's and DeepSeek-V4's checkpoints lack
    from moekit.loading.keys import check_construction
    spec, plan = _plan_of(_LONGCAT)
    with pytest.raises(KeyError, match=r"mlp\.router\.e_score_correction_bias \(router selection bias"):
        check_construction(plan, {}, {}, None, spec)
    spec, plans = __import__("moekit").loading.architectures.plan_layers(_DSV4)
    with pytest.raises(KeyError, match=r"ffn\.gate\.bias"):
        check_construction(plans[1], {}, {}, None, spec)


def test_a_bad_construction_tensor_is_blamed_on_its_key():
    # edge: a NaN selection bias or a hash table id >= E was reported against config.json, naming no key
    from moekit.loading.keys import check_construction
    spec, plan = _plan_of(_LONGCAT)
    bias = torch.zeros(12)
    bias[3] = float("nan")
    key = {"router.e_score_correction_bias": "model.layers.0.mlp.router.e_score_correction_bias"}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.router\.e_score_correction_bias'.*non-finite"):
        check_construction(plan, {"router.e_score_correction_bias": bias}, key, None, spec)
    spec, plans = __import__("moekit").loading.architectures.plan_layers(_DSV4)
    hashed = next(p for p in plans if p.hash_routing)
    table = torch.full((5, 2), 8, dtype=torch.int64)
    key = {"router.hash_indices_table": "model.layers.0.ffn.gate.tid2eid"}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.ffn\.gate\.tid2eid'.*\[8, 8\]; expected ids in \[0, 8\)"):
        check_construction(hashed, {"router.hash_indices_table": table}, key, None, spec)


@pytest.mark.parametrize("model_type", ["solar_open", "minimax_m2", "minimax_m3_vl_text", "kolibri1", "muse_spark_text",
                                        "inkling_text", "inkling2_text", "inkling2_loop_text"])
def test_a_stray_first_k_dense_replace_drops_no_layer(model_type):
    # edge: these classes read no first_k_dense_replace (Solar Open deletes it): transformers builds every layer MoE,
    # moekit planned from layer 2 on and the first layers' experts were ignored
    from moekit.loading.architectures import plan_layers
    plans = plan_layers(dict(model_type=model_type, num_hidden_layers=4, first_k_dense_replace=2))[1]
    assert [p.layer_idx for p in plans] == [0, 1, 2, 3]


def test_a_short_moe_layer_freq_list_names_the_field():
    from moekit.loading.architectures import plan_layers
    with pytest.raises(ValueError, match="moe_layer_freq lists 2 layers"):
        plan_layers(dict(model_type="minimax_m3_vl_text", num_hidden_layers=4, moe_layer_freq=[1, 0]))


# --- the review of the round's change

@pytest.mark.parametrize("cfg, want", [
    # edge: a plan that fixes its activation read hidden_act anyway, so Ergo's own "relu2" (refused as gated since
    # this round) and the Hub's MiniMax-M3-VL "swigluoai" (no hidden_act moekit maps) failed to plan
    (dict(model_type="ergo", num_hidden_layers=2, hidden_act="relu2"), "relu2"),
    (dict(model_type="minimax_m3_vl_text", num_hidden_layers=2, hidden_act="swigluoai"), "swigluoai"),
])
def test_a_plan_that_fixes_its_activation_ignores_hidden_act(cfg, want):
    from moekit.loading.architectures import plan_layers
    assert {p.activation for p in plan_layers(cfg)[1]} == {want}


def test_a_layer_member_bias_is_named_under_the_decoder_layer():
    # edge: Step-3.7 keeps its selection bias at model.layers.N.moe.router_bias (a decoder-layer member); the message
    # put it under the block (…mlp.moe.router_bias) and under the wrapper's prefix the checkpoint does not use
    from moekit.loading.architectures import plan_layers
    from moekit.loading.keys import check_construction
    spec, plans = plan_layers(dict(model_type="step3p5", num_hidden_layers=5, hidden_size=H, moe_intermediate_size=I,
                                   n_routed_experts=8, num_experts_per_tok=2))
    keys = {"gate.weight": "model.layers.3.moe.gate.weight"}
    with pytest.raises(KeyError, match=r"model\.layers\.3\.moe\.router_bias") as err:
        check_construction(plans[0], {}, keys, None, spec)
    assert "mlp.moe." not in str(err.value) and "language_model" not in str(err.value)


def test_an_fp8_row_formats_fp8_acc_is_clamped_at_its_own_k_step():
    # edge: fp8 channel / tensor run K steps of 128 whatever the activations; the check clamped fp32 shapes at 64,
    # so buckets running fp8_acc 64 and 128 passed
    from moekit.ops.triton_configs import ConfigFileError, read_config_file
    t = _raw_table(128)
    entries = {"E=4,H=256,I=256,K=2,dtype=fp32,gated=1,quant=fp8_channel": {"1": dict(t["1"], fp8_acc=64),
                                                                           "4096": t["4096"]}}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "NVIDIA_H200.json")
        with open(path, "w") as f:
            json.dump({"device": "NVIDIA H200", "entries": entries}, f)
        with pytest.raises(ConfigFileError, match="disagree on fp8_acc"):
            read_config_file(path)


@pytest.mark.interpreter
def test_a_raw_graph_pool_handle_is_not_copied():
    # edge: a layer given a raw torch.cuda.graph_pool_handle() (a process-local id) passed it to its copies and
    # pickles: a copy captured into the original's pool with a lock of its own
    layer = moekit.FusedMoE(E, K, H, I, runner_args={"graph_pool": (0, 7)}, backend="triton")
    assert layer._graphs.pool == (0, 7)
    assert copy.deepcopy(layer)._graphs.pool is None


@pytest.mark.interpreter  # (the Triton gate on CPU tensors; a GPU host runs tests/loading/test_router_linear.py)
def test_a_strided_gate_bias_is_read_by_its_strides_in_inference():
    # edge: an assigning load gave the Triton gate a bias that is a view (stride 2); the direct launch (no_grad /
    # inference_mode, how models run) read it with unit stride: other logits, other experts, silently
    from moekit.loading.modules import RouterLinear
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(8, 2, generator=g)
    state = {"weight": torch.randn(8, 64, generator=g) * 0.1, "bias": packed[:, 0]}
    tri, ref = RouterLinear(64, 8, bias=True, backend="triton"), RouterLinear(64, 8, bias=True, backend="torch")
    tri.load_state_dict(state, assign=True)
    ref.load_state_dict(state, assign=True)
    assert tri.bias.stride() == (2,)
    x = torch.randn(5, 64, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(tri(x), ref(x), rtol=1e-5, atol=1e-5)


def nemotron_h_model(**overrides):
    """A tiny random Nemotron-H model (layer 1 MoE, relu2 experts), fp32, eval; ``overrides``: config fields."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              layers_block_type=["attention", "moe"], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=24, n_group=1, topk_group=1, mamba_num_heads=4, mamba_head_dim=8,
              ssm_state_size=8, n_groups=1, chunk_size=16)
    torch.manual_seed(0)
    return transformers.NemotronHForCausalLM(transformers.CONFIG_MAPPING["nemotron_h"](**{**kw, **overrides})).eval()


def test_nemotron_h_zero_shared_width_is_the_dense_width(tmp_path):
    # edge: transformers' NemotronHMLP takes `intermediate_size or config.intermediate_size`: a shared width of 0 is the
    # dense MLP's; moekit planned no shared expert and refused the checkpoint's shared MLP with a misleading message
    model = nemotron_h_model(moe_shared_expert_intermediate_size=0)
    model.save_pretrained(tmp_path)
    layer = next(iter(moekit.load_moe_layers(str(tmp_path), progress=False).values()))
    assert layer.shared_experts is not None
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), model.model.layers[1].mixer(x[None])[0], rtol=1e-4, atol=1e-5)


def test_an_unknown_hidden_act_lists_the_gated_ones():
    # edge: the list of supported names offered relu2, which every gated family then refuses
    from moekit.ops.activation import gated_activation_from_hf
    with pytest.raises(NotImplementedError, match="supported: ") as err:
        gated_activation_from_hf("gelu_fast")
    assert "relu2" not in str(err.value) and "'silu'" in str(err.value)


def test_ergo_zero_width_shared_expert_loads_as_none(tmp_path):
    # edge: a zero-width shared MLP adds 0 (transformers runs it), but its output norm's weight (H elements) had no
    # place in the layer: KeyError. It is dropped with the empty projections, as Qwen2-MoE's gate is.
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integrations"))
    import hf_tiny
    import hf_tiny13
    from transformers import CONFIG_MAPPING
    cfg_type, cls_name, o = hf_tiny13.TINY13["ergo"]
    if cfg_type not in CONFIG_MAPPING:
        pytest.skip("this transformers has no Ergo")
    cls = CONFIG_MAPPING[cfg_type]
    fields = hf_tiny13._fields(cls)
    kw = {k: v for k, v in hf_tiny13.COMMON.items() if k in fields}
    kw.update({k: v for k, v in o.items() if k in fields or k not in hf_tiny13.OPTIONAL_FIELDS})
    kw["shared_intermediate_size"] = 0
    torch.manual_seed(0)
    model = hf_tiny13._model_class(cls_name, cfg_type)(cls(**kw)).float().eval()
    hf_tiny._randomise(model, 0)
    model.save_pretrained(tmp_path)
    layers = moekit.load_moe_layers(str(tmp_path), progress=False)
    assert layers and all(layer.shared_experts is None for layer in layers.values())
