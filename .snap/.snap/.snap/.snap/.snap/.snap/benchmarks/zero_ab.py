"""LongCat-Flash's whole layer with its zero-expert step and output combination as the torch twins' small kernels
(``twin``: ~8 + ~4 launches, plus one add per slot for the slot-order sum), as round 35 ran them (``r35``: the
slots' weights summed by one ``sum``, ~K fewer launches than ``twin``) or as the two Triton kernels of round 36
(``fused``: ``moekit.ops.triton_zero``), the rest of the layer the same. Graph µs (median), alternated ``--rounds``
times (each round rotates the order: in round 37 the variant timed last ran ~5 % slow at T = 1024); ``twin`` and
``fused`` compared bit for bit, ``r35`` (another summation order) by its largest difference.

    PYTHONPATH=src python benchmarks/zero_ab.py --tokens 1,8,64,1024 --out zero_ab.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.shapes import MODELS
from moekit.ops.zero_experts import mask_zero_experts, zero_combine_torch, zero_slots_torch
from quant_probe import save_rows, time_alternated  # benchmarks/: the script's own folder


def zero_slots_r35(topk_weights, topk_ids, num_experts):
    """Round 35's zero-expert step (before the slot-order sum): the zero slots' weights summed by one ``sum``.
    topk_weights: [T, K] float32; topk_ids: [T, K] int -> (weights, ids) masked, s: [T] float32."""
    is_zero = topk_ids >= num_experts
    scale = torch.where(is_zero, topk_weights.float(), torch.zeros((), device=topk_weights.device)).sum(-1)
    w, ids = mask_zero_experts(topk_weights, topk_ids, num_experts)
    return w, ids, scale


def eager_layer(model: str):
    """(the shape ``MODELS[model]``, its bf16 layer on the GPU with random weights (seed 0), no internal bucket graphs:
    each call runs the ops its kernel tables hold) for the zero-expert scripts (this one, ``zero_mem.py``)."""
    m = MODELS[model]
    torch.manual_seed(0)
    layer = build_layer(m, torch.bfloat16, torch.device("cuda")).eval()
    layer.eager_graph_tokens = 0
    return m, layer


def use(layer, kernels) -> None:
    """Run ``layer``'s router and experts on the kernel table ``kernels``."""
    layer.router.kernels = layer.routed_experts.kernels = kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="longcat-flash")
    ap.add_argument("--tokens", default="1,8,64,1024")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--order", default="fused,twin,r35",
                    help="the variants in the order the first round times them (the next rounds rotate it)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    m, layer = eager_layer(a.model)
    fused = layer.routed_experts.kernels
    every = {"r35": dataclasses.replace(fused, zero_slots=zero_slots_r35, zero_combine=zero_combine_torch),
             "twin": dataclasses.replace(fused, zero_slots=zero_slots_torch, zero_combine=zero_combine_torch),
             "fused": fused}
    if sorted(a.order.split(",")) != sorted(every):
        ap.error(f"--order {a.order!r}: expected the three variants {sorted(every)} in some order")
    tables = {name: every[name] for name in a.order.split(",")}
    rows = []
    for t in map(int, a.tokens.split(",")):
        g = torch.Generator(device=dev).manual_seed(t)
        sets = [(torch.randn(t, m.H, device=dev, generator=g).bfloat16(),
                 torch.randn(t, m.E + m.Z, device=dev, generator=g)) for _ in range(4)]
        outs = {}
        with torch.no_grad():
            for name, kernels in tables.items():
                use(layer, kernels)
                outs[name] = layer(*sets[0])
            times = time_alternated({name: layer for name in tables}, sets, a.rounds,
                                    before=lambda name: use(layer, tables[name]))
        use(layer, fused)
        same = bool(torch.equal(outs["twin"], outs["fused"]))
        r35_diff = (outs["r35"].float() - outs["fused"].float()).abs().max().item() if t else 0.0
        print(f"{a.model} T={t:6d} | " + "  ".join(f"{n} {'/'.join(f'{u:.1f}' for u in v)}" for n, v in times.items())
              + f" | twin = fused bits {same}, r35 max diff {r35_diff:.3g}", flush=True)
        rows.append(dict(model=a.model, tokens=t, us=times, same_bits=same, r35_max_abs_diff=r35_diff))
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
