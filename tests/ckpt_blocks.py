"""Checkpoint tensors of one MoE block for the loading tests that write their own safetensors files."""

from __future__ import annotations

import math

import torch


def qwen3_block(prefix: str, e: int, h: int, i: int, seed: int = 0) -> dict:
    """A Qwen3-MoE block's tensors under ``prefix``: the router ``gate.weight [E, H]``, then each expert's
    ``gate_proj`` / ``up_proj [I, H]`` and ``down_proj [H, I]`` (random, seeded, scaled by 1/sqrt(fan-in))."""
    g = torch.Generator().manual_seed(seed)
    t = {prefix + "gate.weight": torch.randn(e, h, generator=g)}
    for x in range(e):
        for n, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            t[prefix + f"experts.{x}.{n}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
    return t
