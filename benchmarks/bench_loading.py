"""Load time of a checkpoint: ``moekit.load_moe_layers`` against transformers' ``from_pretrained``.

    PYTHONPATH=src python benchmarks/bench_loading.py write DIR      # a synthetic ~740 MB Qwen3-MoE checkpoint
    PYTHONPATH=src python benchmarks/bench_loading.py time DIR [--repeats 3]

``write`` builds a Qwen3-MoE-shaped model with transformers (hidden 1024, 64 experts of width 512,
top-8, 3 layers, vocab 32000, bf16, random weights) and saves it with ``save_pretrained`` in 200 MB
shards (per-expert keys on disk, as the released checkpoints). ``time`` loads it alternately with both
tools, each in a fresh process (cold Python, warm page cache), and prints the wall time of the load
call alone (the imports are not counted) for each run, then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from moekit._argparse import positive_int

CONFIG = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=3,
              num_experts=64, num_experts_per_tok=8, vocab_size=32000, num_attention_heads=8,
              num_key_value_heads=4, head_dim=128, decoder_sparse_step=1, norm_topk_prob=True)

_MOEKIT = """
import time, torch, moekit
t = time.perf_counter(); layers = moekit.load_moe_layers({path!r}, dtype=torch.bfloat16, progress=False)
print(time.perf_counter() - t, len(layers))
"""
_TRANSFORMERS = """
import time, torch, transformers
t = time.perf_counter(); m = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16)
print(time.perf_counter() - t, sum(p.numel() for p in m.parameters()))
"""


def write(path: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**CONFIG)
    with torch.device("cpu"):
        model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    print(f"wrote {path}: {size / 1e6:.0f} MB")


def time_both(path: str, repeats: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    out = {"moekit": [], "transformers": []}
    for _ in range(repeats):
        for name, code in (("moekit", _MOEKIT), ("transformers", _TRANSFORMERS)):
            res = subprocess.run([sys.executable, "-c", code.format(path=path)], env=env, capture_output=True,
                                 text=True)
            if res.returncode:  # (round 62: the child's error was dropped, a CalledProcessError shown instead)
                last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"bench_loading.py: error: {name} could not load {path}: {last}")
            out[name].append(float(res.stdout.split()[0]))
    out = {k: {"runs_s": v, "median_s": statistics.median(v)} for k, v in out.items()}
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["write", "time"])
    p.add_argument("path")
    p.add_argument("--repeats", type=positive_int, default=3)
    a = p.parse_args()
    write(a.path) if a.what == "write" else time_both(a.path, a.repeats)


if __name__ == "__main__":
    main()
