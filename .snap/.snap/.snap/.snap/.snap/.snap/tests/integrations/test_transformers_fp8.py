"""patch(model) on a transformers model whose experts are fp8 (FineGrainedFP8's ``FP8Experts``, the
class transformers puts in place of the experts when it loads an fp8 checkpoint on a GPU).

On CPU transformers' fp8 loader dequantises (its quantizer needs a GPU), so the model is built here by
hand: a tiny Qwen3-MoE whose experts are replaced by transformers' own ``FP8Experts`` filled with
``moekit.quantize_experts`` of the original weights. patch must keep those fp8 tensors (same storage,
no dequantised copy) and compute the twin of the fp8 math."""

import os
import sys

import pytest
import torch

import moekit
from moekit.integrations.transformers import patch
from moekit.ops.experts_quant import fused_experts_quant_torch

transformers = pytest.importorskip("transformers")
fp8_mod = pytest.importorskip("transformers.integrations.finegrained_fp8")

sys.path.insert(0, os.path.dirname(__file__))
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}


def _model(block=(16, 16), **over):
    from hf_tiny import COMMON, TINY

    from moekit.ops._quant_rules import fp8_block_quantize

    cfg_name, model_name, kw = TINY["qwen3_moe"]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**COMMON, **dict(kw, **over))).eval()
    fp8 = dict(FP8, weight_block_size=list(block))
    fmt = moekit.parse_quant_config(fp8)
    for layer in model.model.layers:
        old = getattr(layer.mlp, "experts", None)
        if old is None:
            continue
        ex = fp8_mod.FP8Experts(model.config, block_size=block)
        q13, q2, s13, s2 = moekit.quantize_experts(old.gate_up_proj.detach(), old.down_proj.detach(), fmt)
        if old.gate_up_proj.shape[1] // 2 % block[0]:  # transformers' one grid over the fused 2I rows
            q13, s13 = fp8_block_quantize(old.gate_up_proj.detach(), *block)
        with torch.no_grad():
            for name, t in (("gate_up_proj", q13), ("down_proj", q2), ("gate_up_proj_scale_inv", s13),
                            ("down_proj_scale_inv", s2)):
                getattr(ex, name).data = t
        layer.mlp.experts = ex
    model.config.quantization_config = fp8
    return model, fmt


def test_patch_refuses_a_fused_grid_that_straddles_gate_and_up():
    # I = 24, 32-row blocks: transformers' grid over the fused 48 rows has 2 rows, as many as moekit's per-shard
    # grids (2 · ⌈24/32⌉), but its first block holds gate rows 0..23 and up rows 0..7. The equal shapes passed the
    # check (the up rows 0..7 then ran on the gate's scale); round 48 refuses any I % bn != 0
    model, _ = _model(block=(32, 16), moe_intermediate_size=24)
    with pytest.raises(NotImplementedError, match="one grid over both halves"):
        patch(model, backend="torch")


def test_patch_keeps_the_fp8_experts():
    model, fmt = _model()
    blocks = {n: m for n, m in model.named_modules() if n.endswith("mlp") and hasattr(m, "experts")}
    names = patch(model, backend="torch")
    assert names == list(blocks)
    for name in names:
        ex, moe = blocks[name].experts, model.get_submodule(name).moe
        re = moe.routed_experts
        assert re.quant == fmt and re.w13_weight.dtype == torch.float8_e4m3fn
        for mine, theirs in (("w13_weight", "gate_up_proj"), ("w2_weight", "down_proj"),
                             ("w13_scale", "gate_up_proj_scale_inv"), ("w2_scale", "down_proj_scale_inv")):
            assert getattr(re, mine).data_ptr() == getattr(ex, theirs).data_ptr(), mine  # shared, no copy
        x = torch.randn(7, 32)
        w, ids = moe.router.select_experts(x, moe.gate(x))
        want = fused_experts_quant_torch(x, ex.gate_up_proj, ex.down_proj, w, ids, fmt=fmt,
                                         w13_scale=ex.gate_up_proj_scale_inv, w2_scale=ex.down_proj_scale_inv)
        assert torch.equal(re(x, w, ids), want)
    ids = torch.randint(0, 96, (1, 6))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # model.to(bf16) (round 48: the quantised layers kept params_dtype float32 and every forward raised): the fp8
    # tensors stay (same storage), the activations follow; the logits stay within bf16 + fp8 rounding of fp32's
    model.to(torch.bfloat16)
    for name in names:
        re = model.get_submodule(name).moe.routed_experts
        assert re.params_dtype == torch.bfloat16 and re.w13_weight.dtype == torch.float8_e4m3fn
        assert re.w13_weight.data_ptr() == blocks[name].experts.gate_up_proj.data_ptr()
    cast = model(ids).logits.float()
    assert ((cast - logits).norm() / logits.norm()).item() < 3e-2
