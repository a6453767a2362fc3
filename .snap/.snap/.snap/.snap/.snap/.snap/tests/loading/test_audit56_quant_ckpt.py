"""Round 56's audit of quantised checkpoints in load_moe_layers: an expert weight stored in a float dtype in a
checkpoint that ships its experts quantised (loaded silently, its shipped scale kept or replaced by file order),
modules_to_not_convert naming some of a block's experts (decided from expert 0 alone), a gpt-oss ``_blocks`` stack of
the wrong rank (a raw IndexError). e4m3 NaN codes in expert weights are not looked for (their outputs are NaN, not
wrong; a pass over every byte would slow every load): the largest finite codes load as they are."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit import load_moe_layers

H, I, E, K, B = 64, 32, 4, 2, 32
PRE = "model.layers.0.mlp."
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [B, B]}
SHAPES = (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))


def _write(path, config, tensors):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))


def _qwen3(quant=None, **extra):
    cfg = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, norm_topk_prob=True, dtype="float32")
    if quant is not None:
        cfg["quantization_config"] = dict(quant, **extra)
    return cfg


def _fp8_tensors(seed=0, float_experts=()):
    """DeepSeek-V3-style per-expert fp8 block tensors (e4m3 + weight_scale_inv 0.01); ``float_experts`` in bf16."""
    g = torch.Generator().manual_seed(seed)
    t = {PRE + "gate.weight": torch.randn(E, H, generator=g)}
    for e in range(E):
        for p, (n, k) in SHAPES:
            codes = torch.rand(n, k, generator=g) * 200 - 100  # |codes| <= 100 < 448
            if e in float_experts:
                t[PRE + f"experts.{e}.{p}.weight"] = (codes * 0.01).bfloat16()
                continue
            t[PRE + f"experts.{e}.{p}.weight"] = codes.to(torch.float8_e4m3fn)
            t[PRE + f"experts.{e}.{p}.weight_scale_inv"] = torch.full((n // B, k // B), 0.01)
    return t


# --- 1. an expert weight stored in a float dtype in a shipped fp8 checkpoint ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_float_stored_expert_weight_of_a_shipped_fp8_checkpoint_is_refused(dtype, tmp_path):
    # edge: e4m3 codes up-cast (lossless) to bf16 / fp32 / fp16 with their weight_scale_inv kept; silent before,
    # re-quantised with its own scale (fp32: 3.2 off) or its scale overwritten by the shipped one in file order (bf16:
    # 86x off). Now a TypeError naming the file, the key, its dtype and the format's storage dtype
    t = _fp8_tensors()
    key = PRE + "experts.0.gate_proj.weight"
    t[key] = t[key].to(dtype)
    _write(tmp_path, _qwen3(FP8), t)
    msg = rf"model\.safetensors: checkpoint key '{re.escape(key)}' has dtype {dtype}, expected torch\.float8_e4m3fn"
    with pytest.raises(TypeError, match=msg):
        load_moe_layers(tmp_path, progress=False)


def test_float_fused_stack_of_a_shipped_mxfp4_checkpoint_is_refused(tmp_path):
    # edge: gpt-oss with quantization_config mxfp4 but a bf16 experts.gate_up_proj stack (no _blocks): it was quantised
    # on load silently, its shipped _scales then overwriting (or not) the ones made; now TypeError naming the key
    cfg = dict(model_type="gpt_oss", hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, dtype="bfloat16", quantization_config={"quant_method": "mxfp4"})
    g = torch.Generator().manual_seed(0)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
    _write(tmp_path, cfg, {
        PRE + "router.weight": torch.randn(E, H).bfloat16(), PRE + "router.bias": torch.zeros(E).bfloat16(),
        PRE + "experts.gate_up_proj": torch.randn(E, H, 2 * I).bfloat16(),  # should be _blocks
        PRE + "experts.gate_up_proj_scales": torch.full((E, 2 * I, H // 32), 120, dtype=torch.uint8),
        PRE + "experts.gate_up_proj_bias": torch.zeros(E, 2 * I).bfloat16(),
        PRE + "experts.down_proj_blocks": u8(E, H, I // 32, 16),
        PRE + "experts.down_proj_scales": torch.full((E, H, I // 32), 120, dtype=torch.uint8),
        PRE + "experts.down_proj_bias": torch.zeros(E, H).bfloat16()})
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' has dtype torch\.bfloat16, "
                                        r"expected torch\.uint8 or torch\.int8"):
        load_moe_layers(tmp_path, progress=False)


def test_float_weight_of_a_shipped_int4_checkpoint_is_refused(tmp_path):
    # edge: compressed-tensors int4 pack-quantized, one expert shipping a bf16 `.weight` next to its weight_scale:
    # quantised on load before (its shipped group scale replaced or not by file order); now TypeError (int32 expected)
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head", "re:.*mlp.gate$"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                    "strategy": "group", "group_size": 32, "dynamic": False}}}}
    fmt = moekit.parse_quant_config(ct)
    g = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, fmt)
    t = {PRE + "gate.weight": torch.randn(E, H)}
    for e in range(E):
        for proj, w, s in (("gate_proj", q13[e, :I], s13[e, :I]), ("up_proj", q13[e, I:], s13[e, I:]),
                           ("down_proj", q2[e], s2[e])):
            t[PRE + f"experts.{e}.{proj}.weight_packed"], t[PRE + f"experts.{e}.{proj}.weight_scale"] = w, s
    key = PRE + "experts.2.down_proj.weight"
    del t[PRE + "experts.2.down_proj.weight_packed"]
    t[key] = w2[2].bfloat16()
    _write(tmp_path, _qwen3(ct), t)
    with pytest.raises(TypeError, match=rf"'{re.escape(key)}' has dtype torch\.bfloat16, expected torch\.int32"):
        load_moe_layers(tmp_path, progress=False)


def test_quantise_on_load_and_excluded_layers_still_take_float_experts(tmp_path):
    # edge (guard, passes before and after): a full-precision checkpoint quantised with quant_config= and a shipped fp8
    # checkpoint whose block's experts are all in modules_to_not_convert (bf16) still load their float weights
    t = _fp8_tensors(float_experts=range(E))
    _write(tmp_path / "bf", _qwen3(), t)
    layer = load_moe_layers(tmp_path / "bf", quant_config=FP8, progress=False)[PRE[:-1]]
    assert layer.routed_experts.w13_weight.dtype == torch.float8_e4m3fn
    _write(tmp_path / "ntc", _qwen3(FP8, modules_to_not_convert=["lm_head", "model.layers.0.mlp.experts"]), t)
    layer = load_moe_layers(tmp_path / "ntc", progress=False)[PRE[:-1]]
    assert layer.routed_experts.quant is None
    assert torch.equal(layer.routed_experts.w2_weight[1], t[PRE + "experts.1.down_proj.weight"].float())


# --- 2. modules_to_not_convert naming some of a block's experts ------------------------------------------------------
@pytest.mark.parametrize("ignored", [3, 0])
def test_some_experts_excluded_is_refused_naming_them(ignored, tmp_path):
    # edge: one expert (bf16 on disk) listed in modules_to_not_convert. experts.3: it was re-quantised to e4m3 silently;
    # experts.0: the whole layer was built full precision, then expert 1's scale blamed. Decided from every expert now:
    # NotImplementedError naming the block and the excluded expert
    t = _fp8_tensors(float_experts=(ignored,))
    _write(tmp_path, _qwen3(FP8, modules_to_not_convert=["lm_head", f"model.layers.0.mlp.experts.{ignored}"]), t)
    with pytest.raises(NotImplementedError, match=rf"model\.layers\.0\.mlp: .*routed experts {ignored} \(1 of {E}\)"):
        load_moe_layers(tmp_path, progress=False)


def test_compressed_tensors_ignore_of_some_experts_is_refused(tmp_path):
    # edge: the same through compressed-tensors' `ignore` regex, two experts of four
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "ignore": ["lm_head", "re:.*mlp.gate$", r"re:.*experts\.[12]\..*"],
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                    "strategy": "channel", "dynamic": False},
                                        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                              "strategy": "token", "dynamic": True}}}}
    t = _fp8_tensors(float_experts=(1, 2))
    for k in [k for k in t if k.endswith("weight_scale_inv")]:  # per-channel weight_scale [N, 1], as shipped
        t[k[: -len("_inv")]] = torch.full((t[k[: -len("_scale_inv")]].shape[0], 1), 0.01)
        del t[k]
    _write(tmp_path, _qwen3(ct), t)
    with pytest.raises(NotImplementedError, match=r"routed experts 1, 2 \(2 of 4\)"):
        load_moe_layers(tmp_path, progress=False)


def test_every_expert_excluded_one_by_one_loads_full_precision(tmp_path):
    # edge (guard): every expert listed by its own name: the block is full precision, as with the block's name
    t = _fp8_tensors(float_experts=range(E))
    ntc = ["lm_head"] + [f"model.layers.0.mlp.experts.{e}" for e in range(E)]
    _write(tmp_path, _qwen3(FP8, modules_to_not_convert=ntc), t)
    layer = load_moe_layers(tmp_path, progress=False)[PRE[:-1]]
    assert layer.routed_experts.quant is None


# --- 3. gpt-oss _blocks of the wrong rank ----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_mxfp4_blocks_of_the_wrong_rank_name_key_and_shapes(which, tmp_path):
    # edge: `_blocks` stored [E, N, K/2] (3-D) instead of [E, N, K/32, 16]: a raw IndexError from layout.deinterleave
    # (gate_up) before; now ValueError naming the key, its shape and the expected shape
    cfg = dict(model_type="gpt_oss", hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
               num_hidden_layers=1, dtype="bfloat16", quantization_config={"quant_method": "mxfp4"})
    g = torch.Generator().manual_seed(0)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
    rows, k = (2 * I, H) if which == "gate_up_proj" else (H, I)
    t = {PRE + "router.weight": torch.randn(E, H).bfloat16(), PRE + "router.bias": torch.zeros(E).bfloat16(),
         PRE + "experts.gate_up_proj_blocks": u8(E, 2 * I, H // 32, 16),
         PRE + "experts.gate_up_proj_scales": torch.full((E, 2 * I, H // 32), 120, dtype=torch.uint8),
         PRE + "experts.gate_up_proj_bias": torch.zeros(E, 2 * I).bfloat16(),
         PRE + "experts.down_proj_blocks": u8(E, H, I // 32, 16),
         PRE + "experts.down_proj_scales": torch.full((E, H, I // 32), 120, dtype=torch.uint8),
         PRE + "experts.down_proj_bias": torch.zeros(E, H).bfloat16()}
    t[PRE + f"experts.{which}_blocks"] = u8(E, rows, k // 2)
    _write(tmp_path, cfg, t)
    with pytest.raises(ValueError, match=rf"experts\.{which}_blocks' has shape \[{E}, {rows}, {k // 2}\], "
                                         rf"expected \[{E}, {rows}, {k // 32}, 16\]"):
        load_moe_layers(tmp_path, progress=False)


# --- 4. the largest e4m3 codes load as they are ------------------------------------------------------------------
def test_shipped_fp8_checkpoint_without_nan_still_loads(tmp_path):
    # edge (guard): the largest finite e4m3 codes (0x7E = 448, 0xFE = -448) are not NaN; the layer equals its scales
    t = _fp8_tensors()
    key = PRE + "experts.1.up_proj.weight"
    u = t[key].view(torch.uint8).clone()
    u[0, 0], u[0, 1] = 0x7E, 0xFE
    t[key] = u.view(torch.float8_e4m3fn)
    _write(tmp_path, _qwen3(FP8), t)
    layer = load_moe_layers(tmp_path, progress=False)[PRE[:-1]]
    assert torch.equal(layer.routed_experts.w13_weight[1, I:].view(torch.uint8), u)
    assert bool(layer(torch.randn(4, H)).isfinite().all())
