"""``moekit bench --quant bf16,fp8,mxfp4,int4``: every weight format side by side, whole layer and experts step.

Per (shape, T) the same rotating input sets are timed for each format of the run (weights quantised
once per layer and format by :func:`moekit.quantize_experts`, the same routing):

- whole layer, ``impl="moekit"``: the unquantised format is ``FusedMoE.forward`` itself; a quantised
  format is the layer's routing (``layer.router.select_experts``) followed by the quantised experts
  (plus the zero-expert output for LongCat).
- experts step, ``impl="moekit-experts"``: the experts alone on routing precomputed per input set:
  ``moekit.fused_experts(x, w13, w2, topk_weights, topk_ids, ...)`` for the unquantised format,
  :func:`moekit.ops.triton_experts_quant.fused_experts_quant_triton` on the quantised weights otherwise
  (the ``experts_quant`` op of the run's kernel table; the torch twin in a CPU dry run).

Roofline per point, with the format's bytes and peak::

    bytes = U · fmt.bytes_per_expert(I, H) (+ biases) + T·H·2·elt + T·(E+Z)·4     (fp8: 1 byte / weight + scales)
    flops = 2 · S · H · 3I;   PEAK = fp8 matmul rate (torch._scaled_mm, 8192³, measured in this run) for
    fp8, the bf16 matmul rate for the weight-only formats (their dot runs in bf16 after dequantisation)

(the experts step reads ``T·K·8`` bytes of routing instead of the logits). Every row carries the peak
it was measured against as ``peak_tflops``. ``U`` is counted, not expected: the distinct real experts of
each input set's actual routing, averaged over the sets the graph replays (the experts the kernels read:
an expert without rows gets no program). The floor is the problem's own traffic, so it leaves out what an
implementation adds: the intermediate ``[T·K, I]`` rows, fp8's quantised activations and their scales,
the fp32 slot rows of the top-k sum, and LongCat's zero slots (rewritten to expert 0 with weight 0: dead
slots the align step drops, so no kernel reads expert 0 for them; ``U`` and ``S`` count real slots only).
Scales and biases are counted with the weights, as a quantised layer holds them (float scales in float32: int4's
too, which ship bf16; round 63: the bench fed the kernels bf16 int4 scales, lighter than any layer runs).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format

#: ``--quant`` names and the format each benchmarks
QUANT_FORMATS = {"fp8": Fp8BlockFormat(128, 128), "mxfp4": Mxfp4Format(), "int4": Int4GroupFormat(32)}


def measure_fp8_peak(device, timer: Callable | None = None) -> float:
    """fp8 e4m3 matmul FLOP/s at 8192³ (``torch._scaled_mm``, bf16 output), as the bf16 peak is measured (with
    ``device`` current: round 69)."""
    from .timer import on_device, time_graph

    n = 8192
    with on_device(device):
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device, dtype=torch.float32)
        us = (timer or time_graph)(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                                            out_dtype=torch.bfloat16), [()], target_ms=50.0)
    return 2 * n**3 / (us * 1e-6)


def packed_layout(layer, quant: str) -> str:
    """How a layer like ``layer`` (its kernel table, activation dtype and sizes) in format ``quant`` stores packed
    4-bit words (:attr:`moekit.experts.routed.RoutedExperts.packed_layout`): ``"rega"`` or ``"spec"``."""
    from ..ops.w4_layout import packed_layout_for

    re = layer.routed_experts
    return packed_layout_for(re.kernels.packed_layouts, QUANT_FORMATS.get(quant), re.params_dtype,
                             re.moe_config.hidden_size, re.inter_local)


def quantized_weights(layer, quant: str, cache: dict) -> tuple:
    """``(w13_q, w2_q, w13_scale, w2_scale)`` of ``layer``'s experts in format ``quant``, made once per
    layer and format (``cache``: a dict the caller drops with the layer), packed as a quantised layer on
    ``layer``'s backend stores them (:func:`packed_layout`: 4-bit words re-laid where it would)."""
    from ..ops.quantize import quantize_experts
    from ..ops.w4_layout import relay_quantized

    if quant not in cache:
        re = layer.routed_experts
        with torch.no_grad():
            q = quantize_experts(re.w13_weight, re.w2_weight, QUANT_FORMATS[quant])
            # the scales as a layer stores them (experts.params: float scales in float32), so the step timed is the
            # one a quantised FusedMoE runs (round 63: int4's came in --dtype)
            q = (*q[:2], *(s.float() if s.is_floating_point() else s for s in q[2:]))
            cache[quant] = relay_quantized(q) if packed_layout(layer, quant) == "rega" else q
    return cache[quant]


def per_expert_bytes(m, quant: str, dtype) -> int | None:
    """Bytes of one expert in format ``quant`` (weights, scales, biases); None: unquantised (roofline's default)."""
    if quant not in QUANT_FORMATS:
        return None
    return QUANT_FORMATS[quant].bytes_per_expert(m.I, m.H, m.gated) + m.bias_bytes(dtype.itemsize)


def experts_fn(layer, m, quant: str | None, q: tuple | None, backend: str = "triton", *, act: str | None = None,
               biases: bool = True):
    """``(x, topk_weights, topk_ids) -> [T, H]``: the experts step on precomputed routing.

    quant None / q None: the unquantised weights through ``moekit.fused_experts``; else the quantised
    weights ``q`` (:func:`quantized_weights`', so packed as the layer would) through the kernel table's
    ``experts_quant`` (Triton: ``launch_quant_experts``).
    act / biases: override the activation and drop the biases (the peer's ``-silu`` variant).
    """
    import moekit
    from ..ops.kernels import kernels_for

    re = layer.routed_experts
    act = act or m.act
    b1, b2 = (re.w13_bias, re.w2_bias) if biases else (None, None)
    limit = layer.moe_config.swiglu_limit if act == m.act else None
    if q is None:
        def fwd(x, w, ids):
            return moekit.fused_experts(x, re.w13_weight, re.w2_weight, w, ids, activation=act, w1_bias=b1,
                                        w2_bias=b2, swiglu_limit=limit, backend=backend)
        return fwd
    run = kernels_for(backend).experts_quant
    fmt = QUANT_FORMATS[quant]
    layout = {}
    if packed_layout(layer, quant) == "rega":  # the words quantized_weights re-laid, as the layer stores them
        if backend != re.kernels.name:
            raise ValueError(f"backend={backend!r}: the quantised weights were packed for {re.kernels.name!r}")
        layout = {"packed_layout": "rega"}

    def fwd_q(x, w, ids):
        return run(x, q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3], activation=act, w1_bias=b1,
                   w2_bias=b2, swiglu_limit=limit, **layout)

    return fwd_q


def layer_fn(layer, m, quant: str | None, q: tuple | None, backend: str = "triton"):
    """``(x, logits) -> [T, H]``: the whole layer: ``layer(x, logits)`` unquantised, else the layer's
    routing, then the quantised experts (``q``: quantize_experts'), then the runner's combination (the zero-expert
    output added and the output-side scale applied in float32, rounded once: the kernel table's ``zero_combine``)."""
    if q is None:
        return lambda x, logits: layer(x, logits)
    experts = experts_fn(layer, m, quant, q, backend)
    r, combine, scale = layer.router, layer.routed_experts.kernels.zero_combine, float(layer.routed_scaling_factor)

    def fwd(x, logits):
        res = r.route(x, logits)
        out = experts(x, res.topk_weights, res.topk_ids)
        return out if res.zero_scale is None and scale == 1.0 else combine(out, x, res.zero_scale, scale)

    return fwd

