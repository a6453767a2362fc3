"""DeepSeek-V4 checkpoints as they ship (DeepSeek's own key names, ``.scale`` tensors in e8m0).

config.json: ``quantization_config {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}``
with ``"expert_dtype": "fp4"`` at the top level (V4-Flash) or inside the dict (V4.1, and what transformers'
``DeepseekV4Config`` folds it into). Routed experts: ``experts.{e}.w{1,2,3}.weight`` int8 ``[N, K/2]`` (two e2m1 codes
a byte) + ``.scale`` e8m0 ``[N, K/32]``, i.e. mxfp4 (SPEC §8); shared experts (transformers' ``nn.Linear`` ->
``FP8Linear``): e4m3 ``[N, K]`` + ``.scale`` e8m0 ``[⌈N/128⌉, ⌈K/128⌉]``, fp8 block. Without ``expert_dtype`` the
experts are fp8 block too, with the same e8m0 ``.scale`` (the per-shard value check crashed on them).
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit import load_moe_layers
from moekit.loading.inspect import rows
from moekit.loading.quant import checkpoint_formats, quantization_dict
from moekit.loading.quant_shared import QuantSharedMLP
from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.quant_config import parse_hf_formats
from moekit.ops.quantize import dequantize_weight, quantize_weight

H, I, E, K, V, T, LIMIT = 256, 128, 8, 2, 50, 9, 10.0
E8 = torch.float8_e8m0fnu
QCFG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128]}  # DeepSeek-V4-Flash's config.json
FP4, FP8 = moekit.Mxfp4Format(), moekit.Fp8BlockFormat(128, 128, True)
FORMS = ("fp4_top_level", "fp4_in_quant_config", "fp8_experts")


def _config(form):
    cfg = dict(model_type="deepseek_v4", hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
               num_experts_per_tok=K, num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"], vocab_size=V,
               swiglu_limit=LIMIT, dtype="bfloat16", quantization_config=dict(QCFG))
    if form == "fp4_top_level":
        cfg["expert_dtype"] = "fp4"
    elif form == "fp4_in_quant_config":
        cfg["quantization_config"]["expert_dtype"] = "fp4"
    return cfg


def _checkpoint(path, form, seed=0):
    """Writes the checkpoint; returns (tensors, routed format, (q13, q2, s13, s2) as the layer stores them)."""
    g = torch.Generator().manual_seed(seed)
    fmt = FP8 if form == "fp8_experts" else FP4
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5, torch.randn(E, H, I, generator=g) * I**-0.5
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, fmt)
    n13 = s13.shape[1] // 2
    # DeepSeek writes fp4 codes as I8 (layer 0); its own dtype float4_e2m1fn_x2 is the same bytes (layer 1)
    on_disk = (lambda w, li: w.view((torch.int8, torch.float4_e2m1fn_x2)[li])) if fmt is FP4 else (lambda w, li: w)
    e8 = (lambda s: s.view(E8)) if fmt is FP4 else (lambda s: s.to(E8))  # fp8 ue8m0 scales: powers of two, exact
    t = {}
    for li, kind in enumerate(["hash_moe", "moe"]):
        p = f"layers.{li}.ffn."
        t[f"layers.{li}.attn.wq_a.weight"] = torch.randn(H, H, generator=g).bfloat16()  # not MoE: ignored
        t[p + "gate.weight"] = torch.randn(E, H, generator=g).bfloat16()
        if kind == "hash_moe":
            t[p + "gate.tid2eid"] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]).int()
        else:
            t[p + "gate.bias"] = torch.rand(E, generator=g)
        for e in range(E):
            for n, w, s in (("w1", q13[e, :I], s13[e, :n13]), ("w3", q13[e, I:], s13[e, n13:]), ("w2", q2[e], s2[e])):
                t[p + f"experts.{e}.{n}.weight"], t[p + f"experts.{e}.{n}.scale"] = on_disk(w, li), e8(s)
        for n, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            wq, s = quantize_weight(torch.randn(*shape, generator=g) * 0.05, FP8)
            t[p + f"shared_experts.{n}.weight"], t[p + f"shared_experts.{n}.scale"] = wq, s.to(E8)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_config(form), f)
    save_file({k: v.clone().contiguous() for k, v in t.items()}, os.path.join(path, "model.safetensors"))
    stored = (q13, q2, s13, s2) if fmt is FP4 else (q13, q2, s13.to(E8).float(), s2.to(E8).float())
    return t, fmt, stored


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randint(0, V, (T,), generator=g)


@pytest.mark.parametrize("form", FORMS)
def test_deepseek_v4_checkpoint_loads_as_shipped(form, tmp_path):
    # both shipped config forms (expert_dtype at the top level: TypeError "weight must have dtype
    # torch.float8_e4m3fn, got torch.int8" before; inside quantization_config: NotImplementedError "unknown key")
    # load the routed experts as mxfp4 and the shared experts as fp8 block with e8m0 scales; fp8 experts with e8m0
    # ``.scale`` crashed in the per-shard value check ("ge_cpu" not implemented for 'Float8_e8m0fnu')
    t, fmt, (q13, q2, s13, s2) = _checkpoint(tmp_path, form)
    layers = load_moe_layers(tmp_path, dtype=torch.float32)
    assert list(layers) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    x, ids = _inputs()
    for li, layer in enumerate(layers.values()):
        re, shared = layer.routed_experts, layer.shared_experts
        assert re.quant == fmt and torch.equal(re.w13_scale, s13) and torch.equal(re.w2_scale, s2)
        assert torch.equal(re.w13_weight.view(torch.uint8), q13.view(torch.uint8))
        assert isinstance(shared, QuantSharedMLP) and shared.fmt == FP8
        p = f"layers.{li}.ffn.shared_experts."
        assert torch.equal(shared.w2_scale[0], t[p + "w2.scale"].float())
        hashed = ids if li == 0 else None
        w, sel = layer.router.select_experts(x, layer.gate(x), input_ids=hashed)
        routed = fused_experts_quant_torch(x, q13, q2, w, sel, fmt=fmt, w13_scale=s13, w2_scale=s2,
                                           swiglu_limit=LIMIT)
        assert torch.equal(re(x, w, sel), routed)
        one = torch.ones(T, 1), torch.zeros(T, 1, dtype=torch.int32)
        sw13 = torch.cat([t[p + "w1.weight"], t[p + "w3.weight"]])[None]
        ss13 = torch.cat([t[p + "w1.scale"], t[p + "w3.scale"]]).float()[None]
        shared_twin = fused_experts_quant_torch(x, sw13, t[p + "w2.weight"][None], *one, fmt=FP8, w13_scale=ss13,
                                                w2_scale=t[p + "w2.scale"].float()[None], swiglu_limit=LIMIT)
        assert torch.equal(shared(x), shared_twin)
        torch.testing.assert_close(layer(x, input_ids=hashed), routed + shared_twin, rtol=1e-6, atol=1e-6)
    arch, table = rows(_config(form))  # moekit inspect: the experts' and the shared experts' formats
    assert arch == "DeepSeek-V4" and [r["quant"] for r in table] == [fmt.name] * 2
    assert table[0]["shared"] == f"1 x {I} fp8_block" and table[0]["_bytes"] == fmt.bytes_per_expert(I, H)


def test_layer_matches_transformers_deepseek_v4_block(tmp_path):
    # transformers' DeepSeek-V4 MoE block on the weights its own loader dequantises from the same files: the same
    # experts and weights chosen, the routed output equal; the shared expert runs fp8 activations in moekit (w8a8,
    # as FP8Linear on a GPU), so it is within fp8 rounding of the dequantised MLP (tests/test_quant_layer.py: 6e-2)
    pytest.importorskip("transformers")
    from transformers import DeepseekV4Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    deq = Fp8Dequantize(None)._dequantize_one
    # the format mapping itself: transformers' dequantisation (expert_dtype "fp4": low nibble first, e2m1 table, one
    # e8m0 scale per [1, 32] block; fp8: one per [128, 128] block) and moekit's agree bit for bit on every byte value
    g = torch.Generator().manual_seed(4)
    codes = torch.arange(256, dtype=torch.uint8).repeat(4, 2)[:, torch.randperm(512, generator=g)]  # K = 1024
    scales = torch.randint(110, 140, (4, 32), dtype=torch.uint8, generator=g)
    fp4 = dequantize_weight(codes, scales, FP4)
    assert torch.equal(deq(codes.view(torch.int8), scales.view(E8), torch.float32), fp4)
    wq, s = quantize_weight(torch.randn(256, 384, generator=g), FP8)
    assert torch.equal(deq(wq, s.to(E8), torch.float32), dequantize_weight(wq, s, FP8))

    t, _, _ = _checkpoint(tmp_path, "fp4_top_level", seed=2)
    cfg = {k: v for k, v in _config("fp4_top_level").items() if k not in ("model_type", "dtype", "quantization_config")}
    layers = load_moe_layers(tmp_path, dtype=torch.float32)
    x, ids = _inputs(3)
    for li, layer in enumerate(layers.values()):
        p = f"layers.{li}.ffn."

        def w(name):
            return deq(t[p + name + ".weight"], t[p + name + ".scale"], torch.float32)

        block = DeepseekV4SparseMoeBlock(DeepseekV4Config(**cfg), li)
        with torch.no_grad():
            block.gate.weight.copy_(t[p + "gate.weight"].float())
            if li == 0:
                block.gate.tid2eid.copy_(t[p + "gate.tid2eid"])
            else:
                block.gate.e_score_correction_bias.copy_(t[p + "gate.bias"])
            block.experts.gate_up_proj.copy_(torch.stack([torch.cat([w(f"experts.{e}.w1"), w(f"experts.{e}.w3")])
                                                          for e in range(E)]))
            block.experts.down_proj.copy_(torch.stack([w(f"experts.{e}.w2") for e in range(E)]))
            for n, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                getattr(block.shared_experts, proj).weight.copy_(w(f"shared_experts.{n}"))
            _, tw, tids = block.gate(x[None], ids[None]) if li == 0 else block.gate(x[None])
            mw, mids = layer.router.select_experts(x, layer.gate(x), input_ids=ids if li == 0 else None)
            order, morder = tids.argsort(1), mids.long().argsort(1)
            assert torch.equal(tids.gather(1, order), mids.long().gather(1, morder))
            torch.testing.assert_close(mw.gather(1, morder), tw.gather(1, order), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.routed_experts(x, mw, mids), block.experts(x, tids, tw),
                                       rtol=1e-5, atol=1e-5)
            want, got = block.shared_experts(x), layer.shared_experts(x)
            assert ((got - want).norm() / want.norm()).item() < 6e-2


def test_quantization_config_forms():
    # the dict forms DeepSeek-V4 ships and transformers accepts; what is refused names the option and the value
    both = parse_hf_formats(dict(QCFG, expert_dtype="fp4"))
    assert both == (FP4, FP8) and moekit.parse_quant_config(dict(QCFG, expert_dtype="fp4")) == FP4
    assert parse_hf_formats(dict(QCFG, expert_dtype="fp8")) == (FP8, FP8) == parse_hf_formats(QCFG)
    v4 = _config("fp4_top_level")
    assert quantization_dict(v4)["expert_dtype"] == "fp4" and "expert_dtype" not in v4["quantization_config"]
    inner = dict(v4, quantization_config=dict(QCFG, expert_dtype="fp8"))  # the dict's own wins, as in transformers
    assert checkpoint_formats(inner, None) == (FP8, FP8, True)
    v3 = dict(v4, model_type="deepseek_v3")  # DeepseekV3Config never reads a top-level expert_dtype
    assert checkpoint_formats(v3, None)[0] == FP8
    with pytest.raises(NotImplementedError, match="expert_dtype='nvfp4'"):
        parse_hf_formats(dict(QCFG, expert_dtype="nvfp4"))
    with pytest.raises(NotImplementedError, match="scale_fmt=None.*must be 'ue8m0'"):
        parse_hf_formats({k: v for k, v in dict(QCFG, expert_dtype="fp4").items() if k != "scale_fmt"})
