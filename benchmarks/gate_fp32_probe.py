"""An fp32 router gate over bf16 inputs, two ways, on a GPU: ``F.linear(x.float(), w.float())`` (FFMA sgemm, plus
two casts) against ``torch.mm(x, w.t(), out_dtype=torch.float32)`` (bf16 tensor cores, fp32 accumulation; the
bf16 products are exact in fp32 either way, the sums' order and rounding differ).

Per T: GPU µs of each (CUDA graph replay, ``time_graph``), the largest |difference| relative to max |logit|, and
how many tokens' top-k sets (DeepSeek-V3's sigmoid + bias, grouped top-k) differ between the two.

    PYTHONPATH=src python benchmarks/gate_fp32_probe.py [--tokens 1,64,1024,2048] [--H 7168] [--E 256]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moekit.benchmarking import time_graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64,1024,2048")
    ap.add_argument("--H", type=int, default=7168)
    ap.add_argument("--E", type=int, default=256)
    ap.add_argument("--K", type=int, default=8)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.E, args.H, generator=g) * args.H ** -0.5).to("cuda", torch.bfloat16)
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, args.H, generator=g).to("cuda", torch.bfloat16)
        a = F.linear(x.float(), w.float())
        b = torch.mm(x, w.t(), out_dtype=torch.float32)
        rel = ((a - b).abs().max() / a.abs().max()).item()
        ta, tb = torch.sigmoid(a).topk(args.K).indices.sort().values, torch.sigmoid(b).topk(args.K).indices.sort().values
        flips = int((ta != tb).any(dim=1).sum())
        us_a = time_graph(lambda: F.linear(x.float(), w.float()), [()], target_ms=20.0)
        us_b = time_graph(lambda: torch.mm(x, w.t(), out_dtype=torch.float32), [()], target_ms=20.0)
        print(f"T={t:5d}  fp32 linear {us_a:7.1f} us   bf16 mm out fp32 {us_b:7.1f} us   max rel diff {rel:.2e}   "
              f"tokens with another top-{args.K}: {flips}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
