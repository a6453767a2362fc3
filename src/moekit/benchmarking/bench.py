"""``moekit bench``: whole MoE layer forward (routing + experts + combine) on a CUDA GPU.

Each point captures one CUDA graph holding ``n`` layer forwards over ``R`` rotating input sets
(different tokens and routings, so weights are not served from L2 across calls) and reports the
median replay time over ``n``. Side by side, in the same run:

- ``moekit``: ``moekit.FusedMoE(..., backend="triton")``
- ``baseline``: a plain PyTorch MoE (torch routing, ``torch._grouped_mm`` over expert-sorted rows,
  torch activation, weighted sum over slots), same routing semantics and the same weights

Roofline (per point; ``BW`` = the faster of a device copy (read + write bytes) and a read-only
stream, ``PEAK`` = bf16 matmul rate, all measured in the same run; the MoE forward mostly streams
weights, so the read stream is the ceiling it can reach and a copy-based ceiling would read above
100 %)::

    bytes = U · bytes_per_expert + T·H·2·elt + T·(E+Z)·4     U = unique real experts hit (avg over sets)
    flops = 2 · S · H · (2I + I)   (gated; 2 · S · H · 2I for relu2)   S = real (token, expert) slots
    floor = max(bytes / BW, flops / PEAK);   pct_roofline = 100 · floor / time

Writes ``<out>/<gpu>-<date>.json`` (a list of rows: model, tokens, impl, us, pct_roofline, device,
dtype, quant, ...) and ``<out>/<gpu>-<date>.png`` (achieved TFLOP/s against arithmetic intensity, with
the roofline); ``out`` defaults to ``./benchmarks/results`` when that folder exists, else ``.``.
``quant`` is the weight format: the unquantised dtype (``"bf16"`` / ``"fp16"``), or with ``--quant
fp8|mxfp4|int4`` the rows of impl ``moekit-<quant>`` beside them (same routing and weights, quantised;
roofline with the format's bytes and, for fp8, the fp8 matmul peak of the same run: :mod:`.bench_quant`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from pathlib import Path

import torch

from .bench_quant import QUANT_FORMATS, measure_fp8_peak, quant_rows
from .eager import bench_eager, summarize_eager
from .shapes import MODELS, ModelShape
from .timer import time_graph

QUANT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: weight formats that later releases add; named so that asking for one says so clearly
QUANT_LATER = ("fp8_e4m3", "int8", "nvfp4")


def quant_name(dtype: torch.dtype) -> str:
    """The ``quant`` key of a row whose weights are stored unquantised in ``dtype``."""
    return {v: k for k, v in QUANT_DTYPES.items()}[dtype]


def check_quant(quant: str | None, dtype: torch.dtype) -> str:
    """The weight format to benchmark: the unquantised ``dtype`` itself ("bf16" / "fp16"), or a quantised
    format of :data:`~.bench_quant.QUANT_FORMATS` (run beside the unquantised layer)."""
    want = quant_name(dtype)
    if quant is None or quant == want or quant in QUANT_FORMATS:
        return want if quant is None else quant
    if quant in QUANT_LATER:
        raise ValueError(f"--quant {quant}: not implemented yet; expected {want!r} (the --dtype of the run) or "
                         f"one of {sorted(QUANT_FORMATS)}")
    raise ValueError(f"--quant {quant}: expected {want!r} (the --dtype of the run) or one of {sorted(QUANT_FORMATS)}")


def build_layer(m: ModelShape, dtype, device, backend="triton"):
    """A ``moekit.FusedMoE`` of shape ``m`` with random weights (deterministic for a torch seed)."""
    import moekit

    bias = None
    if m.sel_bias:  # a perturbation of the order of the score spread (softmax scores are ~1/(E+Z))
        spread = 0.1 if m.scoring == "sigmoid" else 1.0 / (m.E + m.Z)
        bias = (torch.rand(m.E + m.Z, device=device) * spread).float()
    layer = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=dtype, e_score_correction_bias=bias,
                            device=device, backend=backend, **m.layer_kwargs())
    re = layer.routed_experts
    with torch.no_grad():  # random weights made in place, then loaded from themselves: no second copy
        re.w13_weight.normal_(0, m.H**-0.5)
        re.w2_weight.normal_(0, m.I**-0.5)
        if m.has_bias:
            re.w13_bias.uniform_(-0.05, 0.05)
            re.w2_bias.uniform_(-0.05, 0.05)
    layer.load_expert_weights(re.w13_weight, re.w2_weight, re.w13_bias, re.w2_bias)
    return layer


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
    if z:
        is_zero = ids >= e
        zero = x.float() * torch.where(is_zero, w, 0.0).sum(-1, keepdim=True)
        w = w.masked_fill(is_zero, 0.0)
        ids = ids.masked_fill(is_zero, 0)
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, re.w13_weight.transpose(1, 2), offs=offs)
    if re.w13_bias is not None:
        h = h + re.w13_bias[flat[order]]
    from ..ops.activation import apply_activation_torch

    a = apply_activation_torch(h, m.act, layer.moe_config.swiglu_limit).to(x.dtype)
    o = torch._grouped_mm(a, re.w2_weight.transpose(1, 2), offs=offs)
    if re.w2_bias is not None:
        o = o + re.w2_bias[flat[order]]
    slot_out = torch.empty(flat.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    slot_out[order] = o.float() * w.reshape(-1)[order, None]
    out = slot_out.view(x.shape[0], k, -1).sum(1)
    if zero is not None:
        out = out + zero
    return out.to(x.dtype)


def measure_ceilings(device) -> tuple[float, float, float]:
    """(copy bytes/s counting read + write, read-stream bytes/s, bf16 matmul FLOP/s at 8192³)."""
    src = torch.randn(256 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    us = time_graph(lambda: dst.copy_(src), [()], target_ms=50.0)
    bw = 2 * src.numel() * 4 / (us * 1e-6)
    us = time_graph(lambda: torch.sum(src), [()], target_ms=50.0)
    read_bw = src.numel() * 4 / (us * 1e-6)  # a read-only stream
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    us = time_graph(lambda: a @ b, [()], target_ms=50.0)
    peak = 2 * 8192**3 / (us * 1e-6)
    return bw, read_bw, peak


def roofline(m: ModelShape, t: int, ids_list, e_real: int, bw: float, peak: float, elt: int = 2,
             per_expert: float | None = None) -> dict:
    """``per_expert``: bytes of one expert (default: unquantised weights and biases at ``elt`` bytes)."""
    if per_expert is None:
        per_expert = (m.I * (2 if m.gated else 1) * m.H + m.H * m.I) * elt
        if m.has_bias:
            per_expert += (3 * m.I + m.H) * elt
    uniq = statistics.mean(int(torch.unique(i[i < e_real]).numel()) for i in ids_list)
    slots = statistics.mean(int((i < e_real).sum()) for i in ids_list)
    nbytes = uniq * per_expert + 2 * t * m.H * elt + t * (m.E + m.Z) * 4
    flops = 2 * slots * m.H * (3 if m.gated else 2) * m.I
    floor_us = max(nbytes / bw, flops / peak) * 1e6
    return dict(bytes=nbytes, flops=flops, floor_us=floor_us, unique_experts=uniq, real_slots=slots)


def bench_model(m: ModelShape, tokens, dtype, device, bw, peak, rotations: int, baseline: bool, log,
                quant: str | None = None, quant_peak: float | None = None, eager_tokens=()) -> list[dict]:
    """Rows of ``moekit`` (and ``baseline``, and ``moekit-<quant>``) at each token count for shape ``m``;
    then the eager rows of :mod:`.eager` at ``eager_tokens``."""
    name = m.name
    torch.manual_seed(0)
    layer = build_layer(m, dtype, device)
    rows = bench_eager(m, layer, eager_tokens, dtype, device, log) if eager_tokens else []
    dev_name = torch.cuda.get_device_name(device)
    for t in tokens:
        sets = [(torch.randn(t, m.H, device=device, dtype=dtype),
                 torch.randn(t, m.E + m.Z, device=device, dtype=torch.float32)) for _ in range(rotations)]
        with torch.no_grad():
            r = layer.router  # unmasked ids (zero-expert slots keep ids >= E) for the roofline
            bias = getattr(r, "e_score_correction_bias", None)
            ids_list = [r.kernels.route(lg, r.spec, bias, None)[1] for _, lg in sets]
            rf = roofline(m, t, ids_list, m.E, bw, peak)
            impls = [("moekit", lambda x, lg: layer(x, lg))]
            if baseline:
                impls.append(("baseline", lambda x, lg: baseline_forward(layer, m, x, lg)))
            for impl, fn in impls:
                try:
                    us = time_graph(fn, sets)
                except Exception as exc:  # a baseline op missing on this torch build
                    log(f"{name} T={t} {impl}: failed: {exc!r}")
                    continue
                row = dict(model=name, tokens=t, impl=impl, us=round(us, 2),
                           pct_roofline=round(100 * rf["floor_us"] / us, 1),
                           tflops=round(rf["flops"] / (us * 1e-6) / 1e12, 2), device=dev_name,
                           dtype=str(dtype).replace("torch.", ""), quant=quant_name(dtype),
                           **{k: round(v, 2) for k, v in rf.items()})
                rows.append(row)
                log(f"{name:15s} T={t:6d} {impl:9s} {us:10.1f} us  {row['pct_roofline']:5.1f}% roofline "
                    f"{row['tflops']:7.1f} TFLOP/s")
            if quant in QUANT_FORMATS:
                rows += quant_rows(layer, m, quant, sets,
                                   lambda pe, pk: roofline(m, t, ids_list, m.E, bw, pk, per_expert=pe),
                                   quant_peak or peak, dev_name, dtype, log)
        del sets
        torch.cuda.empty_cache()
    del layer
    torch.cuda.empty_cache()
    return rows


def bench_routing(tokens, device, log) -> list[dict]:
    """DeepSeek-V3 grouped top-k: the Triton kernel against the torch twin."""
    from ..ops.kernels import kernels_for
    from ..ops.routing import TopKSpec, route_torch

    m = MODELS["deepseek-v3"]
    spec = TopKSpec(m.K, m.scoring, m.renorm, m.scale, m.groups, m.topk_group)
    bias = torch.rand(m.E, device=device) * 0.1
    route_triton = kernels_for("triton").route
    rows = []
    for t in tokens:
        sets = [(torch.randn(t, m.E, device=device),) for _ in range(4)]
        for impl, fn in (("moekit-route", lambda lg: route_triton(lg, spec, bias, None)),
                         ("torch-route", lambda lg: route_torch(lg, spec, bias))):
            us = time_graph(fn, sets, target_ms=10.0, replays=15)
            rows.append(dict(model="deepseek-v3-routing", tokens=t, impl=impl, us=round(us, 2), pct_roofline=None,
                             device=torch.cuda.get_device_name(device), quant=None))
            log(f"routing T={t:6d} {impl:13s} {us:8.2f} us")
    return rows


def plot(rows, bw, peak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    ai = [10 ** (x / 10) for x in range(-5, 40)]
    ax.loglog(ai, [min(peak, bw * a) / 1e12 for a in ai], "k-", lw=1.5, label="roofline (max measured BW)")
    for impl, marker in (("moekit", "o"), ("baseline", "x")):
        for model in sorted({r["model"] for r in rows}):
            pts = [r for r in rows if r["impl"] == impl and r["model"] == model]
            if pts:
                ax.loglog([r["flops"] / r["bytes"] for r in pts], [r["tflops"] for r in pts], marker,
                          label=f"{model} {impl}", alpha=0.8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"MoE layer forward, {rows[0]['device'] if rows else ''}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def default_out() -> Path:
    """Where ``moekit bench`` writes by default: ``./benchmarks/results`` if that folder exists, else ``.``."""
    results = Path("benchmarks") / "results"
    return results if results.is_dir() else Path(".")


def run_bench(models: list[ModelShape], tokens: list[int], dtype: torch.dtype = torch.bfloat16, *,
              rotations: int = 4, baseline: bool = True, routing: bool = True, longcat_nozero: bool = True,
              out: Path | None = None, log=print, quant: str | None = None, eager_tokens=()) -> list[dict]:
    """Benchmark ``models`` at ``tokens`` on the current CUDA device; write the JSON (and plot) to ``out``.

    Returns the rows. ``longcat_nozero`` adds LongCat-Flash without its zero experts (the same
    layer's real-expert cost) after ``longcat-flash``. ``quant``: a format of
    :data:`~.bench_quant.QUANT_FORMATS` to time beside the unquantised layer (rows ``moekit-<quant>``).
    ``eager_tokens``: also the host-time rows of :mod:`moekit.benchmarking.eager` at these token counts
    (``tokens`` may then be empty).
    """
    device = torch.device("cuda")
    copy_bw, read_bw, peak = measure_ceilings(device)
    bw = max(copy_bw, read_bw)
    quant = quant if quant in QUANT_FORMATS else None
    fp8_peak = measure_fp8_peak(device) if quant == "fp8" else None
    log(f"device {torch.cuda.get_device_name(device)}: copy {copy_bw / 1e12:.2f} TB/s, read {read_bw / 1e12:.2f} "
        f"TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s" + (f", fp8 matmul {fp8_peak / 1e12:.0f} TFLOP/s" if fp8_peak
                                                            else ""))
    rows = []
    for m in models:
        rows += bench_model(m, tokens, dtype, device, bw, peak, rotations, baseline, log, quant, fp8_peak,
                            eager_tokens)
        if m.name == "longcat-flash" and longcat_nozero:
            nozero = m.replace(name="longcat-flash-nozero", Z=0)
            rows += bench_model(nozero, tokens, dtype, device, bw, peak, rotations, False, log)
    if routing:
        rows += bench_routing(tokens, device, log)
    for line in summarize(rows) + summarize_eager(rows):
        log(line)
    out = default_out() if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{torch.cuda.get_device_name(device).replace(' ', '_')}-{_dt.date.today().isoformat()}"
    meta = dict(copy_bw_TBps=round(copy_bw / 1e12, 3), read_bw_TBps=round(read_bw / 1e12, 3),
                bf16_peak_TFLOPs=round(peak / 1e12, 1),
                fp8_peak_TFLOPs=round(fp8_peak / 1e12, 1) if fp8_peak else None,
                roofline="bytes = unique_experts*bytes_per_expert + 2*T*H*elt + T*(E+Z)*4; "
                         "flops = 2*real_slots*H*3I (gated); floor = max(bytes/BW, flops/PEAK), BW = max(copy, read)")
    for r in rows:
        r.setdefault("meta", meta)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    try:
        plot([r for r in rows if r.get("flops")], bw, peak, out / f"{stem}.png")
    except Exception as exc:  # matplotlib missing: the JSON is the result
        log(f"plot skipped: {exc!r}")
    log(f"wrote {out / stem}.json")
    return rows


def summarize(rows) -> list[str]:
    lines, speedups = [], []
    by = {(r["model"], r["tokens"], r["impl"]): r for r in rows}
    for (model, t, impl), r in sorted(by.items()):
        if impl != "moekit":
            continue
        b = by.get((model, t, "baseline"))
        sp = b["us"] / r["us"] if b else None
        if sp:
            speedups.append(sp)
        lines.append(f"{model:22s} T={t:6d} moekit {r['us']:10.1f} us  baseline "
                     f"{b['us'] if b else float('nan'):10.1f} us  x{sp or float('nan'):5.2f}  {r['pct_roofline']}%")
    if speedups:
        g = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(f"geomean speedup over baseline: {g:.3f} ({len(speedups)} points, min {min(speedups):.2f})")
    for (model, t, impl), r in sorted(by.items()):
        u = by.get((model, t, "moekit"))
        if impl.startswith("moekit-") and u:
            lines.append(f"{model:22s} T={t:6d} {impl} {r['us']:10.1f} us  x{u['us'] / r['us']:5.2f} vs moekit "
                         f"{u['quant']}  {r['pct_roofline']}% of the {impl[7:]} roofline")
    return lines
