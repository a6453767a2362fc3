"""Round 63's audit of quantised checkpoints: compressed-tensors targets naming the per-expert modules, `moekit
inspect` rows of blocks in different formats or stored dtypes, and the bytes an int4 expert holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moekit.loading.architectures import plan_layers
from moekit.loading.inspect import rows
from moekit.loading.quant import checkpoint_formats, experts_format
from moekit.ops.formats import Int4GroupFormat

H, I, E, K = 128, 64, 4, 2


def _int4_config(targets, layers=1):
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": targets, "input_activations": None,
                                        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                    "strategy": "group", "group_size": 32}}}}
    return dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                num_hidden_layers=layers, dtype="bfloat16", quantization_config=ct)


@pytest.mark.parametrize("targets", [
    ["Linear"],  # every linear (the shortcut)
    [r"re:.*mlp\.experts\.\d+\..*"],  # the per-expert modules, as compressed-tensors matches names: was full precision
    [r"re:.*experts\.[0-9]+\.(gate|up|down)_proj$"],  # each projection named
])
def test_targets_naming_the_per_expert_modules_quantise_the_experts(targets):
    config = _int4_config(targets)
    _, plans = plan_layers(config)
    fmt = checkpoint_formats(config, None)[0]
    assert experts_format(fmt, plans[0]) == fmt


def test_targets_naming_some_experts_are_refused():
    # the edge: experts 0 targeted, the others not: one layer holds one format (the documented refusal, not the load's
    # "a scale was given but the layer has quant_config=None")
    config = _int4_config([r"re:.*experts\.0\.(gate|up|down)_proj$"])
    _, plans = plan_layers(config)
    with pytest.raises(NotImplementedError, match=r"keeps routed experts 1, 2, 3 \(3 of 4\) in full precision"):
        experts_format(checkpoint_formats(config, None)[0], plans[0])


def test_targets_naming_no_expert_leave_them_full_precision():
    config = _int4_config([r"re:.*self_attn\..*"])
    _, plans = plan_layers(config)
    assert experts_format(checkpoint_formats(config, None)[0], plans[0]) is None


def test_inspect_rows_split_blocks_of_different_formats():
    # the edge: a group took its first block's format, so layer 0 (experts excluded) and layer 1 (fp8) were one row
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
           "modules_to_not_convert": [r"re:model\.layers\.0\.mlp\.experts\..*", "gate"]}
    config = dict(model_type="qwen3_moe", hidden_size=256, moe_intermediate_size=128, num_experts=E,
                  num_experts_per_tok=K, num_hidden_layers=3, dtype="bfloat16", quantization_config=fp8)
    _, table = rows(config)
    assert [(r["layers"], r["quant"]) for r in table] == [("0", "bf16"), ("1-2", "fp8_block")]


def test_inspect_rows_split_blocks_stored_in_different_dtypes(tmp_path):
    # the edge: layer 0's experts stored bf16, layer 1's fp32: one row "bf16" for both
    config = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E,
                  num_experts_per_tok=K, num_hidden_layers=2, dtype="bfloat16")
    tensors = {}
    for layer, dtype in ((0, torch.bfloat16), (1, torch.float32)):
        pre = f"model.layers.{layer}.mlp."
        tensors[pre + "gate.weight"] = torch.zeros(E, H, dtype=torch.bfloat16)
        for e in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                tensors[f"{pre}experts.{e}.{proj}.weight"] = torch.zeros(shape, dtype=dtype)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, table = rows(config, str(tmp_path))
    assert [(r["layers"], r["quant"]) for r in table] == [("0", "bf16"), ("1", "fp32")]


def test_int4_bytes_count_the_scales_as_held():
    # the edge: int4's scales ship bf16 and were counted so; the layer holds (and the kernels read) float32
    fmt = Int4GroupFormat(32)
    scales = 3 * I * H // 32
    assert fmt.bytes_per_expert(I, H) == 3 * I * H // 2 + 4 * scales
