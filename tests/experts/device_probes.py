"""Helpers of the stream and device tests on GPUs (test_streams_gpu.py, test_multi_device_gpu.py; round 69): a small
Triton layer with deterministic weights, its inputs, and child processes for the two-GPU probes. Imports only torch
at module level (the test files are collected on CPU machines too)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

DT = torch.bfloat16
#: a small layer (quick to compile and to run); a token count above ``eager_graph_tokens`` takes the eager path
E, K, H, I = 16, 2, 512, 256
#: torch.cuda._sleep cycles: ~0.2-0.25 s on an H100 (1.6-2 GHz SM clock)
LONG_SLEEP = int(4e8)


def build(dev, graph_tokens: int, seed: int = 0, e=E, k=K, h=H, i=I, **kw):
    """A Triton layer on ``dev`` (the same ``seed``, the same weights: a graphed layer and its plain twin,
    ``graph_tokens=0``, compute the same thing)."""
    import moekit

    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(DT)
    w2 = (torch.randn(e, h, i, generator=g) * i**-0.5).to(DT)
    layer = moekit.FusedMoE(e, k, h, i, params_dtype=DT, device=dev, backend="triton",
                            eager_graph_tokens=graph_tokens, **kw)
    layer.load_expert_weights(w13.to(dev), w2.to(dev))
    return layer


def inputs(dev, t: int, seed: int, e=E, h=H):
    """(hidden_states [t, h] bf16, router_logits [t, e] float32) on ``dev``, made on the CPU (no copy between GPUs,
    which would turn peer access on)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, generator=g).to(DT).to(dev), torch.randn(t, e, generator=g).to(dev)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


class SlowShared(torch.nn.Module):
    """A user's shared experts: ``cycles`` of unrelated GPU work on the current stream, then zeros (the layer's output
    is then its routed part, read from a bucket graph's static output after the sleep)."""

    def __init__(self):
        super().__init__()
        self.cycles = 0

    def forward(self, h):
        if self.cycles:
            torch.cuda._sleep(self.cycles)
        return torch.zeros_like(h)


# ---- child processes (two GPUs): a kernel on the wrong device can leave a sticky CUDA error; each probe runs alone --
CHILD_PRELUDE = r'''
import sys, torch
from device_probes import DT, E, H, LONG_SLEEP, SlowShared, build, inputs, rel_err

def enable_p2p():
    """What a model spread over GPUs does anyway (hidden states moved cuda:0 -> cuda:1 and back): torch's copy turns
    peer access on for the pair."""
    a, b = torch.ones(4, device="cuda:0"), torch.ones(4, device="cuda:1")
    a.to("cuda:1"), b.to("cuda:0")
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)

def fail(msg):
    print("RESULT FAIL " + msg, flush=True)
    sys.exit(3)
'''


def check_child(body: str, timeout: int = 180) -> None:
    """Run ``CHILD_PRELUDE + body`` in a fresh Python (this process's ``sys.path`` as its PYTHONPATH); it passes when
    the body printed ``RESULT OK``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    out = f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "RESULT OK" in out, out[-4000:]
