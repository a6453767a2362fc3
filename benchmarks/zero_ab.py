"""LongCat-Flash's whole layer with its zero-expert step and output combination as the torch twins' small kernels
(``twin``: ~8 + ~4 launches) or as the two Triton kernels of round 36 (``fused``: ``moekit.ops.triton_zero``), the
rest of the layer the same. Graph µs (median), alternated ``--rounds`` times, and the outputs compared bit for bit.

    PYTHONPATH=src python benchmarks/zero_ab.py --tokens 1,8,64,1024 --out zero_ab.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops.zero_experts import zero_combine_torch, zero_slots_torch
from quant_probe import save_rows  # benchmarks/: the script's own folder


def use(layer, kernels) -> None:
    """Run ``layer``'s router and experts on the kernel table ``kernels``."""
    layer.router.kernels = layer.routed_experts.kernels = kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="longcat-flash")
    ap.add_argument("--tokens", default="1,8,64,1024")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    m = MODELS[a.model]
    torch.manual_seed(0)
    layer = build_layer(m, torch.bfloat16, dev).eval()
    layer.eager_graph_tokens = 0  # no internal bucket graphs: each call runs the ops the kernel tables hold now
    fused = layer.routed_experts.kernels
    tables = {"twin": dataclasses.replace(fused, zero_slots=zero_slots_torch, zero_combine=zero_combine_torch),
              "fused": fused}
    rows = []
    for t in map(int, a.tokens.split(",")):
        g = torch.Generator(device=dev).manual_seed(t)
        sets = [(torch.randn(t, m.H, device=dev, generator=g).bfloat16(),
                 torch.randn(t, m.E + m.Z, device=dev, generator=g)) for _ in range(4)]
        outs, times = {}, {name: [] for name in tables}
        with torch.no_grad():
            for name, kernels in tables.items():
                use(layer, kernels)
                outs[name] = layer(*sets[0])
            for _ in range(a.rounds):
                for name, kernels in tables.items():
                    use(layer, kernels)
                    times[name].append(time_graph(lambda x, lg: layer(x, lg), sets, target_ms=8.0, replays=5))
        use(layer, fused)
        same = bool(torch.equal(outs["twin"], outs["fused"]))
        print(f"{a.model} T={t:6d} | twin {'/'.join(f'{u:.1f}' for u in times['twin'])}  fused "
              f"{'/'.join(f'{u:.1f}' for u in times['fused'])} | same bits {same}", flush=True)
        rows.append(dict(model=a.model, tokens=t, us=times, same_bits=same))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
