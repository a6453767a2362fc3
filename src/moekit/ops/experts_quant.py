"""Torch twin of the quantised routed experts (SPEC §8): the reference and the CPU path.

``out[t] = Σ_j w[t, j] · expert_{ids[t, j]}(x[t])`` as in :mod:`.experts`, with each expert's GEMMs
run in its format's math:

- fp8 (w8a8; ``fp8_block`` / ``fp8_channel``): ``x`` is quantised per (token, group of ``block_k``)
  (channel: per token; static: the largest ``w13_input_scale``), each GEMM is
  ``Σ_g s_x[t, g] · S[·, g] · (x_q,g · Wq,g)`` with fp32 accumulation — computed here as
  ``dequant(x_q) @ dequant(Wq)ᵀ`` in fp32, equal up to fp32 summation order — then
  bias, clamp and activation in fp32 → rounded to ``params_dtype`` (the dtype of ``hidden_states``) →
  quantised the same way (``w2_input_scale`` when static) → w2 GEMM → bias, routing weight and the top-k
  sum in fp32 → ``params_dtype``.
- weight-only (``mxfp4`` / ``int4_group``): the dequantised weight in ``params_dtype`` and exactly the
  bf16 twin's math (:func:`.experts.fused_experts_torch`): GEMMs in ``params_dtype`` with fp32
  accumulation, the w13 bias added in fp32, activation in fp32 rounded to ``params_dtype``, weighting and
  the top-k sum in fp32.

Memory stays bounded: tokens run in chunks (scratch under ``workspace_bytes``) and experts are
dequantised one at a time (kept across chunks only while all of them fit in half the workspace).
"""

from __future__ import annotations

import torch

from .._checks import check_int, check_tensor, host_sync_allowed
from ._eager import autocast_off, rounded
from ._quant_rules import dequantize_fp8_activations, quantize_fp8_activations
from .activation import apply_activation_torch
from .experts import (DEFAULT_WORKSPACE_BYTES, _repeats, check_expert_map_range, check_experts_inputs,
                      check_ids_in_range, chunk_tokens, compiled_chunks)
from .formats import Fp8BlockFormat, WeightFormat
from .quant_config import parse_quant_config
from .quantize import check_quant_weights, dequantize_weight

__all__ = ["check_quant_experts_inputs", "fused_experts_quant_torch"]


class _QuantExperts:
    """One call's experts: ``run(e, x [n, H]) -> [n, H]`` float32 (bias included, routing weight not)."""

    def __init__(self, fmt, w13, w2, w13_scale, w2_scale, in_scales, b1, b2, gated, p, swiglu_limit, dtype, cache):
        self.fmt, self.w13, self.w2, self.s13, self.s2 = fmt, w13, w2, w13_scale, w2_scale
        self.b1, self.b2, self.shards = b1, b2, 2 if gated else 1
        self.p, self.limit, self.dtype = p, swiglu_limit, dtype
        self.cache = {} if cache else None
        self.w8a8 = fmt.quantizes_activations
        # fp8 GEMMs run in fp32 (fp64 for an fp64 call); weight-only GEMMs in params_dtype, but fp16 ones in fp32
        # (round 49: fp16 products past 65504 overflowed where the kernels' fp32 accumulators do not)
        wide = self.w8a8 or dtype == torch.float16
        self.gemm_dtype = (torch.float64 if dtype == torch.float64 else torch.float32) if wide else dtype
        self.group = fmt.block_k if isinstance(fmt, Fp8BlockFormat) else None
        self.ue8m0 = isinstance(fmt, Fp8BlockFormat) and fmt.ue8m0
        self.in_scales = in_scales  # (s13, s2) python floats for static inputs, else (None, None)

    def weights(self, e: int):
        if self.cache is not None and e in self.cache:
            return self.cache[e]
        w1 = dequantize_weight(self.w13[e], self.s13[e], self.fmt, shards=self.shards, dtype=self.gemm_dtype)
        w2 = dequantize_weight(self.w2[e], self.s2[e], self.fmt, dtype=self.gemm_dtype)
        if not self.w8a8 and self.gemm_dtype != self.dtype:  # fp16 weight-only: the weight rounded to params_dtype
            # (SPEC §8, as the kernels' operand), the GEMM in fp32 (round 57: int4 group scales times q rounded in fp16
            # moved the twin 4e-4 from the kernels)
            w1, w2 = rounded(w1, self.dtype).to(self.gemm_dtype), rounded(w2, self.dtype).to(self.gemm_dtype)
        if self.cache is not None:
            self.cache[e] = (w1, w2)
        return w1, w2

    def _input(self, x: torch.Tensor, static_scale) -> torch.Tensor:
        """The GEMM operand made from ``x`` [n, K] (params_dtype): fp8 quantise + dequantise, or as is."""
        if not self.w8a8:
            return x
        xq, s = quantize_fp8_activations(x, self.group, ue8m0=self.ue8m0, static_scale=static_scale)
        return dequantize_fp8_activations(xq, s, self.group, dtype=self.gemm_dtype)

    def _bias(self, h: torch.Tensor, bias, e: int, acc: bool = False) -> torch.Tensor:
        """``h + bias``; ``acc``: in fp32 (float64: float64), for the w13 output the activation reads (round 64: a
        bf16 add rounded it twice; the kernels add the bias to their fp32 accumulator), else in ``h``'s dtype."""
        if bias is None:
            return h
        if not acc:
            return h + bias[e].to(h.dtype)
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        return h.to(dt) + bias[e].to(dt)

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.weights(e)
        h = self._bias(self._input(x, self.in_scales[0]).to(w1.dtype) @ w1.t(), self.b1, e, acc=True)
        a = rounded(apply_activation_torch(h, self.p.activation, self.limit), self.dtype)  # (kept under compile)
        o = self._bias(self._input(a, self.in_scales[1]).to(w2.dtype) @ w2.t(), self.b2, e)
        return o.float() if o.dtype != torch.float64 else o


def _stand_in(shape, like: torch.Tensor) -> torch.Tensor:
    """A zero-stride tensor of ``shape`` with ``like``'s dtype and device (no memory): it lets the bf16
    path's argument checks validate routing, biases and sizes against the dequantised weights' shape."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)


@autocast_off  # (the GEMMs in the format's dtypes under torch.autocast too: round 68)
def fused_experts_quant_torch(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    fmt,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    w13_input_scale: torch.Tensor | None = None,
    w2_input_scale: torch.Tensor | None = None,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    global_num_experts: int = -1,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> torch.Tensor:
    """Quantised routed experts, torch reference (module docstring for the math).

    hidden_states: [T, H] fp32/bf16/fp16 (fp64 allowed); fmt: a format object or HF quant dict;
    w13: [E_local, 2I|I, H/pack] ``fmt.weight_dtype``; w2: [E_local, H, I/pack];
    w13_scale / w2_scale: ``fmt.w13_scale_shape`` / ``fmt.w2_scale_shape`` (fp32/bf16; uint8 e8m0 for mxfp4);
    w13_input_scale / w2_input_scale: [E_local] float, static fp8 inputs only (the largest is used);
    topk_weights: [T, K] float; topk_ids: [T, K] int in [0, E); w1_bias: [E_local, 2I|I] and
    w2_bias: [E_local, H] in hidden_states' dtype; expert_map: [E] int32 (−1: held elsewhere).
    activation, apply_router_weight_on_input, swiglu_limit, global_num_experts: as in
    :func:`moekit.fused_experts`; workspace_bytes: the bound on one token chunk's scratch memory.
    returns: [T, H] dtype of hidden_states.
    """
    fmt = parse_quant_config(fmt)
    check_int("workspace_bytes", workspace_bytes, minimum=1)  # (round 68: 0 or None reached the chunk arithmetic)
    e, inter, hidden, gated, p = check_quant_experts_inputs(
        hidden_states, w13, w2, topk_weights, topk_ids, fmt=fmt, w13_scale=w13_scale, w2_scale=w2_scale,
        w13_input_scale=w13_input_scale, w2_input_scale=w2_input_scale, activation=activation,
        apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
        expert_map=expert_map, global_num_experts=global_num_experts, swiglu_limit=swiglu_limit,
    )
    check_ids_in_range(topk_ids, p.num_global, expert_map)
    check_expert_map_range(expert_map, e)
    local_map = expert_map.long() if expert_map is not None else None
    rows = 2 * inter if gated else inter
    out = torch.empty_like(hidden_states)
    if p.num_tokens == 0:
        return out
    # torch.compile or a CUDA graph capture: no host reads (unique, float); meta tensors: no values (round 64)
    compiling = not host_sync_allowed() or hidden_states.device.type == "meta"
    static = (None, None)
    if w13_input_scale is not None:  # static fp8 inputs: the largest scale over experts (SPEC §8)
        static = (w13_input_scale.max(), w2_input_scale.max())  # 0-d tensors: no host read (compile traces them)
        if not compiling:
            static = (float(static[0]), float(static[1]))
    per_expert = 4 * (rows * hidden + hidden * inter)  # dequantised fp32 weights of one expert
    experts = _QuantExperts(fmt, w13, w2, w13_scale, w2_scale, static, w1_bias, w2_bias, gated, p, swiglu_limit,
                            hidden_states.dtype, cache=e * per_expert <= workspace_bytes // 2)
    # per token: its K slot outputs [K, H] fp32 (kept for the top-k sum), and per row of ONE expert's call (the
    # experts run one at a time) the gathered input, the w13 output, the activation and its quantised copy, the
    # output; one expert's call holds a token at most ``repeats`` times (review of round 67: the rows were counted
    # K times, so chunks were 2.2-2.7x smaller than the workspace allows and each dequantised every expert again)
    slot_row = 4 * (2 * hidden + rows + 2 * inter)
    run = _token_chunk
    if compiling:  # the dense formulation (no data-dependent expert set); one chunk up to the bound: one guard
        run = _token_chunk_dense
        most = max(1, workspace_bytes // (4 * p.top_k * (2 * hidden + rows + 2 * inter) + 64 + slot_row))
        return compiled_chunks(lambda xc, wc, ic: run(xc, wc, ic, local_map, experts, apply_router_weight_on_input),
                               most, hidden_states, topk_weights, topk_ids)  # guards at powers of two, not on T
    repeats = _repeats(topk_ids)  # (T > 0 here)
    step = chunk_tokens(p.num_tokens, max(1, workspace_bytes // (4 * p.top_k * hidden + 16 * p.top_k + 64
                                                                  + repeats * slot_row)))
    for lo in range(0, p.num_tokens, step):
        hi = min(lo + step, p.num_tokens)
        out[lo:hi] = run(hidden_states[lo:hi], topk_weights[lo:hi], topk_ids[lo:hi], local_map, experts,
                         apply_router_weight_on_input)
    return out


def _token_chunk(x, topk_weights, topk_ids, local_map, experts: _QuantExperts, on_input: bool) -> torch.Tensor:
    """x: [Tc, H] -> [Tc, H]; slot outputs summed over K in slot order, in fp32."""
    ids = topk_ids.long()
    local = ids if local_map is None else local_map[ids]  # [Tc, K], -1: held elsewhere
    wts = topk_weights.float()
    keep = (local >= 0) & ((wts != 0) | on_input)  # a zero-weight slot adds exactly 0 (masked zero experts)
    acc = torch.zeros(*ids.shape, x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    # the live slots grouped by expert with one stable sort (round 65: a mask and a nonzero per expert grew with E,
    # costlier than the GEMMs at E = 512); within an expert, slots in flat (token, slot) order, as nonzero gave them
    n_local = experts.w13.shape[0]
    key = torch.where(keep, local, n_local).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_local + 1)[:n_local].tolist()
    k, start = ids.shape[1], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        flat = order[start:start + n]
        start += n
        tok, slot = flat // k, flat % k
        w = wts[tok, slot].unsqueeze(1)
        xin = rounded(x[tok].float() * w, x.dtype) if on_input else x[tok]
        o = experts.run(e, xin)
        acc[tok, slot] = o if on_input else o * w
    return rounded(acc.sum(dim=1), x.dtype)


def _token_chunk_dense(x, topk_weights, topk_ids, local_map, experts: _QuantExperts, on_input: bool) -> torch.Tensor:
    """:func:`_token_chunk` for ``torch.compile``: every local expert over every token of the chunk (no
    ``unique`` / ``nonzero``, whose sizes depend on the data), each slot keeping its expert's row; the same
    per-row math (activations are quantised per token), summed over K in slot order. ``E_local`` times the
    FLOPs: the reference backend's compile path (fast compiled layers use the Triton backend)."""
    ids = topk_ids.long()
    local = ids if local_map is None else local_map[ids]
    wts = topk_weights.float()
    keep = (local >= 0) & ((wts != 0) | on_input)
    acc = torch.zeros(*ids.shape, x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    xin = rounded(x.float() * wts[:, :1], x.dtype) if on_input else x  # on the input: K == 1
    for e in range(experts.w13.shape[0]):  # E_local
        o = experts.run(e, xin)[:, None, :]  # [Tc, 1, H]
        acc = torch.where((keep & (local == e))[..., None], o if on_input else o * wts[..., None], acc)
    return rounded(acc.sum(dim=1), x.dtype)


def check_quant_experts_inputs(hidden_states, w13, w2, topk_weights, topk_ids, *, fmt, w13_scale, w2_scale,
                               w13_input_scale=None, w2_input_scale=None, activation="silu",
                               apply_router_weight_on_input=False, w1_bias=None, w2_bias=None, expert_map=None,
                               global_num_experts=-1, swiglu_limit=None, names=("w13", "w2")):
    """The one argument check of the quantised experts (arguments as :func:`fused_experts_quant_torch`;
    ``fmt`` a format object or HF dict): shapes, dtypes, devices — no value checks (the torch twin checks
    ids and ``expert_map`` values; the Triton path treats ids outside ``[0, E)`` as dead slots).
    ``names``: the weights' names in errors (:func:`moekit.fused_experts` passes ``("w1", "w2")``).
    Returns ``(E_local, I, H, gated, params)``."""
    fmt = parse_quant_config(fmt)
    if not isinstance(fmt, WeightFormat):
        raise ValueError("fmt must name a quantised format (an HF quant dict or a format object), got None")
    check_tensor("hidden_states", hidden_states)
    e, inter, hidden, gated = check_quant_weights(fmt, w13, w2, w13_scale, w2_scale, w13_input_scale=w13_input_scale,
                                                  w2_input_scale=w2_input_scale, names=names)
    if hidden_states.dim() == 2 and hidden_states.shape[1] != hidden:
        raise ValueError(f"hidden_states has width {hidden_states.shape[1]} but the experts hold H = {hidden} "
                         f"({names[1]}.shape[1])")
    if w13.device != hidden_states.device:
        raise ValueError(f"{names[0]} is on {w13.device} but hidden_states is on {hidden_states.device}; they must "
                         f"share a device")
    rows = 2 * inter if gated else inter
    p = check_experts_inputs(
        hidden_states, _stand_in((e, rows, hidden), hidden_states), _stand_in((e, hidden, inter), hidden_states),
        topk_weights, topk_ids, activation=activation, apply_router_weight_on_input=apply_router_weight_on_input,
        w1_bias=w1_bias, w2_bias=w2_bias, expert_map=expert_map, global_num_experts=global_num_experts,
        swiglu_limit=swiglu_limit,
    )
    return e, inter, hidden, gated, p
