"""Where a patched block's training step spends its GPU time: torch.profiler over ``benchmarks/train_step.py``'s step
(forward + backward of one transformers MoE block patched by moekit, every parameter training), the kernels by
total CUDA time.

    PYTHONPATH=src:benchmarks python benchmarks/train_profile.py [--models qwen3-30b-a3b,mixtral-8x7b] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import copy

import torch

from moekit.benchmarking import get_shape
from train_step import MODELS, _block, _step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="1024")
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args(argv)
    from moekit.integrations.transformers import patch

    for name in args.models.split(","):
        cfg_name, model_name, kw_of = MODELS[name]
        kw = kw_of(get_shape(name))
        ref = _block(cfg_name, model_name, kw, "cuda")
        mine = copy.deepcopy(ref)
        patch(mine)
        for t in (int(v) for v in args.tokens.split(",")):
            x = (torch.randn(1, t, kw["hidden_size"], device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
            dy = torch.randn(1, t, kw["hidden_size"], device="cuda")
            for variant, model in (("grouped_mm", ref), ("patched", mine)):
                step = _step(model.model.layers[0].mlp, x, dy)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                print(f"== {name} T={t} {variant} (3 steps)")
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                                  max_name_column_width=70)
                print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
