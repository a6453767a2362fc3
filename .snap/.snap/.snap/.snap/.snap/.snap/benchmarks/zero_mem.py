"""LongCat-Flash's whole layer (zero experts): the memory a forward allocates above the layer's own (peak minus
before, eager, no internal graphs) and its CUDA-graph time (median µs), per token count. Run once per source tree to
compare (round 56: the zero-expert contribution no longer stored as a [T, H] float32 buffer):

    PYTHONPATH=src:benchmarks python benchmarks/zero_mem.py --tokens 1,1024,16384,65536 --out zero_mem.json
"""

from __future__ import annotations

import argparse

import torch

from moekit.benchmarking.timer import time_graph
from quant_probe import save_rows  # benchmarks/: the script's own folder
from zero_ab import eager_layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="longcat-flash")
    ap.add_argument("--tokens", default="1,1024,16384,65536")
    ap.add_argument("--time-up-to", type=int, default=16384, help="graph-time token counts up to this one")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    m, layer = eager_layer(a.model)
    rows = []
    for t in map(int, a.tokens.split(",")):
        g = torch.Generator(device=dev).manual_seed(t)
        x = torch.randn(t, m.H, device=dev, generator=g).bfloat16()
        logits = torch.randn(t, m.E + m.Z, device=dev, generator=g)
        with torch.no_grad():
            layer(x, logits)  # compile / warm
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            layer(x, logits)
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - before) / 2**20
            us = time_graph(layer, [(x, logits)], target_ms=8.0, replays=5) if t <= a.time_up_to else None
        print(f"{a.model} T={t:6d} | forward's extra memory {extra:9.1f} MiB | graph "
              + (f"{us:.1f} µs" if us is not None else "-"), flush=True)
        rows.append(dict(model=a.model, tokens=t, extra_mib=extra, graph_us=us))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
