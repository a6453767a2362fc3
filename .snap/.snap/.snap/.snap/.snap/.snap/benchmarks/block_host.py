"""Host µs of an eager patched transformers MoE block, piece by piece (inclusive), on a GPU.

``block_trace.py`` shows where the GPU waits for the host; the profiler inflates every host op, so this
measures the host side without it. Per model and batch x seq shape: the block's host µs per call
(``time_host``: median of 5 blocks of 100 calls back to back), then the same calls with timing wrappers
(``perf_counter``, ~0.2 µs each) around the layer's pieces: the adapter, ``MoERunner.forward`` / ``_forward``,
the whole-graph lookup, the direct bucket replay, ``forward_with_scores`` and its unpacking, the checks, the gate,
the graph-state image, the graph cache's call and replay, the shared experts. Inclusive µs per block call (a piece's time holds the pieces it calls).

    PYTHONPATH=src:benchmarks python benchmarks/block_host.py --models deepseek_v3 --shapes 64x1,1x1024 \
        [--graph-tokens N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections import defaultdict

import torch

from block_trace import block_inputs, write_json
from moekit.benchmarking.eager import back_to_back, time_host


def _wrap(owner, name: str, label: str, acc: dict, undo: list) -> None:
    raw = inspect.getattr_static(owner, name)
    fn = raw.__func__ if isinstance(raw, staticmethod) else getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t

    setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)
    undo.append((owner, name, raw))


def pieces(block, acc: dict) -> list:
    """Install the wrappers; returns the undo list."""
    from moekit import runner
    from moekit.experts import graphed, graphed_plan

    undo: list = []
    moe = block.moe
    _wrap(type(block), "forward", "adapter.forward", acc, undo)
    _wrap(runner.MoERunner, "forward", "runner.forward", acc, undo)
    _wrap(runner.MoERunner, "_forward", "runner._forward", acc, undo)
    _wrap(runner.MoERunner, "forward_with_scores", "runner.forward_with_scores", acc, undo)
    _wrap(graphed_plan, "unpack_scores", "unpack_scores", acc, undo)
    _wrap(runner, "replay_whole", "replay_whole (miss)", acc, undo)
    _wrap(runner, "replay_bucket", "replay_bucket (direct)", acc, undo)
    _wrap(runner, "capture_whole", "capture_whole (not whole)", acc, undo)
    _wrap(runner, "check_hidden", "check_hidden", acc, undo)
    _wrap(runner, "check_routed_input", "check_routed_input", acc, undo)
    _wrap(runner.MoERunner, "_logits", "_logits (gate)", acc, undo)
    _wrap(runner.MoERunner, "_graph_state", "_graph_state", acc, undo)
    _wrap(graphed.GraphCache, "eligible", "GraphCache.eligible", acc, undo)
    _wrap(graphed.GraphCache, "__call__", "GraphCache.__call__", acc, undo)
    _wrap(graphed.GraphCache, "replay", "GraphCache.replay", acc, undo)
    _wrap(torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay", acc, undo)
    if moe.shared_experts is not None:
        _wrap(type(moe.shared_experts), "forward", "shared_experts", acc, undo)
    if moe.gate is not None:
        _wrap(type(moe.gate), "forward", "gate.forward", acc, undo)
    return undo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deepseek_v3")
    ap.add_argument("--shapes", default="64x1,1x1024")
    ap.add_argument("--graph-tokens", type=int, default=None)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    result = {}
    for key, shape, block, x in block_inputs(args.models, args.shapes, device, args.tiny, args.graph_tokens):
        row = {}
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
                row["host_us"] = round(time_host(lambda: block(x), [()], args.calls), 1)
            acc: dict = defaultdict(float)
            undo = pieces(block, acc)
            try:
                if cuda:
                    torch.cuda.synchronize()
                host, wall = back_to_back(lambda: block(x), [()], args.calls, cuda)
                for v in acc:  # back to back, a full launch queue blocks inside some piece: pieces from
                    acc[v] = 0.0  # calls each started on an idle GPU instead (synchronised between calls)
                for _ in range(args.calls):
                    if cuda:
                        torch.cuda.synchronize()
                    block(x)
                if cuda:
                    torch.cuda.synchronize()
            finally:
                for owner, name, fn in reversed(undo):
                    setattr(owner, name, fn)
        row["wrapped_host_us"], row["wrapped_wall_us"] = round(host, 1), round(wall, 1)
        row["pieces_us"] = {k: round(v / args.calls * 1e6, 1) for k, v in acc.items()}
        name = f"{key} graph_tokens={args.graph_tokens} {shape}"
        print(f"\n== {name}: host {row.get('host_us')} us per call (wrapped {row['wrapped_host_us']}, "
              f"wall {row['wrapped_wall_us']})")
        for k, v in row["pieces_us"].items():
            print(f"   {v:8.1f}  {k}")
        result[name] = row
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
