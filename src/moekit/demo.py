"""``moekit demo``: two small layers shaped like LongCat-Flash and DeepSeek-V3, checked and timed.

Each layer runs one batch on the best device available, is compared with a float64 copy of itself
on the torch reference backend, timed, and summarised with its expert-load histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

from .benchmarking.timer import time_events
from .layer import FusedMoE
from .runner import MoERunner


@dataclass(frozen=True)
class DemoShape:
    name: str
    num_experts: int
    num_zero: int
    top_k: int
    hidden: int
    inter: int
    tokens: int


LONGCAT = DemoShape("LongCat-Flash (small)", 64, 32, 12, 256, 128, 512)
DEEPSEEK = DemoShape("DeepSeek-V3 (small)", 64, 0, 8, 256, 128, 512)


class _SharedMLP(torch.nn.Module):
    """A SwiGLU MLP standing in for DeepSeek's shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(g) * u)


def build_layer(shape: DemoShape, device: torch.device, dtype: torch.dtype, backend: str = "auto") -> MoERunner:
    """A randomly initialised layer of the given shape (deterministic for a given torch seed)."""
    gen = torch.Generator().manual_seed(1234)
    total = shape.num_experts + shape.num_zero
    # selection bias small next to the scores (softmax scores ~1/(E+Z), sigmoid scores ~0.5)
    bias = (torch.randn(total, generator=gen) * (0.002 if shape.num_zero else 0.05)).to(device)
    gate = torch.nn.Linear(shape.hidden, total, bias=False)
    common = dict(params_dtype=dtype, device=device, backend=backend, e_score_correction_bias=bias, gate=gate)
    if shape.num_zero:
        layer = FusedMoE(
            shape.num_experts, shape.top_k, shape.hidden, shape.inter,
            renormalize=False, zero_expert_type="identity", routed_scaling_factor=6.0, prefix="longcat", **common,
        )
    else:
        layer = FusedMoE(
            shape.num_experts, shape.top_k, shape.hidden, shape.inter,
            use_grouped_topk=True, num_expert_group=8, topk_group=4, scoring_func="sigmoid",
            routed_scaling_factor=2.5, shared_experts=_SharedMLP(shape.hidden, 2 * shape.inter),
            prefix="deepseek_v3", **common,
        )
    re = layer.routed_experts
    with torch.no_grad():  # random expert weights made in place, then loaded from themselves
        re.w13_weight.normal_(0, shape.hidden**-0.5)
        re.w2_weight.normal_(0, shape.inter**-0.5)
    layer.load_expert_weights(re.w13_weight, re.w2_weight)
    return layer.to(device=device, dtype=dtype)


def reference_copy(layer: MoERunner, shape: DemoShape) -> MoERunner:
    """The same layer (same parameters and buffers) in float64 on the CPU, built on the torch backend."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
        ref = build_layer(shape, torch.device("cpu"), torch.float64, backend="torch")
    mine = dict(chain(layer.named_parameters(), layer.named_buffers()))
    with torch.no_grad():
        for name, t in chain(ref.named_parameters(), ref.named_buffers()):
            if name not in ("routed_experts.w13_weight", "routed_experts.w2_weight"):  # loaded below, once
                t.copy_(mine[name])
    re = layer.routed_experts
    ref.load_expert_weights(re.w13_weight.double().cpu(), re.w2_weight.double().cpu())
    return ref


def histogram(counts: list[int], width: int = 40, bins: int = 8) -> list[str]:
    """Text histogram of per-expert token counts: how many experts fall in each load bucket."""
    lo, hi = min(counts), max(counts)
    step = max(1, -(-(hi - lo + 1) // bins))
    rows = []
    buckets = [0] * bins
    for c in counts:
        buckets[min(bins - 1, (c - lo) // step)] += 1
    peak = max(buckets) or 1
    for b, n in enumerate(buckets):
        a = lo + b * step
        bar = "#" * max(1 if n else 0, round(width * n / peak))
        rows.append(f"    {a:>6}-{a + step - 1:<6} tokens | {bar:<{width}} {n} experts")
    return rows


def run_demo(device: str | None = None, dtype: str | None = None, repeats: int = 5) -> bool:
    """Build, check and time both demo layers; print the report; True when both match their reference.

    device: "cpu", "cuda" or "cuda:N" (default: CUDA when available); dtype: a torch dtype name
    (default: bfloat16 on CUDA, float32 on CPU); repeats: timed calls per layer (>= 1).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    print(f"moekit demo on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), dtype {dt}")
    ok = True
    for shape in (LONGCAT, DEEPSEEK):
        layer = build_layer(shape, dev, dt)
        x = torch.randn(shape.tokens, shape.hidden, device=dev, dtype=dt)
        with torch.no_grad():
            # one set of router logits for both: a bf16 gate would otherwise flip near-tied experts
            logits = layer.gate(x)
            out = layer(x, logits)
            ref = reference_copy(layer, shape)(x.to("cpu", torch.float64), logits.to("cpu", torch.float64))
            routing = layer.router(x, logits)  # (forward: route on x's device, made current: round 69)
            seconds = time_events(lambda: layer(x), repeats, warmup=1, device=dev) / 1e3
        err = (out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)
        tol = 1e-4 if dt == torch.float32 else 1e-2
        passed = bool(err <= tol) and out.shape == x.shape
        ok &= passed
        ids = routing.topk_ids[routing.topk_weights != 0] if shape.num_zero else routing.topk_ids.flatten()
        counts = torch.bincount(ids.long().cpu(), minlength=shape.num_experts).tolist()
        zero_share = ""
        if shape.num_zero:
            zero_slots = shape.tokens * shape.top_k - len(ids)
            zero_share = f", {zero_slots / (shape.tokens * shape.top_k):.0%} of slots to zero experts"
        print(f"\n{shape.name}: E={shape.num_experts} Z={shape.num_zero} K={shape.top_k} H={shape.hidden} "
              f"I={shape.inter}, T={shape.tokens}")
        print(f"  router {type(layer.router).__name__}, backend {layer.backend!r}")
        print(f"  time per call {seconds * 1e3:.2f} ms ({shape.tokens / seconds:,.0f} tokens/s)")
        print(f"  vs float64 reference: relative error {float(err):.2e} (tolerance {tol:g}) "
              f"-> {'OK' if passed else 'FAILED'}")
        print(f"  expert load: min {min(counts)}, mean {sum(counts) / len(counts):.1f}, max {max(counts)}{zero_share}")
        print("\n".join(histogram(counts)))
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return ok
