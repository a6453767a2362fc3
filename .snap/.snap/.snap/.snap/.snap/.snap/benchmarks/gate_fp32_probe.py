"""A float32 router gate over bf16 inputs, three ways, on a GPU: ``F.linear(x.float(), w.float())`` (cuBLAS FFMA
sgemm plus two upcast copies: the torch backend of ``RouterLinear(fp32=True)``), ``torch.mm(x, w.t(),
out_dtype=torch.float32)`` (cuBLAS on bf16 tensor cores) and moekit's Triton gate (``router_gate_triton``:
the Triton backend, batch invariant); and the bf16-output gate, cuBLAS ``F.linear`` against the Triton gate.

Per T: GPU µs of each (CUDA graph replay, ``time_graph``), the largest |difference| against the first relative
to max |logit|, and how many tokens' top-k sets (sigmoid scores) differ from the first's.

    PYTHONPATH=src python benchmarks/gate_fp32_probe.py [--tokens 1,8,64,1024,2048] [--H 7168] [--E 256]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moekit.benchmarking import time_graph
from moekit.ops.triton_gate import router_gate_triton


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64,1024,2048")
    ap.add_argument("--H", type=int, default=7168)
    ap.add_argument("--E", type=int, default=256)
    ap.add_argument("--K", type=int, default=8)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.E, args.H, generator=g) * args.H ** -0.5).to("cuda", torch.bfloat16)
    print(f"H={args.H} E={args.E}")
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, args.H, generator=g).to("cuda", torch.bfloat16)
        ways = {
            "fp32 F.linear(upcast)": lambda: F.linear(x.float(), w.float()),
            "fp32 mm(out_dtype)": lambda: torch.mm(x, w.t(), out_dtype=torch.float32),
            "fp32 triton gate": lambda: router_gate_triton(x, w, None, torch.float32),
            "bf16 F.linear": lambda: F.linear(x, w),
            "bf16 triton gate": lambda: router_gate_triton(x, w, None, torch.bfloat16),
        }
        ref = ways["fp32 F.linear(upcast)"]()
        top = torch.sigmoid(ref).topk(args.K).indices.sort().values
        for name, fn in ways.items():
            out = fn().float()
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            flips = int((torch.sigmoid(out).topk(args.K).indices.sort().values != top).any(dim=1).sum())
            us = time_graph(fn, [()], target_ms=20.0)
            print(f"T={t:5d}  {name:22s} {us:7.1f} us   max rel diff {rel:.2e}   tokens with another top-{args.K}: {flips}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
