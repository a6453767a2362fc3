"""Tiny quantised transformers models built on CPU, as transformers lays them out on a GPU (its quantisers dequantise
on CPU): fp8 (FineGrainedFP8's ``FP8Linear`` / ``FP8Experts``) and mxfp4 (gpt-oss's ``Mxfp4GptOssExperts``).

- :func:`to_fp8`: transformers' own ``replace_with_fp8_linear`` swaps every linear (but ``keep``) and experts module
  of a float model, then each is filled with moekit's reference block quantisation of the float weights.
- :func:`ref_fp8_linear`: a float64 twin of the finegrained-fp8 kernel transformers calls (``fp8_linear``; the kernel
  comes from the hub and has no CPU build): activations quantised per token and group of ``block_k``
  (``s = max(amax, 1e-10) / 448``, ``x_q = e4m3(x / s)``), ``y = (x_q · s) (Wq · S)ᵀ``, rounded to the input dtype.
  Tests monkeypatch it in so that the unpatched fp8 model runs.
- :func:`mxfp4_gpt_oss`: a tiny gpt-oss twice: float experts holding the dequantised random mxfp4 weights
  (transformers' own ``convert_moe_packed_tensors``) and ``Mxfp4GptOssExperts`` holding the codes and scales.
"""

from __future__ import annotations

import copy
import types

import torch

import hf_tiny

FP8_KEEP = ("lm_head", "shared_expert_gate")  # what transformers' fp8 checkpoints leave out (Qwen3-Next: the gate)


def ref_fp8_linear(input, weight, weight_scale_inv, block_size=None, bias=None, activation_scale=None,
                   allow_deepgemm=True):
    """x [..., K] @ dequant(weight [N, K] e4m3, weight_scale_inv [⌈N/bn⌉, ⌈K/bk⌉]).T -> [..., N] (module docs)."""
    assert activation_scale is None and block_size is not None
    k = input.shape[-1]
    bn, bk = block_size
    g = -(-k // bk)
    x = torch.nn.functional.pad(input.reshape(-1, k).float(), (0, g * bk - k)).view(-1, g, bk)
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / torch.tensor(448.0)
    xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    xd = (xq.double() * s.double()).view(-1, g * bk)[:, :k]
    n = weight.shape[0]
    sw = weight_scale_inv.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    out = xd @ (weight.double() * sw).T
    if bias is not None:
        out = out + bias.double()
    return out.to(input.dtype).reshape(*input.shape[:-1], n)


def to_fp8(model, block=(16, 16), keep=FP8_KEEP):
    """``model`` (float) with its linears and experts in transformers' FineGrainedFP8 modules, fp8 e4m3 weights with
    float32 ``weight_scale_inv`` per ``block`` (the gate/up stack: a grid per half) and the matching
    ``config.quantization_config``."""
    import transformers
    from transformers.integrations import finegrained_fp8 as fp8_mod

    from moekit.ops._quant_rules import fp8_block_quantize

    cfg = transformers.FineGrainedFP8Config(weight_block_size=list(block), modules_to_not_convert=list(keep))
    floats = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp8_mod.replace_with_fp8_linear(model, modules_to_not_convert=list(keep), quantization_config=cfg)

    def put(module, name, t):
        setattr(module, name, torch.nn.Parameter(t, requires_grad=False))

    for name, m in model.named_modules():
        if isinstance(m, fp8_mod.FP8Linear):
            q, s = fp8_block_quantize(floats[f"{name}.weight"], *block)
            put(m, "weight", q)
            put(m, "weight_scale_inv", s)
        elif isinstance(m, fp8_mod.FP8Experts):
            w13 = floats[f"{name}.gate_up_proj"]
            halves = [fp8_block_quantize(h, *block) for h in w13.chunk(2, dim=1)]
            put(m, "gate_up_proj", torch.cat([q for q, _ in halves], 1))
            put(m, "gate_up_proj_scale_inv", torch.cat([s for _, s in halves], 1))
            q, s = fp8_block_quantize(floats[f"{name}.down_proj"], *block)
            put(m, "down_proj", q)
            put(m, "down_proj_scale_inv", s)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # the config object itself, as from_pretrained leaves it (round 51's review: its to_dict() carries an enum
    # quant_method, dequantize, modules_to_convert and scale_fmt "float", which patch() refused as unknown keys)
    model.config.quantization_config = cfg
    return model


def fp8_model(model_type: str, dtype=torch.float32, block=(16, 16), keep=FP8_KEEP, **overrides):
    """A tiny random ``model_type`` (:func:`hf_tiny.build`) in ``dtype``, the modules transformers keeps in float32
    on load (``_keep_in_fp32_modules_strict``: DeepSeek-V3's router ``gate.weight`` and selection bias) back in
    float32, then :func:`to_fp8`."""
    model = hf_tiny.build(model_type, **overrides).to(dtype)
    keep32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, p in model.named_parameters():
        if any(name == k or name.endswith("." + k) for k in keep32):
            p.data = p.data.float()
    return to_fp8(model, block, keep)


def mxfp4_gpt_oss(seed: int = 5, blocks_4d: bool = False, dtype=torch.float32):
    """(reference, mxfp4 model): a tiny gpt-oss (H = 64, I = 32: mxfp4 needs multiples of 32) with random mxfp4
    experts (codes uniform over the bytes, e8m0 scales 2^-5 .. 2^1). The reference's ``GptOssExperts`` hold them
    dequantised by transformers (``[E, H, 2I]``, gate/up interleaved); the other's blocks are transformers'
    ``Mxfp4GptOssMLP(router, Mxfp4GptOssExperts)`` (5.17: ``GptOssMLP`` holding them) in the plain layout:
    ``gate_up_proj`` uint8 in the shape the installed transformers declares (``[E, 2I, H/2]``; 5.17:
    ``[E, 2I, H/32, 16]``) (``blocks_4d``: ``gate_up_proj_blocks [E, 2I, H/32, 16]`` as the checkpoint names them) with
    ``gate_up_proj_scales [E, 2I, H/32]`` e8m0 bytes, rows interleaved; down likewise; float32 biases."""
    from transformers.integrations import mxfp4 as mx

    ref = hf_tiny.build("gpt_oss", hidden_size=64, intermediate_size=32).to(dtype)
    model = copy.deepcopy(ref)
    cfg = ref.config
    e, inter, hidden = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    for layer_ref, layer in zip(ref.model.layers, model.model.layers, strict=True):
        parts = {}
        for proj, n, k in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(122, 129, (e, n, k // 32), generator=g, dtype=torch.uint8)
            parts[proj] = blocks, scales
            with torch.no_grad():
                getattr(layer_ref.mlp.experts, proj).copy_(mx.convert_moe_packed_tensors(blocks, scales, dtype=dtype))
        ex = mx.Mxfp4GptOssExperts(cfg)
        for proj, (blocks, scales) in parts.items():
            if blocks_4d:
                del ex._parameters[proj]
                ex.register_parameter(f"{proj}_blocks", torch.nn.Parameter(blocks, requires_grad=False))
            else:
                getattr(ex, proj).data = blocks.reshape(getattr(ex, proj).shape)  # (5.25: flattened; 5.17: 4-D)
            ex.register_parameter(f"{proj}_scales", torch.nn.Parameter(scales, requires_grad=False))
            with torch.no_grad():
                getattr(ex, f"{proj}_bias").copy_(getattr(layer_ref.mlp.experts, f"{proj}_bias"))
        if hasattr(mx, "Mxfp4GptOssMLP"):
            layer.mlp = mx.Mxfp4GptOssMLP(layer.mlp.router, ex)
        else:  # (transformers 5.17: replace_with_mxfp4_linear keeps GptOssMLP, its experts and forward replaced)
            layer.mlp.experts = ex
            layer.mlp.forward = types.MethodType(mx.mlp_forward, layer.mlp)
    model.config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return ref, model
