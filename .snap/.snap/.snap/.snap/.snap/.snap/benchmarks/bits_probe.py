"""Where a 4-bit kernel's bits depend on the tile config (batch invariance, SPEC §9), on one GPU.

For a format and shape, per config (the heuristic's config of several token buckets, and swapped tiles):

- ``q``: the 4-bit kernel's output for the first ``--rows`` tokens;
- ``d``: the unquantised bf16 kernel's output with the same config on the exactly dequantised weights
  (the values the 4-bit kernel's decode produces), the same tokens.

Prints, per config: q == d (the decode feeds the MMA the same values in the same K order), and for q
and d whether the rows equal those of the first config (the bucket of one token). With ``--fp32-route``
the 4-bit kernels are also run on the fp32 decode instead of the packed-bf16 PTX one.

    PYTHONPATH=src:tests python benchmarks/bits_probe.py --fmt int4 --shape 64,6,2048,768
"""

from __future__ import annotations

import argparse
import sys

import torch

from moekit.ops import triton_experts_quant as tq
from moekit.ops.formats import Int4GroupFormat, Mxfp4Format
from moekit.ops.quantize import dequantize_weight, quantize_experts
from moekit.ops.triton_configs import get_config, swap_tiles
from moekit.ops.triton_experts import fused_experts_impl

FORMATS = {"mxfp4": Mxfp4Format(), "int4": Int4GroupFormat(32)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--shape", default="64,6,2048,768", help="E,K,H,I")
    ap.add_argument("--buckets", default="1,128,256,4096")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--fp32-route", action="store_true")
    a = ap.parse_args(argv)
    e, k, h, i = map(int, a.shape.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1
    fmt = FORMATS[a.fmt]
    spec = tq.QuantSpec.of(fmt)
    g = torch.Generator().manual_seed(7)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).bfloat16()
    q13, q2, s13, s2 = quantize_experts(w13, w2, fmt)
    d13 = dequantize_weight(q13, s13, fmt, dtype=torch.bfloat16).to(dev)
    d2 = dequantize_weight(q2, s2, fmt, dtype=torch.bfloat16).to(dev)
    q13, q2, s13, s2 = (v.to(dev) for v in (q13, q2, s13, s2))
    n = a.rows
    x = torch.randn(n, h, generator=g).bfloat16().to(dev)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).int().to(dev)
    w = (torch.rand(n, k, generator=g) + 0.05).to(dev)

    cfgs = {}
    for t in map(int, a.buckets.split(",")):
        base = get_config(dev, t, e, h, i, k, torch.bfloat16, True, quant=spec.key)
        cfgs[f"T{t}"] = spec.fix_config(base, torch.bfloat16)
        rows = t * k / min(e, t * k)
        if rows <= 16 and not base["w13"].get("SWAP"):  # the heuristic's own decode tiles may be swapped already
            cfgs[f"T{t}-swap"] = spec.fix_config(swap_tiles(base, rows), torch.bfloat16)
    routes = [("ptx", True)] + ([("fp32", False)] if a.fp32_route else [])
    first = {}
    orig = tq._ptx_decode
    for name, cfg in cfgs.items():
        try:  # the bf16 kernel on the 4-bit tiles: its B tile is 4x the packed one (shared memory)
            d = fused_experts_impl(x, d13, d2, w, ids, "silu", False, None, None, None, None, config=cfg)
        except Exception as exc:  # noqa: BLE001 - e.g. OutOfResources: report the 4-bit side alone
            print(f"{name:10s} (bf16 reference: {type(exc).__name__})", flush=True)
            d = None
        if d is not None:
            first.setdefault("d", d)
        same_d = "-" if d is None else str(torch.equal(d, first["d"]))
        line = [f"{name:10s} BM={cfg['BLOCK_M']:3d} w13 BN={cfg['w13']['BN']:3d} w2 BN={cfg['w2']['BN']:3d} "
                f"swap={cfg['w13'].get('SWAP', 0)}  d==d0 {same_d:5s}"]
        for route, ptx in routes:
            tq._ptx_decode = (lambda dev_, ptx=ptx: ptx)
            try:
                q = tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, None, None, "silu", False,
                                                None, None, None, None, config=cfg)
            finally:
                tq._ptx_decode = orig
            first.setdefault(route, q)
            if d is None:
                line.append(f"{route}: q==d -     q==q0 {torch.equal(q, first[route])!s:5s}")
                continue
            diff = (q.float() - d.float()).abs().max().item()
            line.append(f"{route}: q==d {torch.equal(q, d)!s:5s} (max {diff:.3g}) q==q0 {torch.equal(q, first[route])!s:5s}")
        print("  ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
