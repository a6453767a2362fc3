"""Expert-parallel benchmark: dispatch + combine latency (all-to-all vs all-gather/reduce-scatter) and
the whole DeepSeek-V3-shaped layer (E256 k8 H7168 I2048, grouped sigmoid + bias, bf16) on W GPUs versus 1.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD/src \\
        torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --out benchmarks/results/parallel-h200-DATE.json

Timing: ``moekit.benchmarking.time_events`` (CUDA events around each call on every rank, the calls
include the layout's host sync), the median over iterations per rank, then the maximum over ranks.
The shape is ``moekit.benchmarking.MODELS["deepseek-v3"]``; ``--cpu-smoke`` shrinks it (gloo, CPU). The single-GPU baseline runs on rank 0
alone with ``T`` (same tokens per GPU) and ``W·T`` (same total tokens) tokens.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

import moekit
from moekit._argparse import OneLineParser, int_list, out_file, positive_int
from moekit.benchmarking import MODELS, ModelShape, time_events

SHAPE = MODELS["deepseek-v3"]
SMOKE = SHAPE.replace(E=16, K=4, H=64, I=32, groups=4, topk_group=2)  # --cpu-smoke: tiny widths


def parse():
    # (round 62: the arguments and --out checked before the process group, one line each, not after the run)
    ap = OneLineParser(prog="bench_parallel.py")
    ap.add_argument("--tokens", type=int_list, default=[2**i for i in range(13)])
    ap.add_argument("--iters", type=positive_int, default=20)
    ap.add_argument("--layer-iters", type=positive_int, default=7)
    ap.add_argument("--experts-backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--out", type=out_file, default=None)
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, tiny shapes: checks the script runs")
    return ap.parse_args()


def timed(fn, iters: int, warmup: int = 2, barrier: bool = True) -> float:
    """Median milliseconds of ``fn()`` on this rank, after a barrier unless ``barrier=False`` (one rank alone)."""
    sync = dist.barrier if barrier and dist.is_initialized() else None
    return time_events(fn, iters, warmup=warmup, before=sync)


def max_over_ranks(v: float, device) -> float:
    t = torch.tensor([v], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def routing_inputs(m: ModelShape, t: int, device, seed: int):
    """x [T, H] bf16 and router logits [T, E] f32 from a per-device generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, m.H, device=device, dtype=torch.bfloat16, generator=g)
    logits = torch.randn(t, m.E, device=device, dtype=torch.float32, generator=g)
    return x, logits


def build(m: ModelShape, device, backend, ep_group=None):
    """The layer of shape ``m`` (its global experts loaded; each rank keeps its share)."""
    bias = torch.linspace(-0.1, 0.1, m.E, device=device)
    layer = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=torch.bfloat16, e_score_correction_bias=bias,
                            device=device, backend=backend, ep_group=ep_group, **m.layer_kwargs())
    g = torch.Generator(device=device).manual_seed(0)  # the same global weights on every rank
    rows = (2 if m.gated else 1) * m.I
    w13 = torch.randn(m.E, rows, m.H, device=device, dtype=torch.bfloat16, generator=g) * m.H**-0.5
    w2 = torch.randn(m.E, m.H, m.I, device=device, dtype=torch.bfloat16, generator=g) * m.I**-0.5
    layer.load_expert_weights(w13, w2)
    return layer


def main():
    args = parse()
    m = SMOKE if args.cpu_smoke else SHAPE
    if args.cpu_smoke:
        dist.init_process_group("gloo")
        dev = torch.device("cpu")
    else:
        dist.init_process_group("nccl")
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = args.tokens
    backend = args.experts_backend
    if backend == "auto" and dev.type == "cuda":
        try:
            import moekit.ops.triton_experts  # noqa: F401
        except Exception:
            backend = "torch"  # the Triton experts are not in this tree
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)", "gpus": world,
        "torch": torch.__version__, "experts_backend": backend,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dev.type == "cuda" else None,
        "shape": {"E": m.E, "K": m.K, "H": m.H, "I": m.I, "groups": m.groups, "topk_group": m.topk_group,
                  "dtype": "bfloat16"},
        "timing": "CUDA events per call, median over iterations per rank, max over ranks (ms)",
        "date": time.strftime("%Y-%m-%d"), "dispatch_combine": [], "layer": [], "single_gpu": [],
    }
    group = dist.group.WORLD
    layer = build(m, dev, backend, ep_group=group)
    try:  # the Triton experts are another contributor's; if they fail here, measure with torch and say so
        with torch.inference_mode():
            layer(*routing_inputs(m, 8, dev, 1))
        ok = torch.tensor([1], device=dev)
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        res["experts_backend_error"] = f"{type(exc).__name__}: {exc}"[:500]
        ok = torch.tensor([0], device=dev)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 0 and backend != "torch":
        backend = res["experts_backend"] = "torch"
        del layer
        layer = build(m, dev, backend, ep_group=group)
        if rank == 0:
            print("experts backend failed, using torch:", res.get("experts_backend_error"), flush=True)
    ex = layer.expert_executor

    def identity(x, w, ids):
        return x

    # 1) dispatch + combine alone (identity experts), routing of the real router
    for t in tokens:
        x, lg = routing_inputs(m, t, dev, 100 + rank)
        w, ids = layer.router.select_experts(x, lg)
        for mode in ("all_to_all", "all_gather"):
            ms = timed(lambda: ex.run_ep(x, w, ids, identity, False, mode=mode), args.iters)
            res["dispatch_combine"].append({"tokens_per_rank": t, "mode": mode, "ms": max_over_ranks(ms, dev)})
        if rank == 0:
            print("dispatch+combine", res["dispatch_combine"][-2:], flush=True)

    # 2) the whole layer on W GPUs, each dispatcher forced and auto
    with torch.inference_mode():
        for t in tokens:
            x, lg = routing_inputs(m, t, dev, 200 + rank)
            for mode in ("all_to_all", "all_gather", "auto"):
                ex.mode = mode
                ms = timed(lambda: layer(x, lg), args.layer_iters, warmup=1)
                res["layer"].append({"tokens_per_rank": t, "mode": mode, "chosen": ex.last_mode,
                                     "ms": max_over_ranks(ms, dev)})
            if rank == 0:
                print("layer", res["layer"][-3:], flush=True)
    del layer, ex
    torch.cuda.empty_cache()

    # 3) one GPU holding all 256 experts, same tokens per GPU (T) and same total tokens (W·T)
    if not args.skip_single and rank == 0:
        single = build(m, dev, backend)
        with torch.inference_mode():
            for t in tokens:
                for n in sorted({t, world * t}):
                    x, lg = routing_inputs(m, n, dev, 300)
                    ms = timed(lambda: single(x, lg), args.layer_iters, warmup=1, barrier=False)
                    res["single_gpu"].append({"tokens": n, "ms": ms})
                print("single", res["single_gpu"][-2:], flush=True)
        del single
    dist.barrier()
    if rank == 0 and args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
