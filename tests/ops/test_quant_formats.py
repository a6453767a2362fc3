"""Format objects, parse_quant_config on real checkpoint configs, and the element rules (SPEC §8).

Known bit patterns (e2m1 codes and ties, int4 nibbles, all-zero blocks), round trips and the
per-shard block grid of w13, shapes / bytes / validate, and NotImplementedError naming the option.
"""

import math

import pytest
import torch

from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format
from moekit.ops.quant_config import parse_quant_config
from moekit.ops.quantize import (
    dequantize_experts,
    fp8_block_quantize,
    fp8_rowwise_quantize,
    int4_group_dequantize,
    int4_group_quantize,
    mxfp4_dequantize,
    mxfp4_quantize,
    quantize_experts,
)

# ---- real quantization_config dicts, as the checkpoints' config.json hold them
# deepseek-ai/DeepSeek-V3 (and R1, Kimi-K2) config.json
DEEPSEEK_V3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# deepseek-ai/DeepSeek-V3.1 / V3.2 / V4 config.json: power-of-two scales
DEEPSEEK_V31 = {**DEEPSEEK_V3, "scale_fmt": "ue8m0"}
# Qwen/Qwen3-30B-A3B-FP8 (Qwen3 / Qwen3.5 FP8 repos): block fp8 with the routers left in bf16 (list shortened)
QWEN3_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
             "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]}
# MiniMaxAI/MiniMax-M2 config.json (note its "fmt")
MINIMAX_M2 = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
              "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
# zai-org/GLM-4.5-FP8: compressed-tensors FP8_DYNAMIC (channel weights, dynamic per-token inputs), serialised
# with every QuantizationArgs field (compressed-tensors quant_args.py / quant_scheme.py FP8_DYNAMIC)
_CT_ARGS = {"actorder": None, "block_structure": None, "group_size": None, "observer": None, "observer_kwargs": {},
            "symmetric": True}
GLM45_FP8 = {
    "config_groups": {"group_0": {
        "input_activations": {**_CT_ARGS, "dynamic": True, "num_bits": 8, "strategy": "token", "type": "float"},
        "output_activations": None, "targets": ["Linear"],
        "weights": {**_CT_ARGS, "dynamic": False, "num_bits": 8, "observer": "minmax", "strategy": "channel",
                    "type": "float"}}},
    "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head", "model.layers.3.mlp.gate"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
    "sparsity_config": {}, "transform_config": {}, "version": "0.10.3",
}
# openai/gpt-oss-20b / 120b config.json
GPT_OSS = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                      "lm_head"], "quant_method": "mxfp4"}
# moonshotai/Kimi-K2-Thinking (and K2.5) config.json: W4A16 int4 groups of 32, pack-quantized
KIMI_K2_THINKING = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {**_CT_ARGS, "dynamic": False, "group_size": 32, "num_bits": 4, "observer": "minmax",
                    "strategy": "group", "type": "int"}}},
    "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                          "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}
# compressed-tensors presets (quant_scheme.py): FP8_BLOCK and MXFP4A16 (format "mxfp4-pack-quantized")
CT_FP8_BLOCK = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block", "symmetric": True,
                                       "dynamic": False, "block_structure": [128, 128]},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True,
                          "symmetric": True}}}, "ignore": ["lm_head"]}
CT_MXFP4 = {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                                       "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8"}}}}


@pytest.mark.parametrize("cfg, expected", [
    (DEEPSEEK_V3, Fp8BlockFormat(128, 128, False)),
    (DEEPSEEK_V31, Fp8BlockFormat(128, 128, True)),
    (QWEN3_FP8, Fp8BlockFormat(128, 128, ignore=tuple(QWEN3_FP8["modules_to_not_convert"]))),
    (MINIMAX_M2, Fp8BlockFormat(128, 128, ignore=("gate", "e_score_correction_bias", "lm_head"))),
    (GLM45_FP8, Fp8ChannelFormat(False, False, ignore=("lm_head", "model.layers.3.mlp.gate"))),
    (GPT_OSS, Mxfp4Format(ignore=tuple(GPT_OSS["modules_to_not_convert"]))),
    (KIMI_K2_THINKING, Int4GroupFormat(32, ignore=tuple(KIMI_K2_THINKING["ignore"]))),
    (CT_FP8_BLOCK, Fp8BlockFormat(128, 128, ignore=("lm_head",))),
    (CT_MXFP4, Mxfp4Format()),
])
def test_parse_real_configs(cfg, expected):
    assert parse_quant_config(cfg) == expected
    assert parse_quant_config(expected) is expected and parse_quant_config(None) is None


def test_parse_static_and_per_tensor_compressed_tensors():
    # compressed-tensors FP8 preset: per-tensor weights, static per-tensor inputs
    g = GLM45_FP8["config_groups"]["group_0"]
    cfg = {**GLM45_FP8, "config_groups": {"group_0": {**g, "weights": {**g["weights"], "strategy": "tensor"},
           "input_activations": {**g["input_activations"], "strategy": "tensor", "dynamic": False}}}}
    assert parse_quant_config(cfg) == Fp8ChannelFormat(True, True, ignore=tuple(GLM45_FP8["ignore"]))
    grp = {**KIMI_K2_THINKING["config_groups"]["group_0"]}
    grp["weights"] = {**grp["weights"], "group_size": 128}
    assert parse_quant_config({**KIMI_K2_THINKING, "config_groups": {"g": grp}}) == Int4GroupFormat(
        128, ignore=tuple(KIMI_K2_THINKING["ignore"]))


def _ct_weights(**kw):
    grp = KIMI_K2_THINKING["config_groups"]["group_0"]
    return {**KIMI_K2_THINKING, "config_groups": {"group_0": {**grp, "weights": {**grp["weights"], **kw}}}}


@pytest.mark.parametrize("cfg, option, value", [
    ({**DEEPSEEK_V3, "activation_scheme": "static"}, "activation_scheme", "static"),
    ({**DEEPSEEK_V3, "scale_fmt": "e4m3"}, "scale_fmt", "e4m3"),
    ({**DEEPSEEK_V3, "fmt": "e5m2"}, "fmt", "e5m2"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size", "None"),
    ({**DEEPSEEK_V3, "kv_scheme": 1}, "kv_scheme", "1"),
    ({"quant_method": "awq", "bits": 4}, "quant_method", "awq"),
    ({"quant_method": "gptq"}, "quant_method", "gptq"),
    (_ct_weights(symmetric=False), "weights.symmetric", "False"),
    (_ct_weights(num_bits=8), "weights", "8"),
    # int8 W8A8 ('int-quantized'): the 8-bit weights are named, not the activations (round 48's audit)
    ({**_ct_weights(num_bits=8, strategy="channel"), "format": "int-quantized", "config_groups": {"group_0": {
        **_ct_weights(num_bits=8)["config_groups"]["group_0"], "input_activations": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}}}}, "weights", "8"),
    (_ct_weights(actorder="group"), "weights.actorder", "group"),
    (_ct_weights(strategy="channel"), "weights.strategy", "channel"),
    ({**CT_MXFP4, "format": "nvfp4-pack-quantized"}, "weights", "nvfp4-pack-quantized"),
    ({**KIMI_K2_THINKING, "config_groups": {"a": KIMI_K2_THINKING["config_groups"]["group_0"],
                                            "b": KIMI_K2_THINKING["config_groups"]["group_0"]}}, "config_groups", "'a'"),
    ({**GLM45_FP8, "config_groups": {"group_0": {**GLM45_FP8["config_groups"]["group_0"], "input_activations": None}}},
     "input_activations", "None"),
    ({**CT_FP8_BLOCK, "config_groups": {"group_0": {**CT_FP8_BLOCK["config_groups"]["group_0"], "input_activations": {
        "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}, "input_activations", "token"),
])
def test_unsupported_options_name_option_and_value(cfg, option, value):
    with pytest.raises(NotImplementedError) as err:
        parse_quant_config(cfg)
    assert option in str(err.value) and value in str(err.value), str(err.value)


def test_parse_bad_types():
    with pytest.raises(TypeError, match="quant_config"):
        parse_quant_config("fp8")
    with pytest.raises(ValueError, match="weight_block_size"):
        parse_quant_config({**DEEPSEEK_V3, "weight_block_size": 128})
    with pytest.raises(ValueError, match="block_n"):
        Fp8BlockFormat(0, 128)


def test_module_matching():
    oss = parse_quant_config(GPT_OSS)
    assert oss.is_ignored("model.layers.3.self_attn.q_proj") and oss.is_ignored("lm_head")
    assert oss.is_ignored("model.layers.0.mlp.router") and not oss.applies_to("model.layers.0.mlp.router")
    assert not oss.is_ignored("model.layers.3.mlp.experts") and oss.applies_to("model.layers.3.mlp.experts")
    mm = parse_quant_config(MINIMAX_M2)  # "gate" is a whole component: the router, not the experts' w1
    assert mm.is_ignored("model.layers.2.block_sparse_moe.gate")
    assert not mm.is_ignored("model.layers.2.mlp.gate_proj")
    kimi = parse_quant_config(KIMI_K2_THINKING)  # re: patterns use re.match on the full name
    assert kimi.is_ignored("model.layers.5.mlp.shared_experts.down_proj")
    assert kimi.is_ignored("model.layers.0.mlp.gate_proj")  # the dense first layer
    assert not kimi.is_ignored("model.layers.5.mlp.experts.7.gate_proj")
    only = Int4GroupFormat(32, targets=("re:.*experts.*",))
    assert only.applies_to("model.layers.1.mlp.experts.0.up_proj") and not only.applies_to("model.layers.1.o_proj")


def test_shapes_bytes_and_validate():
    e, i, h = 3, 2048, 7168
    blk = Fp8BlockFormat(128, 128)
    assert blk.w13_scale_shape(e, 100, 300) == (e, 2, 3) and blk.w2_scale_shape(e, 100, 300) == (e, 3, 1)
    assert blk.w13_scale_shape(e, 100, 300, gated=False) == (e, 1, 3)
    assert blk.bytes_per_expert(i, h) == 3 * i * h + 4 * (2 * 16 * 56 + 56 * 16)
    blk.validate(e, 2880, 2880)  # partial blocks are fine (gpt-oss sizes)
    ch = Fp8ChannelFormat(per_tensor=True)
    assert ch.w13_scale_shape(e, i, h) == (e, 2) and ch.w2_scale_shape(e, i, h) == (e,)
    assert Fp8ChannelFormat().w13_scale_shape(e, i, h) == (e, 2 * i)
    mx = Mxfp4Format()
    assert mx.w13_shape(e, i, h) == (e, 2 * i, h // 2) and mx.w2_scale_shape(e, i, h) == (e, h, i // 32)
    assert mx.bytes_per_expert(i, h) == 3 * i * h // 2 + 3 * i * h // 32
    i4 = Int4GroupFormat(32)
    assert i4.w2_shape(e, i, h) == (e, h, i // 8) and i4.weight_dtype == torch.int32
    assert i4.bytes_per_expert(i, h) == 3 * i * h // 2 + 4 * 3 * i * h // 32  # (scales held float32: round 63)
    for fmt, inter, hid, needle in ((mx, 48, 64, "multiple of 32"), (mx, 64, 2880 + 16, "multiple of 32"),
                                    (i4, 48, 64, "multiple of 32"), (Int4GroupFormat(4), 12, 16, "multiple of 8")):
        with pytest.raises(ValueError, match=needle):
            fmt.validate(2, inter, hid)
    with pytest.raises(ValueError, match="I must be"):
        blk.validate(2, 0, 64)


# ------------------------------------------------------------------ element rules: known bit patterns
def test_e2m1_codes_ties_and_saturation():
    vals = [0, .5, 1, 1.5, 2, 3, 4, 6, -6, -.5, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, 7, -7, -.25] + [0] * 12
    want = [0, 1, 2, 3, 4, 5, 6, 7, 15, 9, 0, 2, 2, 4, 4, 6, 6, 7, 15, 0] + [0] * 12  # amax 7 -> X = 2^0
    codes, scale = mxfp4_quantize(torch.tensor([vals]))
    assert scale.tolist() == [[127]]
    got = [(b >> (4 * (k % 2))) & 0xF for k, b in enumerate(codes[0].repeat_interleave(2).tolist())]
    assert got == want
    assert codes[0, 0].item() == 0 | (1 << 4) and codes[0, 1].item() == 2 | (3 << 4)  # low nibble = even k
    back = mxfp4_dequantize(codes, scale)[0, :10].tolist()
    assert back == [0, .5, 1, 1.5, 2, 3, 4, 6, -6, -.5]


def test_mxfp4_scale_exponent_and_zero_block():
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(-1, 1, 32) * 100  # amax 100: floor(log2 100) = 6 -> e8m0 6 - 2 + 127 = 131
    codes, scale = mxfp4_quantize(w)
    assert scale.tolist() == [[131, 127], [127, 127]] and codes[1].eq(0).all()
    tiny = torch.full((1, 32), 2.0 ** -140)  # below e8m0's range: the exponent clamps at code 0
    assert mxfp4_quantize(tiny)[1].item() == 0
    d = mxfp4_dequantize(*mxfp4_quantize(w))
    assert torch.equal(mxfp4_dequantize(*mxfp4_quantize(d)), d)  # idempotent: values already on the grid


def test_fp8_block_scale_rule_zero_block_and_partial_blocks():
    w = torch.randn(5, 40) * 3
    w[:4, 16:32] = 0  # one all-zero 4x16 block
    wq, s = fp8_block_quantize(w, 4, 16)
    assert s.shape == (2, 3) and s[0, 1].item() == 1.0 and wq[:4, 16:32].float().eq(0).all()
    amax = w[4:, 32:].abs().max()  # the partial corner block (1 row, 8 columns)
    assert s[1, 2].item() == pytest.approx(float(amax / 448), rel=1e-7)
    assert wq.float().abs().amax().item() == 448.0
    _, su = fp8_block_quantize(w, 4, 16, ue8m0=True)
    m, _ = torch.frexp(su)
    assert m.eq(0.5).all() and (su >= s).all() and (su < 2 * s).all()  # 2^ceil(log2(amax / 448))


def test_fp8_rowwise_and_per_tensor():
    w = torch.randn(6, 10)
    wq, s = fp8_rowwise_quantize(w)
    torch.testing.assert_close(s, w.abs().amax(1) / 448)
    assert torch.equal(wq, (w / s[:, None]).to(torch.float8_e4m3fn))
    _, st = fp8_rowwise_quantize(w, per_tensor=True)
    assert st.shape == () and st.item() == pytest.approx(w.abs().max().item() / 448)


def test_int4_compressed_tensors_rule_and_packing():
    w = torch.tensor([[-7.5, 7.5, 0.5, 1.5, 2.5, -0.5, 3.0, 0.0]])  # amax 7.5 -> scale 1
    packed, scale = int4_group_quantize(w, 8)
    q = [-8, 7, 0, 2, 2, 0, 3, 0]  # round half to even, clamp to [-8, 7]
    word = sum((v + 8) << (4 * j) for j, v in enumerate(q))
    assert scale.tolist() == [[1.0]] and packed.dtype == torch.int32
    assert packed.item() == (word - 2**32 if word >= 2**31 else word)
    assert int4_group_dequantize(packed, scale, 8)[0].tolist() == q
    z, zs = int4_group_quantize(torch.zeros(1, 8, dtype=torch.bfloat16), 8)
    assert zs.dtype == torch.bfloat16 and zs.item() == torch.finfo(torch.bfloat16).eps and z.item() == 0x88888888 - 2**32


@pytest.mark.parametrize("fmt, tol", [(Fp8BlockFormat(16, 16), 0.04), (Fp8BlockFormat(16, 16, True), 0.05),
                                      (Fp8ChannelFormat(), 0.04), (Fp8ChannelFormat(per_tensor=True), 0.05),
                                      (Mxfp4Format(), 0.2), (Int4GroupFormat(32), 0.15)])
@pytest.mark.parametrize("gated", [True, False])
def test_quantize_experts_round_trip(fmt, tol, gated):
    e, i, h = 3, 64, 96
    w13, w2 = torch.randn(e, 2 * i if gated else i, h), torch.randn(e, h, i)
    q = quantize_experts(w13, w2, fmt)
    for t, shape in zip(q, (fmt.w13_shape(e, i, h, gated), fmt.w2_shape(e, i, h, gated),
                            fmt.w13_scale_shape(e, i, h, gated), fmt.w2_scale_shape(e, i, h, gated))):
        assert tuple(t.shape) == shape
    assert q[0].dtype == fmt.weight_dtype
    d13, d2 = dequantize_experts(*q, fmt)
    for d, w in ((d13, w13), (d2, w2)):
        assert ((d - w).norm() / w.norm()).item() < tol


def test_w13_block_grid_is_per_shard():
    i, h = 20, 24  # I not a multiple of the block: each shard's grid has its own partial block
    gate, up = torch.randn(2, i, h) * 1e-3, torch.randn(2, i, h) * 50
    w13_q, _, s13, _ = quantize_experts(torch.cat([gate, up], 1), torch.randn(2, h, i), DEEPSEEK_V3 | {
        "weight_block_size": [16, 16]})
    for e in range(2):
        gq, gs = fp8_block_quantize(gate[e], 16, 16)
        uq, us = fp8_block_quantize(up[e], 16, 16)
        assert torch.equal(s13[e], torch.cat([gs, us])) and torch.equal(w13_q[e].float(), torch.cat([gq, uq]).float())
    assert s13.shape == (2, 2 * math.ceil(i / 16), math.ceil(h / 16))


def test_quantize_experts_errors():
    w13, w2 = torch.randn(2, 16, 64), torch.randn(2, 64, 8)
    with pytest.raises(ValueError, match="w13 must have shape"):
        quantize_experts(w13[:, :10], w2, DEEPSEEK_V3)
    bad = w13.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_experts(bad, w2, DEEPSEEK_V3)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_experts(w13, w2, GPT_OSS)  # I = 8
    with pytest.raises(NotImplementedError, match="quant_method"):
        quantize_experts(w13, w2, {"quant_method": "bitsandbytes"})


def test_fp8_scale_is_the_correctly_rounded_quotient():
    """S = amax / 448 is the IEEE quotient (what the kernels compute), not amax · fl(1/448): PyTorch's CUDA
    division by a Python scalar multiplies by the rounded reciprocal, which put the CUDA twin 1.6e-2 away
    from the CPU twin on an H200. Checked against float64 division rounded once to float32."""
    from moekit.ops._quant_rules import fp8_scale

    amax = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 100
    exact = (amax.double() / 448).float()
    assert torch.equal(fp8_scale(amax), exact)
    recip = amax * torch.tensor(1 / 448, dtype=torch.float32)
    assert not torch.equal(recip, exact)  # the two roundings really differ on some inputs
