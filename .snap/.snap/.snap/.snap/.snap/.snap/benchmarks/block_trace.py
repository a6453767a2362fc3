"""Where an eager transformers MoE block call waits on the host: one call's CPU ops and GPU kernels on one clock.

``bench_transformers.py`` times the block eagerly as CUDA events around one call after a synchronisation, so the
GPU sits idle whenever the host has not enqueued the next kernel yet. This script builds the same model
(``bench_transformers.MODELS``), patches it with moekit (``--graph-tokens``: ``eager_graph_tokens``, default the
model's own limit) and, per batch x seq shape, profiles a few such calls with ``torch.profiler`` (CPU + CUDA).
For the median call it prints each GPU kernel (or graph replay) with its start, its duration and the GPU idle
time before it; a timeline of the host's launch calls and the GPU's kernels on one clock; then the call's GPU busy / idle / span µs and the
top host ops by self CPU time.

    PYTHONPATH=src:benchmarks python benchmarks/block_trace.py --models deepseek_v3 --shapes 64x1,1x1024 \
        [--graph-tokens N] [--variant patched|grouped_mm] [--out FILE.json]

``--tiny`` shrinks the widths (a CPU smoke test: no CUDA kernels, host ops only).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import bench_transformers as bt


def _build(key: str, device, tiny: bool):
    import transformers

    shape_name, cfg_name, model_name, moe_kwargs, rest = bt.MODELS[key]
    kw = {**moe_kwargs(bt.get_shape(shape_name)), **rest}
    if tiny:
        kw.update({k: v for k, v in bt.TINY.items() if k in kw})
    config = getattr(transformers, cfg_name)(**kw)
    with torch.device(device):
        model = getattr(transformers, model_name)._from_config(config, dtype=torch.bfloat16)
    return model.eval(), config


def block_input(shape: str, hidden: int, device) -> torch.Tensor:
    """``x [B, S, hidden]`` bf16 for ``shape`` "BxS" (seeded by the shape, as ``bench_transformers`` seeds it)."""
    b, s = (int(v) for v in shape.split("x"))
    g = torch.Generator(device="cpu").manual_seed(b * 100003 + s)
    return (torch.randn(b, s, hidden, generator=g) * 0.5).to(device=device, dtype=torch.bfloat16)


def block_inputs(models: str, shapes: str, device, tiny: bool, graph_tokens, patched: bool = True):
    """Yield ``(model key, "BxS", MoE block, x [B, S, H] bf16)`` per model and shape: the model built as
    ``bench_transformers`` builds it, patched with moekit (``eager_graph_tokens=graph_tokens``) or left on
    ``grouped_mm``, each block called 5 times first (compiles, graph captures)."""
    for key in models.split(","):
        model, config = _build(key, device, tiny)
        model.set_experts_implementation("grouped_mm")
        if patched:
            from moekit.integrations.transformers import patch

            patch(model, eager_graph_tokens=graph_tokens)
        block = bt._moe_block(model)
        for shape in shapes.split(","):
            x = block_input(shape, config.hidden_size, device)
            with torch.inference_mode():
                for _ in range(5):
                    block(x)
            yield key, shape, block, x
        del model, block
        if device.type == "cuda":
            torch.cuda.empty_cache()


def write_json(result: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def _events(prof):
    """(cpu ops, gpu kernels, launch calls): lists of dicts with name, start, end (µs on the profiler's clock)."""
    cpu, gpu, launches = [], [], []
    for e in prof.events():
        rng = e.time_range
        row = dict(name=e.name, start=rng.start, end=rng.end)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu.append(row)
        else:
            cpu.append(row)
            if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                          "cudaMemcpyAsync", "cudaMemsetAsync", "cudaLaunchKernelExC"):
                launches.append(row)
    return cpu, gpu, launches


def trace_calls(fn, calls: int, cuda: bool):
    """Profile ``calls`` calls, each after a synchronisation (as ``time_events`` times them); return per call
    (cpu ops, gpu kernels, wall µs)."""
    out = []
    for _ in range(calls):
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            with torch.inference_mode():
                fn()
            if cuda:
                torch.cuda.synchronize()
        out.append((prof, *_events(prof)))
    return out


def summarise(prof, cpu, gpu, launches, top: int = 12) -> dict:
    t0 = min([r["start"] for r in cpu] or [0.0])
    gpu = sorted(gpu, key=lambda r: r["start"])
    rows, busy, idle, last = [], 0.0, 0.0, None
    for r in gpu:
        gap = (r["start"] - last) if last is not None else (r["start"] - t0)
        if last is not None and gap > 0:
            idle += gap
        busy += r["end"] - r["start"]
        rows.append(dict(kernel=r["name"][:90], start_us=round(r["start"] - t0, 1),
                         dur_us=round(r["end"] - r["start"], 1), gap_before_us=round(gap, 1)))
        last = max(last or r["end"], r["end"])
    span = (gpu[-1]["end"] - gpu[0]["start"]) if gpu else 0.0
    host_end = max([r["end"] for r in cpu] or [t0])
    timeline = sorted([("G", r["start"], r["end"], r["name"]) for r in gpu]
                      + [("H", r["start"], r["end"], r["name"]) for r in launches], key=lambda v: v[1])
    hot = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    return dict(kernels=rows, gpu_busy_us=round(busy, 1), gpu_idle_inside_us=round(idle, 1),
                gpu_span_us=round(span, 1), first_kernel_at_us=rows[0]["start_us"] if rows else None,
                host_us=round(host_end - t0, 1),
                timeline=[f"{k} {a - t0:9.1f} +{b - a:8.1f}  {n[:90]}" for k, a, b, n in timeline],
                top_host_ops=[dict(name=a.key[:80], self_cpu_us=round(a.self_cpu_time_total, 1), calls=a.count)
                              for a in hot])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deepseek_v3")
    ap.add_argument("--shapes", default="64x1,1x1024")
    ap.add_argument("--graph-tokens", type=int, default=None)
    ap.add_argument("--variant", default="patched", choices=["patched", "grouped_mm"])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    result = {}
    for key, shape, block, x in block_inputs(args.models, args.shapes, device, args.tiny, args.graph_tokens,
                                             args.variant == "patched"):
        calls = trace_calls(lambda: block(x), args.calls, cuda)
        summaries = [summarise(*c) for c in calls]
        summaries.sort(key=lambda r: r["gpu_span_us"] + (r["first_kernel_at_us"] or 0.0))
        med = summaries[len(summaries) // 2]
        name = f"{key} {args.variant} graph_tokens={args.graph_tokens} {shape}"
        print(f"\n== {name}: first kernel at {med['first_kernel_at_us']} us, GPU busy {med['gpu_busy_us']} us, "
              f"idle inside {med['gpu_idle_inside_us']} us, span {med['gpu_span_us']} us, host {med['host_us']} us")
        for r in med["kernels"]:
            print(f"  {r['start_us']:9.1f} +{r['dur_us']:8.1f}  gap {r['gap_before_us']:7.1f}  {r['kernel']}")
        print("  timeline (H: host launch call, G: GPU work; us from the call's first host op):")
        for line in med["timeline"]:
            print("   ", line)
        print("  top host ops (self CPU us, calls):")
        for r in med["top_host_ops"]:
            print(f"    {r['self_cpu_us']:9.1f} {r['calls']:4d}  {r['name']}")
        result[name] = med
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
