"""Round 64: host µs per eager call of a graphed layer (the internal CUDA graphs' replay path, where
``take_graphs`` and the graph state's checks run every call), for the moekit on ``PYTHONPATH``. Run it once per
source tree in one device session (the round's base and its head) and compare the printed medians.

    PYTHONPATH=src python benchmarks/r64_host_ab.py --label head [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import moekit
from moekit.benchmarking.eager import time_host


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="head")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    e, k, h, i = 128, 8, 2048, 768  # Qwen3-30B-A3B's MoE layer
    dt, dev = torch.bfloat16, torch.device("cuda")
    layer = moekit.FusedMoE(e, k, h, i, params_dtype=dt, device=dev, backend="triton", eager_graph_tokens=64,
                            gate=torch.nn.Linear(h, e, bias=False, device=dev, dtype=dt))
    layer.load_expert_weights(torch.randn(e, 2 * i, h, device=dev, dtype=dt) * h**-0.5,
                              torch.randn(e, h, i, device=dev, dtype=dt) * i**-0.5)
    rows = {}
    with torch.no_grad():
        for t in (1, 8, 64):
            xs = [(torch.randn(t, h, device=dev, dtype=dt),) for _ in range(4)]
            xl = [(torch.randn(t, h, device=dev, dtype=dt), torch.randn(t, e, device=dev)) for _ in range(4)]
            rows[f"T={t} gate"] = time_host(layer, xs, calls=200)
            rows[f"T={t} logits"] = time_host(layer, xl, calls=200)
    for name, us in rows.items():
        print(f"{args.label} {name}: {us:.1f} us per call")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"label": args.label, "device": torch.cuda.get_device_name(), "host_us": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
