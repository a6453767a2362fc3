"""The bits of an experts step before / after a kernel change that must not change them: run once per source tree
(``PYTHONPATH`` picks the tree), ``--save`` the outputs of every point, then ``--against`` that file from the other
tree: every output must be the same bits (seeded weights and routing, the config lookup's config per point).

    PYTHONPATH=old/src:benchmarks python benchmarks/step_bits.py --points deepseek-v3:1,mixtral-8x7b:64 --save a.pt
    PYTHONPATH=src:benchmarks python benchmarks/step_bits.py --points deepseek-v3:1,mixtral-8x7b:64 --against a.pt
"""

from __future__ import annotations

import argparse
import sys

import torch

from moekit.benchmarking.shapes import MODELS
from quant_probe import experts_step, step_config  # benchmarks/: the script's own folder
from swap_probe import FORMATS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="MODEL:T[,MODEL:T...]")
    ap.add_argument("--formats", default="fp8")
    ap.add_argument("--save", default=None)
    ap.add_argument("--against", default=None)
    a = ap.parse_args(argv)
    if (a.save is None) == (a.against is None):
        ap.error("pass exactly one of --save / --against")
    dev = torch.device("cuda")
    by_model: dict[str, list[int]] = {}
    for point in a.points.split(","):
        name, t = point.split(":")
        by_model.setdefault(name, []).append(int(t))
    outs, bad = {}, 0
    ref = torch.load(a.against) if a.against else None
    for name, tokens in by_model.items():
        m = MODELS[name]
        for fname in a.formats.split(","):
            call, spec = experts_step(m, FORMATS[fname], dev)
            for t in tokens:
                g = torch.Generator(device="cpu").manual_seed(7 * t + 1)
                x = torch.randn(t, m.H, generator=g).to(dev, torch.bfloat16)
                ids = torch.stack([torch.randperm(m.E, generator=g)[:m.K] for _ in range(t)]).int().to(dev)
                w = (torch.rand(t, m.K, generator=g) + 0.05).to(dev)
                out = call(x, w, ids, step_config(m, t, spec, dev)).cpu()
                key = f"{name}:{t}:{fname}"
                outs[key] = out
                if ref is not None:
                    same = torch.equal(out, ref[key])
                    bad += not same
                    diff = (out.float() - ref[key].float()).abs().max().item()
                    print(f"{key:28s} {'same bits' if same else 'DIFFERENT'} (max abs diff {diff:.3e})", flush=True)
            del call
            torch.cuda.empty_cache()
    if a.save:
        torch.save(outs, a.save)
        print(f"saved {len(outs)} outputs to {a.save}")
    else:
        print(f"{len(outs) - bad} / {len(outs)} points the same bits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
