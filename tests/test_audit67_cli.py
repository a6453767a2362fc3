"""Round 67's CLI and inspect review: `moekit inspect` read an unreadable shard as "no header" and showed fp8 experts
without a quantization_config as a full-precision dtype (exit 0 both), and counted the router at the experts'
2 bytes without its bias; `bench --reference` passed rows whose numbers were not numbers; a failing stdout was blamed
on config.json (inspect) or a traceback (demo); `bench --eager-only` wrote two empty plots and took a --reference
drawn nowhere. Each case names the edge it covers."""

import json
import os
import subprocess
import sys

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.loading.inspect import rows
from test_audit53_cli import _one_line  # one stderr line naming the needles, no traceback
from test_audit56_inspect import QWEN3, _checkpoint, _tensors  # a tiny Qwen3-MoE checkpoint, 1 or several shards

E, K = 8, 2
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.router", "lm_head"]}


def _stacks(h, i):
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * i, h, generator=g) * h**-0.5, torch.randn(E, h, i, generator=g) * i**-0.5


def _deepseek_fp8(path, quantization_config=True):
    """A DeepSeek-V3 fp8 block checkpoint (one MoE layer, fp8 shared expert, router in bf16 on disk); without
    ``quantization_config`` in config.json where asked."""
    h = i = 32
    cfg = dict(model_type="deepseek_v3", hidden_size=h, moe_intermediate_size=i, n_routed_experts=E,
               num_experts_per_tok=K, n_group=2, topk_group=1, n_shared_experts=1, num_hidden_layers=2,
               first_k_dense_replace=1, dtype="bfloat16", quantization_config=FP8)
    fmt = moekit.parse_quant_config(FP8)
    q13, q2, s13, s2 = moekit.quantize_experts(*_stacks(h, i), fmt)
    pre, n13, t = "model.layers.1.mlp.", s13.shape[1] // 2, {}
    for e in range(E):
        for proj, w, s in (("gate_proj", q13[e, :i], s13[e, :n13]), ("up_proj", q13[e, i:], s13[e, n13:]),
                           ("down_proj", q2[e], s2[e])):
            t[f"{pre}experts.{e}.{proj}.weight"], t[f"{pre}experts.{e}.{proj}.weight_scale_inv"] = w, s
    t[pre + "gate.weight"] = torch.randn(E, h).bfloat16()
    t[pre + "gate.e_score_correction_bias"] = torch.rand(E)
    for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        wq, s = moekit.ops.quantize.quantize_weight(torch.randn(*shape) * 0.1, fmt)
        t[pre + f"shared_experts.{proj}.weight"], t[pre + f"shared_experts.{proj}.weight_scale_inv"] = wq, s
    if not quantization_config:
        del cfg["quantization_config"]
    return _checkpoint(path, cfg, {k: v.contiguous() for k, v in t.items()}), cfg


def _gpt_oss_mxfp4(path, quantization_config=True):
    """A gpt-oss mxfp4 checkpoint (one layer; a router with a bias, bf16)."""
    h = i = 64
    cfg = dict(model_type="gpt_oss", hidden_size=h, intermediate_size=i, num_local_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, dtype="bfloat16", quantization_config=MXFP4)
    q13, q2, s13, s2 = moekit.quantize_experts(*_stacks(h, i), moekit.parse_quant_config(MXFP4))
    pre = "model.layers.0.mlp."
    t = {pre + "router.weight": torch.randn(E, h).bfloat16(), pre + "router.bias": torch.randn(E).bfloat16(),
         pre + "experts.gate_up_proj_blocks": q13.view(E, 2 * i, h // 32, 16), pre + "experts.gate_up_proj_scales": s13,
         pre + "experts.gate_up_proj_bias": torch.zeros(E, 2 * i).bfloat16(),
         pre + "experts.down_proj_blocks": q2.view(E, h, i // 32, 16), pre + "experts.down_proj_scales": s2,
         pre + "experts.down_proj_bias": torch.zeros(E, h).bfloat16()}
    if not quantization_config:
        del cfg["quantization_config"]
    return _checkpoint(path, cfg, {k: v.contiguous() for k, v in t.items()}), cfg


def _held(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) if module else 0


# --- 1. an unreadable .safetensors file

def test_a_truncated_shard_is_an_error_naming_it(tmp_path, capsys):
    # edge: an interrupted download: read_header's error was swallowed, sizes shown at config.json's float32, exit 0
    path = _checkpoint(tmp_path, dict(QWEN3, dtype="float32"), _tensors(torch.bfloat16))
    os.truncate(tmp_path / "model.safetensors", os.path.getsize(tmp_path / "model.safetensors") - 100)
    assert main(["inspect", path]) == 1
    _one_line(capsys, "moekit inspect: error: ", str(tmp_path / "model.safetensors"), "truncated or corrupt")


def test_a_truncated_shard_of_an_index_is_an_error_naming_it(tmp_path, capsys):
    # edge: a sharded checkpoint (an index) whose shard holding experts is cut short: the same, exit 0 before
    path = _checkpoint(tmp_path, dict(QWEN3, torch_dtype="float16"), _tensors(torch.float32), shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    os.truncate(shard, os.path.getsize(shard) - 100)
    assert main(["inspect", path]) == 1
    _one_line(capsys, "moekit inspect: error: ", str(shard), "truncated or corrupt")
    # (config.json alone still shows the layout at its dtype: tests/test_audit56_inspect.py)


# --- 2. the router as the loaded layer holds it

@pytest.mark.parametrize("build", [_deepseek_fp8, _gpt_oss_mxfp4])
def test_bytes_per_token_count_the_router_as_the_layer_holds_it(tmp_path, build):
    # edge: DeepSeek-V3 keeps its gate in float32 in a bf16 load (counted at 2 bytes); gpt-oss's router bias (left out)
    path, cfg = build(tmp_path)
    row = rows(cfg, path)[1][0]
    layer = next(iter(moekit.load_moe_layers(path, progress=False).values()))
    routed = _held(layer.routed_experts) // E
    assert row["_bytes"] == routed
    assert row["_token_bytes"] == K * routed + _held(layer.shared_experts) + _held(layer.gate)


def test_the_router_bytes_by_hand():
    # edge: the hand count of a real DeepSeek-V3 fp8 row: 256 x 7168 float32 = 7 MiB of router per block, not 3.5
    cfg = dict(model_type="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
               num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1, num_hidden_layers=61,
               first_k_dense_replace=3, dtype="bfloat16", quantization_config=dict(FP8, weight_block_size=[128, 128]))
    row = rows(cfg)[1][0]
    fmt = moekit.parse_quant_config(cfg["quantization_config"])
    assert row["_token_bytes"] == 9 * fmt.bytes_per_expert(2048, 7168) + 256 * 7168 * 4


# --- 3. quantised weights without a quantization_config

@pytest.mark.parametrize("build, stored", [(_deepseek_fp8, "F8_E4M3"), (_gpt_oss_mxfp4, "U8")])
def test_quantised_experts_without_a_quantization_config_are_refused(tmp_path, build, stored, capsys):
    # edge: fp8 (and mxfp4's packed uint8) experts shown as a full-precision dtype "f8_e4m3", exit 0; the load refuses
    path, cfg = build(tmp_path, quantization_config=False)
    assert main(["inspect", path]) == 1
    block = "model.layers.1.mlp" if cfg["model_type"] == "deepseek_v3" else "model.layers.0.mlp"
    _one_line(capsys, f"moekit inspect: error: {block}: ", stored, "config.json has no quantization_config")
    with pytest.raises((TypeError, ValueError)):
        moekit.load_moe_layers(path, progress=False)


# --- 4. the values of a --reference file

@pytest.mark.parametrize("key, value", [
    ("us", None), ("us", "182.0"), ("us", 0), ("us", -3.0), ("us", float("nan")), ("us", True),  # edge: us not > 0
    ("tokens", 0), ("tokens", 1.5), ("tokens", "8"), ("tokens", True),  # edge: tokens no int >= 1
])
def test_a_reference_row_whose_numbers_are_no_numbers_is_refused_before_the_run(tmp_path, key, value, capsys):
    # the plot dropped the file at the end of the run; now the file, the row, the key and the value are named
    good = dict(model="deepseek-v3", tokens=1, impl="vllm-full", quant="bf16", us=182.0)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"rows": [good, {**good, "tokens": 8, key: value}]}))
    assert main(["bench", "--reference", str(ref)]) == 2
    _one_line(capsys, "--reference", "ref.json: row 1: ", repr(key), repr(value))


# --- 5. a failing stdout

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["inspect", "demo"])
def test_a_failing_stdout_is_one_line_naming_no_config(tmp_path, command):
    # edge: `moekit inspect DIR > /dev/full` blamed config.json ("a malformed value?"); `moekit demo` was a traceback
    argv = ["inspect", _checkpoint(tmp_path, QWEN3, _tensors(torch.bfloat16))] if command == "inspect" else \
        ["demo", "--repeats", "1", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "moekit", *argv], stdout=full, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 1, err
    assert err == f"moekit {command}: error: OSError: [Errno 28] No space left on device", err


# --- 6. --eager-only and the plots

def test_plots_without_rows_to_draw_are_skipped(tmp_path):
    # edge: `bench --eager-only` wrote a roofline and a speed PNG with no data point in either
    from moekit.benchmarking.plot import write_plots

    eager = [dict(model="qwen3-30b-a3b", tokens=t, impl=i, us=30.0 + t, host_us=40.0, pct_roofline=None, device="cpu",
                  dtype="bfloat16", quant="bf16") for t in (1, 8) for i in ("eager-linear", "eager-layer")]
    lines = []
    assert write_plots(eager, tmp_path / "x", 4e12, 9e14, None, [], log=lines.append) == []
    assert list(tmp_path.iterdir()) == []
    assert lines == ["plot x.png skipped: no rows for it (the JSON holds every row)",
                     "plot x-speed.png skipped: no rows for it (the JSON holds every row)"]


def test_eager_only_refuses_a_reference_and_reads_no_default_one(tmp_path, monkeypatch, capsys):
    # edge: --reference with --eager-only was accepted and drawn nowhere (the eager rows are in no plot)
    import moekit.benchmarking.bench as bench
    import moekit.cli as cli

    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([dict(model="deepseek-v3", tokens=1, impl="vllm-full", quant="bf16", us=182.0)]))
    assert main(["bench", "--eager-only", "--reference", str(ref)]) == 2
    _one_line(capsys, "--reference", "--eager-only", "ref.json")
    # edge: the default reference (benchmarks/baselines/) was passed on and recorded in the run's meta
    seen = {}
    monkeypatch.setattr(cli, "_needs_cuda", lambda name: True)
    monkeypatch.setattr(bench, "default_reference", lambda: ref)
    monkeypatch.setattr(bench, "run_bench", lambda models, tokens, dtype, **kw: seen.update(kw))
    assert main(["bench", "--eager-only", "--out", str(tmp_path)]) == 0
    assert seen["reference"] is None
    assert main(["bench", "--out", str(tmp_path)]) == 0 and seen["reference"] == ref  # (without --eager-only: kept)
