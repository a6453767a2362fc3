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

Writes ``<out>/<gpu>-<date>.json`` (a list of rows: model, tokens, impl, us, pct_roofline, device, ...)
and ``<out>/<gpu>-<date>.png`` (achieved TFLOP/s against arithmetic intensity, with the roofline).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
from pathlib import Path

import torch

MODELS = {
    "deepseek-v3": dict(E=256, K=8, H=7168, I=2048, scoring="sigmoid", groups=8, topk_group=4, sel_bias=True,
                        renorm=True, scale=2.5),
    "qwen3-30b-a3b": dict(E=128, K=8, H=2048, I=768, scoring="softmax", renorm=True),
    "mixtral-8x7b": dict(E=8, K=2, H=4096, I=14336, scoring="softmax", renorm=True),
    "gpt-oss-120b": dict(E=128, K=4, H=2880, I=2880, scoring="softmax", renorm=True, act="swigluoai", has_bias=True),
    "longcat-flash": dict(E=512, Z=256, K=12, H=6144, I=2048, scoring="softmax", sel_bias=True, renorm=False,
                          scale=6.0),
}
TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)


def _spec(name: str) -> dict:
    m = dict(Z=0, groups=1, topk_group=1, sel_bias=False, renorm=True, scale=1.0, act="silu", has_bias=False)
    m.update(MODELS[name] if name in MODELS else {})
    return m


def build_layer(m: dict, dtype, device, backend="triton"):
    import moekit

    bias = None
    if m["sel_bias"]:  # a perturbation of the order of the score spread (softmax scores are ~1/(E+Z))
        spread = 0.1 if m["scoring"] == "sigmoid" else 1.0 / (m["E"] + m["Z"])
        bias = (torch.rand(m["E"] + m["Z"], device=device) * spread).float()
    kw = dict(params_dtype=dtype, renormalize=m["renorm"], scoring_func=m["scoring"],
              routed_scaling_factor=m["scale"], e_score_correction_bias=bias, activation=m["act"],
              has_bias=m["has_bias"], device=device, backend=backend)
    if m["groups"] > 1:
        kw.update(use_grouped_topk=True, num_expert_group=m["groups"], topk_group=m["topk_group"])
    if m["Z"]:
        kw.update(zero_expert_type="identity")
    layer = moekit.FusedMoE(m["E"], m["K"], m["H"], m["I"], **kw)
    if m["has_bias"]:
        with torch.no_grad():
            layer.routed_experts.w13_bias.uniform_(-0.05, 0.05)
            layer.routed_experts.w2_bias.uniform_(-0.05, 0.05)
    return layer


def baseline_forward(layer, m: dict, x, logits):
    """Plain PyTorch MoE on the layer's weights: torch routing, torch._grouped_mm experts."""
    re = layer.routed_experts
    e, k, z = m["E"], m["K"], m["Z"]
    lf = logits.float()
    s = torch.sigmoid(lf) if m["scoring"] == "sigmoid" else torch.softmax(lf, dim=-1)
    bias = getattr(layer.router, "e_score_correction_bias", None)
    sel = s + bias if bias is not None else s
    if m["groups"] > 1:
        g = sel.view(x.shape[0], m["groups"], -1)
        gs = g.topk(2, dim=-1).values.sum(-1) if bias is not None else g.amax(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(m["topk_group"], dim=-1).indices, 1.0)
        sel = sel.masked_fill(keep.repeat_interleave(g.shape[-1], 1) == 0, float("-inf"))
    ids = sel.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    if m["renorm"]:
        w = w / w.sum(-1, keepdim=True)
    w = w * m["scale"]
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
    from .ops.activation import apply_activation_torch

    a = apply_activation_torch(h, m["act"], layer.moe_config.swiglu_limit).to(x.dtype)
    o = torch._grouped_mm(a, re.w2_weight.transpose(1, 2), offs=offs)
    if re.w2_bias is not None:
        o = o + re.w2_bias[flat[order]]
    slot_out = torch.empty(flat.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    slot_out[order] = o.float() * w.reshape(-1)[order, None]
    out = slot_out.view(x.shape[0], k, -1).sum(1)
    if zero is not None:
        out = out + zero
    return out.to(x.dtype)


def time_graph(fn, inputs, target_ms: float = 25.0, replays: int = 7) -> float:
    """Median µs per call of ``fn(*inputs[i % R])`` captured ``n`` times in one CUDA graph."""
    torch.cuda.synchronize()
    for inp in inputs:  # warm up: compile, allocate
        fn(*inp)
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for inp in inputs:
        fn(*inp)
    t1.record()
    torch.cuda.synchronize()
    est = max(t0.elapsed_time(t1) / len(inputs), 1e-3)
    n = int(min(200, max(len(inputs), round(target_ms / est))))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn(*inputs[0])
        with torch.cuda.graph(graph, stream=stream):
            for i in range(n):
                fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    graph.replay()
    times = []
    for _ in range(replays):
        t0.record()
        graph.replay()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) * 1000.0 / n)
    del graph
    return statistics.median(times)


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


def roofline(m: dict, t: int, ids_list, e_real: int, bw: float, peak: float, elt: int = 2) -> dict:
    per_expert = (m["I"] * (2 if m["act"] != "relu2" else 1) * m["H"] + m["H"] * m["I"]) * elt
    if m["has_bias"]:
        per_expert += (3 * m["I"] + m["H"]) * elt
    uniq = statistics.mean(int(torch.unique(i[i < e_real]).numel()) for i in ids_list)
    slots = statistics.mean(int((i < e_real).sum()) for i in ids_list)
    nbytes = uniq * per_expert + 2 * t * m["H"] * elt + t * (m["E"] + m["Z"]) * 4
    flops = 2 * slots * m["H"] * (3 if m["act"] != "relu2" else 2) * m["I"]
    floor_us = max(nbytes / bw, flops / peak) * 1e6
    return dict(bytes=nbytes, flops=flops, floor_us=floor_us, unique_experts=uniq, real_slots=slots)


def bench_model(name: str, tokens, dtype, device, bw, peak, rotations: int, baseline: bool, log) -> list[dict]:
    m = _spec(name)
    torch.manual_seed(0)
    layer = build_layer(m, dtype, device)
    rows = []
    dev_name = torch.cuda.get_device_name(device)
    for t in tokens:
        sets = [(torch.randn(t, m["H"], device=device, dtype=dtype),
                 torch.randn(t, m["E"] + m["Z"], device=device, dtype=torch.float32)) for _ in range(rotations)]
        with torch.no_grad():
            from .ops.api import route

            r = layer.router  # unmasked ids (zero-expert slots keep ids >= E) for the roofline
            ids_list = [route(lg, r.spec, getattr(r, "e_score_correction_bias", None), None, r.backend)[1]
                        for _, lg in sets]
            rf = roofline(m, t, ids_list, m["E"], bw, peak)
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
                           dtype=str(dtype).replace("torch.", ""), **{k: round(v, 2) for k, v in rf.items()})
                rows.append(row)
                log(f"{name:15s} T={t:6d} {impl:9s} {us:10.1f} us  {row['pct_roofline']:5.1f}% roofline "
                    f"{row['tflops']:7.1f} TFLOP/s")
        del sets
        torch.cuda.empty_cache()
    del layer
    torch.cuda.empty_cache()
    return rows


def bench_routing(tokens, device, log) -> list[dict]:
    """DeepSeek-V3 grouped top-k: the Triton kernel against the torch twin."""
    from .ops.api import route
    from .ops.routing import TopKSpec

    spec = TopKSpec(8, "sigmoid", True, 2.5, 8, 4)
    bias = torch.rand(256, device=device) * 0.1
    rows = []
    for t in tokens:
        sets = [(torch.randn(t, 256, device=device),) for _ in range(4)]
        from .ops.routing import route_torch

        for impl, fn in (("moekit-route", lambda lg: route(lg, spec, bias, None, "triton")),
                         ("torch-route", lambda lg: route_torch(lg, spec, bias))):
            us = time_graph(fn, sets, target_ms=10.0, replays=15)
            rows.append(dict(model="deepseek-v3-routing", tokens=t, impl=impl, us=round(us, 2), pct_roofline=None,
                             device=torch.cuda.get_device_name(device)))
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
        for model in MODELS:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moekit bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--rotations", type=int, default=4, help="input sets rotated inside the graph")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-routing", action="store_true")
    p.add_argument("--no-longcat-nozero", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moekit bench needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, a.dtype)
    tokens = [int(x) for x in a.tokens.split(",") if x]
    log = lambda s: print(s, flush=True)  # noqa: E731
    copy_bw, read_bw, peak = measure_ceilings(device)
    bw = max(copy_bw, read_bw)
    log(f"device {torch.cuda.get_device_name(device)}: copy {copy_bw / 1e12:.2f} TB/s, read {read_bw / 1e12:.2f} "
        f"TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    rows = []
    for name in [x for x in a.models.split(",") if x]:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; choose from {list(MODELS)}")
        rows += bench_model(name, tokens, dtype, device, bw, peak, a.rotations, not a.no_baseline, log)
        if name == "longcat-flash" and not a.no_longcat_nozero:
            MODELS["longcat-flash-nozero"] = dict(MODELS["longcat-flash"], Z=0)
            rows += bench_model("longcat-flash-nozero", tokens, dtype, device, bw, peak, a.rotations, False, log)
            del MODELS["longcat-flash-nozero"]
    if not a.no_routing:
        rows += bench_routing(tokens, device, log)
    summary = summarize(rows)
    for line in summary:
        log(line)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{torch.cuda.get_device_name(device).replace(' ', '_')}-{_dt.date.today().isoformat()}"
    meta = dict(copy_bw_TBps=round(copy_bw / 1e12, 3), read_bw_TBps=round(read_bw / 1e12, 3),
                bf16_peak_TFLOPs=round(peak / 1e12, 1),
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
    return 0


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
    return lines


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
