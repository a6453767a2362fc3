"""Swap-AB tiles (config ``"SWAP": 1`` per kernel) against the config in use, per weight format, on one GPU.

Per shape, token count and format (bf16, fp8 block, mxfp4, int4 g32): the lookup's config (``base``), then
variants with the weight tile on the MMA's M side: ``swap<BN>`` swaps both kernels with ``BLOCK_M`` 16 and
w13 ``BN`` = <BN>; ``swap2`` swaps only w2. For each: µs (median CUDA-graph replay per call, rotating
inputs) and whether the output equals ``base`` bit for bit (the batch-invariance question: a swapped
bucket next to an unswapped one must give a token the same bits). Prints one line per point and writes
JSON rows to ``--out``.

    PYTHONPATH=src python benchmarks/swap_probe.py --shapes deepseek-v3,gpt-oss-120b --tokens 1,8,64
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moekit.benchmarking.shapes import MODELS
from moekit.benchmarking.timer import time_graph
from moekit.ops import triton_experts_quant as tq
from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format
from moekit.ops.triton_configs import get_config, swap_tiles
from moekit.ops.triton_experts import fused_experts_impl
from quant_probe import quantise, routing_sets, save_rows, shape_weights  # benchmarks/: the script's own folder

FORMATS = {"bf16": None, "fp8": Fp8BlockFormat(128, 128), "mxfp4": Mxfp4Format(), "int4": Int4GroupFormat(32)}


def variants(cfg: dict, rows: float, probe: bool) -> dict:
    """name -> config. ``probe``: the base and three swapped variants (``swap<BN>``: both kernels, BLOCK_M 16,
    w13 BN; ``swap2``: w2 only). Otherwise the base and its alternative: unswapped (BLOCK_M 64, the
    tiles tuned before swapping existed) when the base is swapped, else :func:`swap_tiles`."""
    def sw(bn13, bm=16, both=True, bn2=None):
        w13 = dict(cfg["w13"], **({"SWAP": 1, "BN": bn13, "num_warps": 4} if both else {}))
        w2 = dict(cfg["w2"], SWAP=1, num_warps=4, **({"BN": bn2} if bn2 else {}))
        return dict(cfg, BLOCK_M=bm if both else cfg["BLOCK_M"], w13=w13, w2=w2)
    if probe:
        return {"base": cfg, "swap64": sw(64), "swap128": sw(128, bn2=128), "swap2": sw(0, both=False)}
    if cfg["w13"].get("SWAP"):
        plain = {k: v for k, v in cfg.items()}
        plain["w13"] = {k: v for k, v in cfg["w13"].items() if k != "SWAP"}
        plain["w2"] = {k: v for k, v in cfg["w2"].items() if k != "SWAP"}
        return {"base": cfg, "unswapped": dict(plain, BLOCK_M=64)}
    return {"base": cfg, "swapped": swap_tiles(cfg, min(rows, 14.0))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="deepseek-v3,gpt-oss-120b,qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--tokens", default="1,8,64,256")
    ap.add_argument("--formats", default="bf16,fp8,mxfp4,int4")
    ap.add_argument("--probe", action="store_true", help="the four fixed variants instead of base vs its alternative")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for name in a.shapes.split(","):
        m = MODELS[name]
        t0 = time.time()
        w13, w2, b1, b2, limit = shape_weights(m, dev)
        for fname in a.formats.split(","):
            fmt = FORMATS[fname]
            spec = tq.QuantSpec.of(fmt) if fmt is not None else None
            if fmt is not None:
                q13, q2, s13, s2 = quantise(w13, w2, fmt)
            for t in map(int, a.tokens.split(",")):
                sets = routing_sets(m, t, 4, dev)
                cfg0 = get_config(dev, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated,
                                  quant=spec.key if spec is not None else None)
                ref = None
                base_us = None
                rows_e = t * m.K / min(m.E, t * m.K)
                for vname, cfg in variants(cfg0, rows_e, a.probe).items():
                    if fmt is None:
                        def fn(x, w, ids, cfg=cfg, w13=w13, w2=w2):
                            return fused_experts_impl(x, w13, w2, w, ids, m.act, False, b1, b2, None, limit,
                                                      config=cfg)
                    else:
                        def fn(x, w, ids, cfg=cfg):
                            return tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, None, None, m.act,
                                                               False, b1, b2, None, limit, config=cfg)
                    try:
                        out = fn(*sets[0]).clone()
                        us = time_graph(fn, sets, target_ms=8.0, replays=5)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        print(f"{name} {fname} T={t} {vname}: FAILED {type(exc).__name__}: {str(exc)[:300]}",
                              flush=True)
                        continue
                    if ref is None:
                        ref, base_us = out, us
                    same = bool(torch.equal(out, ref))
                    diff = (out.float() - ref.float()).abs().max().item()
                    print(f"{name:14s} {fname:5s} T={t:5d} {vname:12s} {us:9.1f} us  x{base_us / us:5.2f}  "
                          f"same={same} maxdiff={diff:.3g}", flush=True)
                    rows.append(dict(model=name, fmt=fname, tokens=t, variant=vname, us=round(us, 2), same=same,
                                     maxdiff=diff, config=cfg))
        print(f"-- {name}: {time.time() - t0:.0f} s", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
