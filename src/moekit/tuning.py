"""``moekit tune``: benchmark candidate Triton configs for a MoE shape and write a JSON config file.

For each token count the search is a coordinate descent from the heuristic config: for each
candidate ``BLOCK_M`` it times w13-kernel candidates (w2 fixed), then w2-kernel candidates with the
best w13, each as one whole ``fused_experts`` call captured in a CUDA graph (median of replays).
The winner per token bucket goes to ``<out>/<device>.json`` (merged with entries already there);
point ``MOEKIT_CONFIG_DIR`` at ``<out>`` to use it, or copy it into ``moekit/configs/``.

    moekit tune --experts 256 --hidden 7168 --inter 2048 --top-k 8 --tokens 1,64,1024,4096
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .ops.triton_configs import device_key, heuristic_config, shape_key

#: (BN, BK, num_warps, num_stages) candidates per regime of rows per expert
SMALL = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)]
MEDIUM = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3)]
LARGE_W13 = [(64, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]
LARGE_W2 = [(128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4)]


def candidates(rows: float, bm_default: int) -> tuple[list[int], list, list]:
    if rows <= 40:
        bms = sorted({bm_default, min(128, bm_default * 2)})
        return bms, SMALL, SMALL
    if rows <= 200:
        return sorted({64, 128, bm_default}), MEDIUM, MEDIUM
    return [128], LARGE_W13, LARGE_W2


def _cfg(bm, c13, c2, group_m=8) -> dict:
    mk = lambda c: dict(BN=c[0], BK=c[1], GROUP_M=group_m, num_warps=c[2], num_stages=c[3])  # noqa: E731
    return {"BLOCK_M": bm, "w13": mk(c13), "w2": mk(c2)}


def make_problem(t, e, h, i, k, dtype, act, has_bias, device, seed=0, weights=None):
    """(x, w1, w2, topk_weights, topk_ids, b1, b2); ``weights`` = (w1, w2, b1, b2) to reuse."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows = i if act == "relu2" else 2 * i
    x = torch.randn(t, h, device=device, dtype=dtype, generator=g)
    if weights is None:
        w1 = torch.randn(e, rows, h, device=device, dtype=dtype, generator=g) * h**-0.5
        w2 = torch.randn(e, h, i, device=device, dtype=dtype, generator=g) * i**-0.5
        b1 = torch.randn(e, rows, device=device, dtype=dtype, generator=g) * 0.05 if has_bias else None
        b2 = torch.randn(e, h, device=device, dtype=dtype, generator=g) * 0.05 if has_bias else None
    else:
        w1, w2, b1, b2 = weights
    logits = torch.randn(t, e, device=device, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return x, w1, w2, w / w.sum(-1, keepdim=True), ids.int(), b1, b2


def time_config(problem, act, cfg) -> float:
    from .bench import time_graph
    from .ops.triton_experts import fused_experts_impl

    x, w1, w2, w, ids, b1, b2 = problem
    fn = lambda: fused_experts_impl(x, w1, w2, w, ids, act, False, b1, b2, None, None, config=cfg)  # noqa: E731
    return time_graph(fn, [()], target_ms=8.0, replays=5)


def precompile(problem, act, cfgs, log) -> None:
    """Compile every candidate's kernels in parallel threads (Triton's async compile mode)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from .ops.triton_experts import fused_experts_impl

    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # older Triton: compile lazily, one by one
        return
    x, w1, w2, w, ids, b1, b2 = problem
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        with AsyncCompileMode(pool, ignore_errors=True):
            for cfg in cfgs:
                try:
                    fused_experts_impl(x, w1, w2, w, ids, act, False, b1, b2, None, None, config=cfg, warmup=True)
                except Exception as exc:
                    log(f"  precompile {cfg}: {type(exc).__name__}")
    log(f"  precompiled {len(cfgs)} configs in {time.time() - t0:.1f} s")


def same_output(problem, act, cfg_a, cfg_b) -> bool:
    """A tuned config must compute what the heuristic one does (relative RMS difference < 1e-2)."""
    from .ops.triton_experts import fused_experts_impl

    x, w1, w2, w, ids, b1, b2 = problem
    outs = [fused_experts_impl(x, w1, w2, w, ids, act, False, b1, b2, None, None, config=c).float()
            for c in (cfg_a, cfg_b)]
    diff = ((outs[0] - outs[1]).norm() / outs[1].norm().clamp_min(1e-30)).item()
    return bool(torch.isfinite(outs[0]).all()) and diff < 1e-2


def tune_shape(e, h, i, k, dtype, act, has_bias, tokens, device, budget_s, log) -> dict:
    from tqdm import tqdm

    gated = act != "relu2"
    result = {}
    deadline = time.time() + budget_s
    w_shared = None
    for t in tqdm(tokens, desc=f"E={e} H={h} I={i} K={k}", leave=False):
        if time.time() > deadline:
            log(f"  budget spent: T={t} and above keep the heuristic")
            break
        prob = make_problem(t, e, h, i, k, dtype, act, has_bias, device, weights=w_shared)
        w_shared = (prob[1], prob[2], prob[5], prob[6])  # the big weights are reused across token counts
        base = heuristic_config(t, e, h, i, k, dtype)
        rows = t * k / min(e, t * k)
        bms, c13s, c2s = candidates(rows, base["BLOCK_M"])
        tried = {}
        pre = [base] + [_cfg(bm, c13s[j % len(c13s)], c2s[j % len(c2s)]) for bm in bms
                        for j in range(max(len(c13s), len(c2s)))]
        pre += [_cfg(bm, c, tuple(base["w2"][n] for n in ("BN", "BK", "num_warps", "num_stages"))) for bm in bms
                for c in c13s]
        pre += [dict(c, tma=True) for c in pre]
        precompile(prob, act, pre, log)

        def score(cfg):
            key = json.dumps(cfg, sort_keys=True)
            if key not in tried:
                try:
                    tried[key] = time_config(prob, act, cfg)
                except Exception as exc:  # e.g. out of shared memory for this tile
                    log(f"  skip {cfg}: {type(exc).__name__}")
                    tried[key] = float("inf")
            return tried[key]

        best, best_us = base, score(base)
        for bm in bms:
            w2_fixed = tuple(base["w2"][n] for n in ("BN", "BK", "num_warps", "num_stages"))
            b13 = min(c13s, key=lambda c: score(_cfg(bm, c, w2_fixed)))
            b2 = min(c2s, key=lambda c: score(_cfg(bm, b13, c)))
            cand = _cfg(bm, b13, b2)
            for c in (cand, dict(cand, tma=True)):  # weight tiles by tensor descriptor (TMA) or by pointers
                if score(c) < best_us:
                    best, best_us = c, score(c)
        if score(dict(base, tma=True)) < best_us:
            best, best_us = dict(base, tma=True), score(dict(base, tma=True))
        if best is not base and not same_output(prob, act, best, base):
            log(f"  T={t}: {best} disagrees with the heuristic config's output: keeping the heuristic")
            best, best_us = base, score(base)
        result[str(t)] = best
        log(f"  T={t:6d}: {best_us:9.1f} us (heuristic {score(base):9.1f} us) {best}")
        del prob
    return result


BENCH_SHAPES = [  # (E, H, I, K, act, has_bias) of the models in moekit.bench
    (256, 7168, 2048, 8, "silu", False),
    (128, 2048, 768, 8, "silu", False),
    (8, 4096, 14336, 2, "silu", False),
    (128, 2880, 2880, 4, "swigluoai", True),
    (512, 6144, 2048, 12, "silu", False),
]


def tune_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moekit tune", description=__doc__.split("\n")[0])
    p.add_argument("--experts", "-E", type=int, help="local experts E")
    p.add_argument("--hidden", "-H", type=int, help="hidden size H")
    p.add_argument("--inter", "-I", type=int, help="intermediate size I (per TP shard)")
    p.add_argument("--top-k", "-K", type=int, help="experts per token K")
    p.add_argument("--activation", default="silu")
    p.add_argument("--has-bias", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", default="1,8,64,256,1024,4096,16384")
    p.add_argument("--all-bench-shapes", action="store_true", help="tune the shapes of `moekit bench`")
    p.add_argument("--skip-shapes", type=int, default=0, help="with --all-bench-shapes: start at this shape")
    p.add_argument("--budget-s", type=float, default=600.0, help="seconds per shape before falling back")
    p.add_argument("--out", default=".", help="folder of the JSON file (<device>.json)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moekit tune needs a CUDA GPU")
        return 2
    if a.all_bench_shapes:
        shapes = BENCH_SHAPES[a.skip_shapes:]
    elif None in (a.experts, a.hidden, a.inter, a.top_k):
        p.error("give --experts, --hidden, --inter and --top-k (or --all-bench-shapes)")
    else:
        shapes = [(a.experts, a.hidden, a.inter, a.top_k, a.activation, a.has_bias)]
    dtype = getattr(torch, a.dtype)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    path = Path(a.out) / f"{device_key(name)}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"device": name, "entries": {}}
    tokens = [int(x) for x in a.tokens.split(",") if x]
    log = lambda s: print(s, flush=True)  # noqa: E731
    for e, h, i, k, act, has_bias in shapes:
        key = shape_key(e, h, i, k, dtype, act != "relu2")
        log(f"tuning {key} on {name}")
        found = tune_shape(e, h, i, k, dtype, act, has_bias, tokens, device, a.budget_s, log)
        data["entries"].setdefault(key, {}).update(found)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True))  # after each shape: partial results survive
        torch.cuda.empty_cache()
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(tune_main())
