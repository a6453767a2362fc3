"""``moekit bench``: whole MoE layer forward and the experts step alone, per weight format, on a CUDA GPU.

Each point captures one CUDA graph holding ``n`` calls over ``R`` rotating input sets (different
tokens and routings, so weights are not served from L2 across calls), replays it for :data:`WARM_MS` (so that no
row is timed at the higher clocks an H200 holds briefly after an idle gap), and reports the median replay
time over ``n``; ``sm_mhz`` is the SM clock read right after (None without NVML). Side by side, in the same
process, per shape and token count (same inputs, same routing):

- ``impl="moekit"``: the whole layer (routing + experts + combine), ``moekit.FusedMoE(..., backend="triton")``
- ``impl="moekit-experts"``: the experts step alone on routing precomputed per input set
  (``moekit.fused_experts``; the quantised kernels for a quantised format), the step a peer's
  fused-MoE kernel times (issue #11's comparison)
- ``impl="baseline"``: a plain PyTorch MoE (torch routing, ``torch._grouped_mm`` over expert-sorted rows,
  torch activation, weighted sum over slots), same routing semantics and the same weights (unquantised only)
- ``model="gpt-oss-120b-silu"``, ``impl="moekit-experts"``: gpt-oss-120b's experts step with silu and no
  biases on the same weights (what the peer's gpt-oss numbers ran)

Row naming (decided here): ``impl`` names what is timed and ``quant`` the weight format, for every
format: ``bf16`` / ``fp16`` (the unquantised ``--dtype``), ``fp8``, ``mxfp4``, ``int4``
(:mod:`.bench_quant`). ``--quant bf16,fp8,mxfp4,int4`` times all of them in one run; the unquantised
``--dtype`` is always timed (every quantised target compares to it). Earlier results named the
quantised whole layer ``impl="moekit-<quant>"``; ``benchmarks/compare.py`` reads both.

Roofline (per point; ``BW`` = the faster of a device copy (read + write bytes) and a read-only
stream, ``PEAK`` = bf16 matmul rate (fp8: fp8 matmul rate), all measured in the same run; the MoE
forward mostly streams weights, so the read stream is the ceiling it can reach and a copy-based
ceiling would read above 100 %)::

    bytes = U · bytes_per_expert + T·H·2·elt + T·(E+Z)·4     U = unique real experts hit (avg over sets)
            (experts step: T·K·8 bytes of routing instead of the logits)
    flops = 2 · S · H · (2I + I)   (gated; 2 · S · H · 2I for relu2)   S = real (token, expert) slots
    floor = max(bytes / BW, flops / PEAK);   pct_roofline = 100 · floor / time

Writes ``<out>/<gpu>-<date>.json``: a list of rows ``{model, tokens, impl, quant, us, sm_mhz, pct_roofline,
tflops, peak_tflops, bytes, flops, floor_us, device, dtype, meta}`` (``meta``: the run's ceilings,
formats, timing and elapsed time), and the plots of :mod:`.plot` (``<gpu>-<date>.png``, the roofline,
and ``<gpu>-<date>-speed.png``, µs against T with the peer's reference numbers when a reference file is
given; a plot with no rows to draw, e.g. of an eager-only run, is not written). ``out`` defaults to
``./benchmarks/results`` when that folder exists, else ``.``; a second run of the day into the same ``out``
replaces the files (it logs a note first).
``--fast``: 10 ms replays, median of 5, and no baseline, routing or LongCat-without-zero rows.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from .._checks import DTYPE_SHORT
from .baseline import baseline_forward  # noqa: F401 - re-exported: bench times it
from .bench_quant import QUANT_FORMATS, experts_fn, layer_fn, measure_fp8_peak, per_expert_bytes, quantized_weights
from .eager import bench_eager, summarize_eager
from .plot import load_reference, write_plots
from .shapes import MODELS, ModelShape
from .timer import runs_on_device, time_graph

QUANT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: weight formats that later releases add; named so that asking for one says so clearly
QUANT_LATER = ("fp8_e4m3", "int8", "nvfp4")
#: the timing of ``--fast``
FAST = dict(target_ms=10.0, replays=5)
#: graph replays before each row's timed ones (:func:`~.timer.time_graph`'s ``warm_ms``): every row is timed at the
#: clocks of a busy GPU, not the first one after an idle gap (round 17)
WARM_MS = 200.0
#: the warm-up of a compute-heavy row (``time_graph``'s ``settle_ms``): timed at the H200's settled power-cap clocks,
#: whatever row ran before it (round 29)
SETTLE_MS = 1000.0


def quant_name(dtype: torch.dtype) -> str:
    """The ``quant`` key of a row whose weights are stored unquantised in ``dtype``."""
    return DTYPE_SHORT[dtype]


def check_quant(quant: str | None, dtype: torch.dtype) -> str:
    """The weight format to benchmark: the unquantised ``dtype`` itself ("bf16" / "fp16"), or a quantised
    format of :data:`~.bench_quant.QUANT_FORMATS` (run beside the unquantised layer)."""
    want = quant_name(dtype)
    if quant is None or quant == want or quant in QUANT_FORMATS:
        return want if quant is None else quant
    if quant in QUANT_LATER:
        raise ValueError(f"--quant: {quant} is not implemented yet; expected {want!r} (the --dtype of the run) or "
                         f"one of {sorted(QUANT_FORMATS)}, got {quant!r}")
    raise ValueError(f"--quant: expected {want!r} (the --dtype) or one of {sorted(QUANT_FORMATS)}, got {quant!r}")


def check_quants(quant, dtype: torch.dtype) -> list[str]:
    """The formats of one run: ``quant`` is None, one name, a comma list or a list of names; the result
    starts with the unquantised ``dtype`` (always timed) and holds each format once, in the given order."""
    if quant is None:
        names = []
    elif isinstance(quant, str):
        names = [q.strip() for q in quant.split(",")]
    else:
        names = list(quant)
    out = [quant_name(dtype)]
    for q in names:
        if not q:
            raise ValueError(f"--quant: expected comma-separated formats, got {quant!r} (an empty name)")
        q = check_quant(q, dtype)
        if q not in out:
            out.append(q)
    return out


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The run's measured ceilings: bytes/s, bf16 FLOP/s, fp8 FLOP/s (None: not measured)."""

    bw: float
    peak: float
    fp8_peak: float | None = None

    def peak_for(self, quant: str) -> float:
        return self.fp8_peak if quant == "fp8" and self.fp8_peak else self.peak


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run times and how. ``quants``: formats (the unquantised one first); ``experts``: the
    experts-step rows; ``peer_silu``: the ``<model>-silu`` experts-step rows of non-silu gated shapes;
    ``target_ms`` / ``replays`` / ``warm_ms`` / ``settle_ms``: :func:`~.timer.time_graph`'s; ``backend`` /
    ``timer``: "triton" and ``time_graph`` on the GPU ("torch" and a fake timer make a CPU dry run)."""

    quants: tuple = ("bf16",)
    rotations: int = 4
    baseline: bool = True
    experts: bool = True
    peer_silu: bool = True
    target_ms: float = 25.0
    replays: int = 7
    warm_ms: float = WARM_MS
    settle_ms: float = SETTLE_MS
    backend: str = "triton"
    timer: Callable = time_graph


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


@runs_on_device
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
             per_expert: float | None = None, experts_only: bool = False) -> dict:
    """``per_expert``: bytes of one expert (default: unquantised weights and biases at ``elt`` bytes);
    ``experts_only``: the experts step (reads ``T·K·8`` bytes of routing instead of the logits)."""
    if per_expert is None:
        per_expert = (m.I * (2 if m.gated else 1) * m.H + m.H * m.I) * elt + m.bias_bytes(elt)
    uniq = statistics.mean(int(torch.unique(i[i < e_real]).numel()) for i in ids_list)
    slots = statistics.mean(int((i < e_real).sum()) for i in ids_list)
    routing = t * m.K * 8 if experts_only else t * (m.E + m.Z) * 4
    nbytes = uniq * per_expert + 2 * t * m.H * elt + routing
    flops = 2 * slots * m.H * (3 if m.gated else 2) * m.I
    floor_us = max(nbytes / bw, flops / peak) * 1e6
    return dict(bytes=nbytes, flops=flops, floor_us=floor_us, unique_experts=uniq, real_slots=slots)


def _time_row(plan: Plan, fn, inputs, m: ModelShape, t: int, impl: str, quant: str, rf: dict, peak: float,
              dev: str, dtype, log) -> dict | None:
    try:
        clocks: list = []
        us = plan.timer(fn, inputs, target_ms=plan.target_ms, replays=plan.replays, warm_ms=plan.warm_ms,
                        settle_ms=plan.settle_ms, clocks=clocks)
    except Exception as exc:  # an op missing on this torch build, a format refused: the other rows still run
        log(f"{m.name} T={t} {impl} {quant}: failed: {exc!r}")
        return None
    read = [c for c in clocks if c is not None]  # after each timed replay (none without NVML)
    mhz = statistics.median(read) if read else None
    row = dict(model=m.name, tokens=t, impl=impl, quant=quant, us=round(us, 2), sm_mhz=mhz,
               pct_roofline=round(100 * rf["floor_us"] / us, 1), tflops=round(rf["flops"] / (us * 1e-6) / 1e12, 2),
               peak_tflops=round(peak / 1e12, 1), device=dev, dtype=str(dtype).replace("torch.", ""),
               **{k: round(v, 2) for k, v in rf.items()})
    log(f"{m.name:20s} T={t:6d} {impl:14s} {quant:5s} {us:10.1f} us  {row['pct_roofline']:5.1f}% roofline "
        f"{row['tflops']:7.1f} TFLOP/s" + (f"  {mhz} MHz" if mhz else ""))
    return row


def bench_model(m: ModelShape, tokens, dtype, device, ceil: Ceilings, plan: Plan, log, eager_tokens=()) -> list[dict]:
    """Rows of every format of ``plan`` (whole layer, experts step, baseline) at each token count for
    shape ``m`` (weights quantised once per format); then the eager rows of :mod:`.eager` at ``eager_tokens``."""
    torch.manual_seed(0)
    layer = build_layer(m, dtype, device, backend=plan.backend)
    rows = bench_eager(m, layer, eager_tokens, dtype, device, log) if eager_tokens else []
    dev, base = device_name(device), quant_name(dtype)
    qcache: dict = {}
    for t in tokens:
        sets = [(torch.randn(t, m.H, device=device, dtype=dtype),
                 torch.randn(t, m.E + m.Z, device=device, dtype=torch.float32)) for _ in range(plan.rotations)]
        with torch.no_grad():
            r = layer.router  # unmasked ids (zero-expert slots keep ids >= E) for the roofline
            bias = getattr(r, "e_score_correction_bias", None)
            ids_list = [r.kernels.route(lg, r.spec, bias, None)[1] for _, lg in sets]
            esets = [(x, *r.select_experts(x, lg)) for x, lg in sets]  # the experts step's precomputed routing
            for quant in plan.quants:
                q = None if quant == base else quantized_weights(layer, quant, qcache)
                pk, pe = ceil.peak_for(quant), per_expert_bytes(m, quant, dtype)
                todo = [("moekit", layer_fn(layer, m, quant, q, plan.backend), sets)]
                if plan.experts:
                    todo.append(("moekit-experts", experts_fn(layer, m, quant, q, plan.backend), esets))
                if quant == base and plan.baseline:
                    todo.append(("baseline", lambda x, lg: baseline_forward(layer, m, x, lg), sets))
                for impl, fn, inputs in todo:
                    rf = roofline(m, t, ids_list, m.E, ceil.bw, pk, per_expert=pe, experts_only=inputs is esets)
                    rows.append(_time_row(plan, fn, inputs, m, t, impl, quant, rf, pk, dev, dtype, log))
            if plan.experts and plan.peer_silu and m.gated and m.act != "silu":
                ms = m.replace(name=f"{m.name}-silu", act="silu", has_bias=False)
                rf = roofline(ms, t, ids_list, m.E, ceil.bw, ceil.peak, experts_only=True)
                fn = experts_fn(layer, m, None, None, plan.backend, act="silu", biases=False)
                rows.append(_time_row(plan, fn, esets, ms, t, "moekit-experts", base, rf, ceil.peak, dev, dtype, log))
        del sets, esets
        _empty_cache(device)
    del layer, qcache
    _empty_cache(device)
    return [r for r in rows if r is not None]


def _empty_cache(device) -> None:
    torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None


@runs_on_device
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


def default_out() -> Path:
    """Where ``moekit bench`` writes by default: ``./benchmarks/results`` if that folder exists, else ``.``."""
    results = Path("benchmarks") / "results"
    return results if results.is_dir() else Path(".")


def default_reference() -> Path | None:
    """The peer's reference numbers drawn in the speed plot: ``./benchmarks/baselines/vllm-h200.json`` if present."""
    path = Path("benchmarks") / "baselines" / "vllm-h200.json"
    return path if path.is_file() else None


@runs_on_device
def run_bench(models: list[ModelShape], tokens: list[int], dtype: torch.dtype = torch.bfloat16, *,
              rotations: int = 4, baseline: bool = True, routing: bool = True, longcat_nozero: bool = True,
              out: Path | None = None, log=print, quant=None, eager_tokens=(), experts: bool = True,
              fast: bool = False, reference: Path | None = None, device="cuda", backend: str = "triton",
              timer: Callable = time_graph, settle_ms: float = SETTLE_MS) -> list[dict]:
    """Benchmark ``models`` at ``tokens`` on ``device`` (current for the run); write the JSON and plots to ``out``.

    Returns the rows. ``quant``: None, a format name, a comma list or a list (:func:`check_quants`):
    every format is timed side by side with the unquantised ``dtype``. ``longcat_nozero`` adds
    LongCat-Flash without its zero experts (the same layer's real-expert cost, unquantised) after
    ``longcat-flash``. ``experts``: the experts-step rows. ``fast``: :data:`FAST` timing and no
    baseline, routing or LongCat-without-zero rows. ``eager_tokens``: also the host-time rows of
    :mod:`moekit.benchmarking.eager` at these token counts (``tokens`` may then be empty).
    ``reference``: a baseline file (``benchmarks/baselines/vllm-h200.json``) drawn in the speed plot.
    ``device`` / ``backend`` / ``timer``: a CUDA device, "triton", :func:`~.timer.time_graph` (a CPU dry
    run passes "cpu", "torch" and a fake timer). ``settle_ms``: the warm-up of compute-heavy rows (:data:`SETTLE_MS`).
    """
    device = torch.device(device)
    start = time.perf_counter()
    quants = check_quants(quant, dtype)
    if fast:
        baseline = routing = longcat_nozero = False
    plan = Plan(quants=tuple(quants), rotations=rotations, baseline=baseline, experts=experts, backend=backend,
                timer=timer, settle_ms=settle_ms, **(FAST if fast else {}))
    copy_bw, read_bw, peak = measure_ceilings(device)
    fp8_peak = measure_fp8_peak(device) if "fp8" in quants else None
    ceil = Ceilings(max(copy_bw, read_bw), peak, fp8_peak)
    log(f"device {device_name(device)}: copy {copy_bw / 1e12:.2f} TB/s, read {read_bw / 1e12:.2f} "
        f"TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s" + (f", fp8 matmul {fp8_peak / 1e12:.0f} TFLOP/s" if fp8_peak
                                                            else "") + f"; formats {','.join(quants)}")
    out = default_out() if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device_name(device).replace(' ', '_')}-{_dt.date.today().isoformat()}"
    if (out / f"{stem}.json").exists():  # one file per GPU and day: say so before the first shape replaces it
        log(f"note: {out / stem}.json exists (an earlier run of today): this run replaces it (another --out keeps it)")

    def save(rows: list[dict], done: bool) -> list[dict]:
        """Write the JSON so far (after each shape, ``meta.partial``: a run cut short by a time limit keeps
        every finished shape; then the whole run) and return its rows, each with the run's ``meta``."""
        meta = dict(copy_bw_TBps=round(copy_bw / 1e12, 3), read_bw_TBps=round(read_bw / 1e12, 3),
                    bf16_peak_TFLOPs=round(peak / 1e12, 1),
                    fp8_peak_TFLOPs=round(fp8_peak / 1e12, 1) if fp8_peak else None,
                    quants=quants, timing=dict(target_ms=plan.target_ms, replays=plan.replays, warm_ms=plan.warm_ms,
                                                   settle_ms=plan.settle_ms,
                                                   rotations=rotations),
                    elapsed_s=round(time.perf_counter() - start, 1), partial=not done,
                    reference=str(reference) if reference else None,
                    roofline="bytes = unique_experts*bytes_per_expert + 2*T*H*elt + T*(E+Z)*4 (experts step: "
                             "T*K*8); flops = 2*real_slots*H*3I (gated); floor = max(bytes/BW, flops/PEAK), "
                             "BW = max(copy, read), PEAK = peak_tflops of the row (fp8 rows: the fp8 matmul peak)")
        saved = [{**r, "meta": meta} for r in rows]
        (out / f"{stem}.json").write_text(json.dumps(saved, indent=1))
        return saved

    rows = []
    for m in models:
        t0 = time.perf_counter()
        rows += bench_model(m, tokens, dtype, device, ceil, plan, log, eager_tokens)
        if m.name == "longcat-flash" and longcat_nozero:
            nozero = m.replace(name="longcat-flash-nozero", Z=0)
            rows += bench_model(nozero, tokens, dtype, device, ceil,
                                dataclasses.replace(plan, quants=(quants[0],), baseline=False), log)
        log(f"{m.name}: {time.perf_counter() - t0:.1f} s (elapsed {time.perf_counter() - start:.1f} s)")
        save(rows, done=False)
    if routing:
        rows += bench_routing(tokens, device, log)
    for line in summarize(rows) + summarize_eager(rows):
        log(line)
    rows = save(rows, done=True)
    write_plots(rows, out / stem, ceil.bw, peak, fp8_peak, load_reference(reference), log=log)
    log(f"wrote {out / stem}.json in {time.perf_counter() - start:.0f} s")
    return rows


def summarize(rows) -> list[str]:
    """One line per point: the unquantised layer against the baseline (and their geometric mean), then
    each quantised row against the unquantised row of the same impl."""
    lines, speedups = [], []
    by = {(r["model"], r["tokens"], r["impl"], r.get("quant")): r for r in rows}
    unq = [k for k in by if k[2] == "moekit" and k[3] in QUANT_DTYPES]
    for key in sorted(unq):
        r = by[key]
        b = by.get((key[0], key[1], "baseline", key[3]))
        sp = b["us"] / r["us"] if b else None
        if sp:
            speedups.append(sp)
        lines.append(f"{key[0]:22s} T={key[1]:6d} moekit {r['us']:10.1f} us  baseline "
                     f"{b['us'] if b else float('nan'):10.1f} us  x{sp or float('nan'):5.2f}  {r['pct_roofline']}%")
    if speedups:
        g = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(f"geomean speedup over baseline: {g:.3f} ({len(speedups)} points, min {min(speedups):.2f})")
    for (model, t, impl, q), r in sorted(by.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if impl not in ("moekit", "moekit-experts") or q in QUANT_DTYPES or q is None:
            continue
        u = next((by[(model, t, impl, d)] for d in QUANT_DTYPES if (model, t, impl, d) in by), None)
        if u:
            lines.append(f"{model:22s} T={t:6d} {impl:14s} {q:5s} {r['us']:10.1f} us  x{u['us'] / r['us']:5.2f} vs "
                         f"{u['quant']}  {r['pct_roofline']}% of the {q} roofline")
    return lines
