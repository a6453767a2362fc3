"""The ``baseline`` rows of ``moekit bench``: a plain PyTorch MoE on a ``moekit.FusedMoE``'s weights.

torch routing (the layer's semantics: softmax / sigmoid, selection bias, grouped top-k, renormalise,
scale, zero experts), ``torch._grouped_mm`` over expert-sorted rows, the torch activation, a weighted
sum over slots. Unquantised weights only.
"""

from __future__ import annotations

import torch

from .shapes import ModelShape


def baseline_forward(layer, m: ModelShape, x, logits):
    """Plain PyTorch MoE on the layer's weights: torch routing, ``torch._grouped_mm`` experts.

    x: [T, H] dtype; logits: [T, E + Z] float32; returns [T, H] dtype (what ``layer(x, logits)`` computes).
    """
    re = layer.routed_experts
    e, k, z = m.E, m.K, m.Z
    lf = logits.float()
    s = torch.sigmoid(lf) if m.scoring == "sigmoid" else torch.softmax(lf, dim=-1)
    bias = getattr(layer.router, "e_score_correction_bias", None)
    sel = s + bias if bias is not None else s
    if m.groups > 1:
        g = sel.view(x.shape[0], m.groups, -1)
        gs = g.topk(2, dim=-1).values.sum(-1) if bias is not None else g.amax(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(m.topk_group, dim=-1).indices, 1.0)
        sel = sel.masked_fill(keep.repeat_interleave(g.shape[-1], 1) == 0, float("-inf"))
    ids = sel.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    if m.renorm:
        w = w / w.sum(-1, keepdim=True)
    w = w * m.scale
    zero = None
    if z:  # zero slots: key E, sorted last, past the last group's offset (round 63: they went through expert 0's
        # GEMMs, ~1.5x the rows of LongCat's real slots, work moekit's align step drops)
        is_zero = ids >= e
        zero = x.float() * torch.where(is_zero, w, 0.0).sum(-1, keepdim=True)
        w = w.masked_fill(is_zero, 0.0)
        ids = ids.masked_fill(is_zero, e)
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))[:e]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (the grouped GEMMs leave the rows past offs[-1] unwritten)
    xs = x[order // k]
    expert = flat[order].clamp(max=e - 1)
    h = torch._grouped_mm(xs, re.w13_weight.transpose(1, 2), offs=offs)
    if re.w13_bias is not None:
        h = h + re.w13_bias[expert]
    from ..ops.activation import apply_activation_torch

    a = apply_activation_torch(h, m.act, layer.moe_config.swiglu_limit).to(x.dtype)
    o = torch._grouped_mm(a, re.w2_weight.transpose(1, 2), offs=offs)
    if re.w2_bias is not None:
        o = o + re.w2_bias[expert]
    live = (flat[order] < e).unsqueeze(1)  # (a zero slot's row holds whatever the GEMM left: not multiplied by 0)
    slot_out = torch.empty(flat.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    slot_out[order] = torch.where(live, o.float() * w.reshape(-1)[order, None], 0.0)
    out = slot_out.view(x.shape[0], k, -1).sum(1)
    if zero is not None:
        out = out + zero
    return out.to(x.dtype)
