"""``moekit bench --quant fp8|mxfp4|int4``: quantised experts beside the unquantised layer, in the same run.

The quantised point is the same routing as the layer (``layer.router``) followed by
:func:`moekit.ops.triton_experts_quant.fused_experts_quant_triton` on the layer's weights quantised by
:func:`moekit.quantize_experts` (plus the zero-expert output for LongCat). Roofline per point, with the
format's bytes and peak::

    bytes = U · fmt.bytes_per_expert(I, H) (+ biases) + T·H·2·elt + T·(E+Z)·4     (fp8: 1 byte / weight + scales)
    flops = 2 · S · H · 3I;   PEAK = fp8 matmul rate (torch._scaled_mm, 8192³, measured in this run) for
    fp8, the bf16 matmul rate for the weight-only formats (their dot runs in bf16 after dequantisation)
"""

from __future__ import annotations

import torch

from ..ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format
from .timer import time_graph

#: ``--quant`` names and the format each benchmarks
QUANT_FORMATS = {"fp8": Fp8BlockFormat(128, 128), "mxfp4": Mxfp4Format(), "int4": Int4GroupFormat(32)}


def measure_fp8_peak(device) -> float:
    """fp8 e4m3 matmul FLOP/s at 8192³ (``torch._scaled_mm``, bf16 output), as the bf16 peak is measured."""
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device=device, dtype=torch.float32)
    us = time_graph(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), [()],
                    target_ms=50.0)
    return 2 * n**3 / (us * 1e-6)


def quant_forward(layer, m, fmt, q):
    """``(x, logits) -> [T, H]``: the layer's routing, then the quantised experts (``q``: quantize_experts')."""
    from ..ops.triton_experts_quant import fused_experts_quant_triton

    re, r = layer.routed_experts, layer.router
    limit = layer.moe_config.swiglu_limit

    def fwd(x, logits):
        w, ids = r.select_experts(x, logits)
        out = fused_experts_quant_triton(x, q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3],
                                         activation=m.act, w1_bias=re.w13_bias, w2_bias=re.w2_bias,
                                         swiglu_limit=limit)
        zero = r.zero_expert_output if m.Z else None
        return out if zero is None else out + zero

    return fwd


def quant_rows(layer, m, quant: str, sets, rf_fn, peak: float, dev_name: str, dtype, log) -> list[dict]:
    """Rows of impl ``moekit-<quant>`` for one (model, T): ``rf_fn(bytes_per_expert, peak)`` is the
    roofline of :func:`moekit.benchmarking.bench.roofline` with the format's bytes and peak."""
    from ..ops.quantize import quantize_experts

    fmt = QUANT_FORMATS[quant]
    re = layer.routed_experts
    q = getattr(layer, "_bench_quant", None)
    if q is None or q[0] != quant:  # quantise once per layer
        with torch.no_grad():
            q = (quant, quantize_experts(re.w13_weight, re.w2_weight, fmt))
        layer._bench_quant = q
    per_expert = fmt.bytes_per_expert(m.I, m.H, m.gated)
    if m.has_bias:
        per_expert += (3 * m.I + m.H) * dtype.itemsize
    rf = rf_fn(per_expert, peak)
    fwd = quant_forward(layer, m, fmt, q[1])
    t = sets[0][0].shape[0]
    try:
        us = time_graph(fwd, sets)
    except Exception as exc:
        log(f"{m.name} T={t} moekit-{quant}: failed: {exc!r}")
        return []
    row = dict(model=m.name, tokens=t, impl=f"moekit-{quant}", us=round(us, 2),
               pct_roofline=round(100 * rf["floor_us"] / us, 1), tflops=round(rf["flops"] / (us * 1e-6) / 1e12, 2),
               device=dev_name, dtype=str(dtype).replace("torch.", ""), quant=quant,
               **{k: round(v, 2) for k, v in rf.items()})
    log(f"{m.name:15s} T={t:6d} {row['impl']:12s} {us:10.1f} us  {row['pct_roofline']:5.1f}% roofline "
        f"{row['tflops']:7.1f} TFLOP/s")
    return [row]
