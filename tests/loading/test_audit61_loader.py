"""Round 61's loader audit: a block's non-expert tensors of a quantised checkpoint.

Each case builds a tiny safetensors checkpoint (config.json + one file) and loads it with ``load_moe_layers``.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit import FusedMoE, load_moe_layers
from moekit.ops._quant_rules import fp8_block_quantize
from moekit.ops.quantize import quantize_weight

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
PRE = "model.layers.0.mlp."


def _write(path, config, tensors) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


def _fp8_experts(e, h, i, fmt, block_rows=1):
    """Per-expert fp8 keys of ``e`` experts (gate / up / down with their weight_scale_inv)."""
    torch.manual_seed(0)
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(e, 2 * i, h) * 0.05, torch.randn(e, h, i) * 0.05, fmt)
    t = {}
    for x in range(e):
        t[PRE + f"experts.{x}.gate_proj.weight"], t[PRE + f"experts.{x}.gate_proj.weight_scale_inv"] = \
            q13[x, :i], s13[x, :block_rows]
        t[PRE + f"experts.{x}.up_proj.weight"], t[PRE + f"experts.{x}.up_proj.weight_scale_inv"] = \
            q13[x, i:], s13[x, block_rows:]
        t[PRE + f"experts.{x}.down_proj.weight"], t[PRE + f"experts.{x}.down_proj.weight_scale_inv"] = q2[x], s2[x]
    return t


def _qwen2(h, i, si, e=4, k=2, q=FP8):
    return dict(model_type="qwen2_moe", hidden_size=h, moe_intermediate_size=i, shared_expert_intermediate_size=si,
                num_experts=e, num_experts_per_tok=k, num_hidden_layers=1, dtype="float32", norm_topk_prob=False,
                quantization_config=q)


def _qwen2_tensors(h, i, si, shared, e=4):
    fmt = moekit.parse_quant_config(FP8)
    t = {PRE + "gate.weight": torch.randn(e, h), **_fp8_experts(e, h, i, fmt)}
    return {**t, **shared}


def test_quantised_weight_without_its_scale_is_refused(tmp_path):
    # the edge: a shipped-fp8 shared expert whose weight_scale_inv is missing: before, it took the plain path and its
    # e4m3 codes were cast to bf16 as if they were the weights (|w| up to 448 instead of ~0.2)
    h, i, si = 64, 32, 32
    fmt = moekit.parse_quant_config(FP8)
    shared = {}
    for proj, shape in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
        wq, s = quantize_weight(torch.randn(*shape) * 0.05, fmt)
        shared[PRE + f"shared_expert.{proj}.weight"] = wq
        if proj != "down_proj":
            shared[PRE + f"shared_expert.{proj}.weight_scale_inv"] = s
    path = _write(tmp_path / "c", _qwen2(h, i, si), _qwen2_tensors(h, i, si, shared))
    with pytest.raises(TypeError, match=r"down_proj\.weight.*float8_e4m3fn.*without its scale"):
        load_moe_layers(path)


def test_integer_router_weight_is_refused(tmp_path):
    # the edge: an int64 gate.weight was cast to the router's float32 silently
    h, i, e = 96, 64, 4
    t = {PRE + "gate.weight": torch.randint(-3, 3, (e, h), dtype=torch.int64)}
    for x in range(e):
        t[PRE + f"experts.{x}.gate_proj.weight"] = torch.randn(i, h)
        t[PRE + f"experts.{x}.up_proj.weight"] = torch.randn(i, h)
        t[PRE + f"experts.{x}.down_proj.weight"] = torch.randn(h, i)
    cfg = dict(model_type="qwen3_moe", hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=2,
               num_hidden_layers=1, dtype="float32", norm_topk_prob=True)
    with pytest.raises(TypeError, match=r"gate\.weight.*torch\.int64.*expected a float tensor"):
        load_moe_layers(_write(tmp_path / "c", cfg, t))


@pytest.mark.parametrize("case", ["too_many_blocks", "too_few_blocks", "bf16_weight"])
def test_dequantised_dense_linear_checks_its_scale_and_dtype(tmp_path, case):
    # the edges: a shared_expert_gate quantised with 16-wide blocks (scale [1, 4] where the config's 32 blocks
    # give [1, 2]) loaded 97 % off (the grid cut to fit); one of too few blocks failed inside torch naming no key;
    # a bf16 weight beside a stale scale was multiplied by it
    h, i, si = 64, 32, 32
    shared = {}
    for proj, shape in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
        wq, s = fp8_block_quantize(torch.randn(*shape) * 0.05, 32, 32)
        shared[PRE + f"shared_expert.{proj}.weight"], shared[PRE + f"shared_expert.{proj}.weight_scale_inv"] = wq, s
    gw = torch.randn(1, h)
    block = {"too_many_blocks": 16, "too_few_blocks": 64, "bf16_weight": 32}[case]
    wq, s = fp8_block_quantize(gw, block, block)
    if case == "bf16_weight":
        wq = gw.bfloat16()
    shared[PRE + "shared_expert_gate.weight"], shared[PRE + "shared_expert_gate.weight_scale_inv"] = wq, s
    path = _write(tmp_path / "c", _qwen2(h, i, si), _qwen2_tensors(h, i, si, shared))
    if case == "bf16_weight":
        with pytest.raises(TypeError, match=r"shared_expert_gate: a quantised linear's weight has dtype .*bfloat16"):
            load_moe_layers(path)
    else:
        got = "1, 4" if case == "too_many_blocks" else "1, 1"
        with pytest.raises(ValueError, match=rf"shared_expert_gate: the scale has shape \[{got}\], expected \[1, 2\]"):
            load_moe_layers(path)


def test_dequantised_dense_linear_loads_its_values(tmp_path):
    # the control of the case above: the right grid loads the dequantised weight exactly
    h, i, si = 64, 32, 32
    shared = {}
    for proj, shape in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
        wq, s = fp8_block_quantize(torch.randn(*shape) * 0.05, 32, 32)
        shared[PRE + f"shared_expert.{proj}.weight"], shared[PRE + f"shared_expert.{proj}.weight_scale_inv"] = wq, s
    wq, s = fp8_block_quantize(torch.randn(1, h), 32, 32)
    shared[PRE + "shared_expert_gate.weight"], shared[PRE + "shared_expert_gate.weight_scale_inv"] = wq, s
    layer = load_moe_layers(_write(tmp_path / "c", _qwen2(h, i, si), _qwen2_tensors(h, i, si, shared)))[PRE[:-1]]
    want = (wq.float().view(1, 2, 32) * s.view(1, 2, 1)).view(1, h)
    got = dict(layer.named_parameters())
    name = next(n for n in got if "shared_expert_gate" in n and n.endswith("weight"))
    torch.testing.assert_close(got[name].detach().float(), want, rtol=0, atol=0)


def test_int4_dense_weight_shape_checked(tmp_path):
    # the edge: compressed-tensors' weight_shape of a dequantised dense linear was read and ignored (the experts'
    # is checked): a wrong one now raises, naming the module
    h, i, si, e = 64, 32, 32, 4
    q = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                           "group_size": 32}}},
         "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]}
    fmt = moekit.parse_quant_config(q)
    t = {PRE + "gate.weight": torch.randn(e, h), PRE + "shared_expert_gate.weight": torch.randn(1, h)}
    torch.manual_seed(0)
    for x in range(e):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            wq, s = quantize_weight(torch.randn(*shape) * 0.05, fmt)
            t[PRE + f"experts.{x}.{proj}.weight_packed"], t[PRE + f"experts.{x}.{proj}.weight_scale"] = wq, s
            t[PRE + f"experts.{x}.{proj}.weight_shape"] = torch.tensor(shape)
    for proj, shape in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
        wq, s = quantize_weight(torch.randn(*shape) * 0.05, fmt)
        t[PRE + f"shared_expert.{proj}.weight_packed"], t[PRE + f"shared_expert.{proj}.weight_scale"] = wq, s
        t[PRE + f"shared_expert.{proj}.weight_shape"] = torch.tensor(shape[::-1] if proj == "down_proj" else shape)
    cfg = _qwen2(h, i, si, e, q=q)
    with pytest.raises(ValueError, match=r"shared_experts?\.down_proj: weight_shape = \[32, 64\], expected \[64, 32\]"):
        load_moe_layers(_write(tmp_path / "bad", cfg, t))
    t[PRE + "shared_expert.down_proj.weight_shape"] = torch.tensor((h, si))
    assert PRE[:-1] in load_moe_layers(_write(tmp_path / "good", cfg, t))


def test_gemma4_fp8_checkpoint_router_scale_is_not_a_quantised_linear(tmp_path):
    # the edge: Gemma 4's router has a learned `scale` vector; `router.scale` was taken for a quantised linear's scale
    # without a weight, and every shipped-quantised Gemma 4 checkpoint failed with a KeyError
    e, k, h, i = 4, 2, 64, 32
    q = dict(FP8, modules_to_not_convert=["model.layers.*.router", "lm_head"])
    cfg = dict(model_type="gemma4_text", hidden_size=h, num_hidden_layers=1, enable_moe_block=True, num_experts=e,
               top_k_experts=k, moe_intermediate_size=i, dtype="bfloat16")
    pre = "model.layers.0."
    torch.manual_seed(0)
    w13, w2 = torch.randn(e, 2 * i, h) * 0.05, torch.randn(e, h, i) * 0.05
    scale = torch.rand(h).bfloat16() + 0.5
    common = {pre + "router.proj.weight": torch.randn(e, h).bfloat16(), pre + "router.scale": scale,
              pre + "router.per_expert_scale": torch.rand(e).bfloat16() + 0.5,
              pre + "pre_feedforward_layernorm_2.weight": torch.rand(h).bfloat16(),
              pre + "post_feedforward_layernorm_2.weight": torch.rand(h).bfloat16()}
    q13, s13 = fp8_block_quantize(w13, 32, 32)
    q2, s2 = fp8_block_quantize(w2, 32, 32)
    layers = load_moe_layers(_write(tmp_path / "fp8", dict(cfg, quantization_config=q), {
        **common, pre + "experts.gate_up_proj": q13, pre + "experts.gate_up_proj_scale_inv": s13,
        pre + "experts.down_proj": q2, pre + "experts.down_proj_scale_inv": s2}))
    layer = next(iter(layers.values()))
    assert layer.routed_experts.quant.name == "fp8_block"
    loaded = [p for n, p in layer.named_parameters() if n.endswith("scale") and p.shape == (h,)]
    assert loaded and all(torch.equal(p.detach().bfloat16(), scale) for p in loaded)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_scale_dtype_is_a_type_error(dtype):
    # the edge: a scale stored in a float8 dtype raised torch's NotImplementedError from the value checks (which
    # reads as "format not supported", SPEC §8), naming no tensor
    e, k, h, i = 4, 2, 96, 64
    layer = FusedMoE(e, k, h, i, params_dtype=torch.bfloat16, quant_config=FP8, backend="torch")
    fmt = moekit.parse_quant_config(FP8)
    _, _, s13, _ = moekit.quantize_experts(torch.randn(e, 2 * i, h), torch.randn(e, h, i), fmt)
    with pytest.raises(TypeError, match=r"expert 0 w1 scale has dtype .*float8.*scales are float32"):
        layer.routed_experts.load_expert_shard(0, "w1", s13[0, :2].to(dtype), kind="scale")


def test_dense_block_grid_of_one_column():
    # the edge: a block-quantised dense linear with K <= block_k has a grid [ceil(N / bn), 1]; the per-channel
    # [N, 1] -> [N] reshape applied to it, and dequantising raised IndexError
    from moekit.loading.quant import dequantize_dense
    fmt = moekit.parse_quant_config(FP8)
    w = torch.randn(40, 20)
    q, s = fp8_block_quantize(w, 32, 32)
    assert s.shape == (2, 1)
    got = dequantize_dense({"weight": q, "weight_scale_inv": s}, fmt, "m")
    want = q.float() * s.repeat_interleave(32, 0)[:40]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("value", [-1, 0, True, 10_000_000, 2.5, "24"])
def test_num_hidden_layers_checked(value):
    # the edges: -1 planned "0 MoE blocks of -1 layers" with exit 0; 1e7 planned for minutes; a bool read as 1
    from moekit.loading.archs.common import layers
    with pytest.raises(ValueError, match="num_hidden_layers must be a whole number in"):
        layers({"num_hidden_layers": value})


def test_num_hidden_layers_accepted():
    # the controls: absent (0: no layers planned, as before), an int, an integral float
    from moekit.loading.archs.common import layers
    assert (layers({}), layers({"num_hidden_layers": 24}), layers({"num_hidden_layers": 24.0})) == (0, 24, 24)
