"""The quantised grouped GEMMs compile for sm_90 (Hopper) with Triton's real compiler, on CPU.

The interpreter runs none of the compiled-mode checks (return types of every reached ``return``, shapes
of dead constexpr branches), so a kernel can pass every interpreter test and still fail to compile on a
GPU. ``benchmarks/compile_sm90.py`` compiles the launcher's kernels for ``GPUTarget("cuda", 90, 32)``
without a device (a subprocess: this session's kernels are interpreted). gpt-oss at T = 1 (decode
tiles) and T = 1000 (partial K blocks of 2880, the compute-bound tile BM = 128): the fp8 dots must lower
to the same instruction in both (SPEC §9): Hopper's e4m3 wgmma, never an fp16 ``mma.sync`` fallback.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compile_check import run_compiled

pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[2]
FORMATS = "fp8_block,fp8_channel,mxfp4,int4_g32"


def test_quantised_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_sm90.py"), "--fmt", FORMATS, "--shape", "gpt-oss",
         "--t", "1,1000", "--dump", str(tmp_path / "ir")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for fmt in ("fp8_block", "fp8_channel"):
        for t in (1, 1000):
            for kernel in ("w13_kernel", "w2_kernel"):
                ptx = (tmp_path / "ir" / f"{fmt}_gpt-oss_T{t}_{kernel}.ptx").read_text()
                # one MMA for every bucket (SPEC §9): fix_config raises BLOCK_M to 64 so no bucket falls
                # back to mma.sync on fp16 upcasts, whose sums differ from wgmma's
                assert "wgmma.mma_async.sync.aligned" in ptx and ".e4m3.e4m3" in ptx, (fmt, t, kernel)
                assert "mma.sync" not in ptx, (fmt, t, kernel)
    for fmt in ("mxfp4", "int4_g32"):  # bf16 activations on sm_90: the packed-bf16 PTX decode
        ptx = (tmp_path / "ir" / f"{fmt}_gpt-oss_T1_w13_kernel.ptx").read_text()
        assert "mul.rn.bf16x2" in ptx, fmt


SM80_SNIPPET = """
import compile_sm90 as c
from triton.backends.compiler import GPUTarget
from moekit.ops import triton_experts_quant as tq
c.TARGET = GPUTarget("cuda", 80, 32)
tq._ptx_decode = lambda device: False  # what the launcher decides on an sm_80 device
for fmt in ("mxfp4", "int4_g32"):
    for kf, args, kw in c.launches(c.FORMATS[fmt], 1, "gpt-oss"):
        if kf.__name__ in ("w13_kernel", "w2_kernel"):
            assert kw["PTX"] is False
            ptx = c.compile_launch(kf, args, kw).asm["ptx"]
            assert "mul.rn.bf16x2" not in ptx and "sub.rn.bf16x2" not in ptx, (fmt, kf.__name__)
print("ok")
"""


def test_4bit_kernels_compile_for_sm80_without_the_ptx_decode(tmp_path):
    """sm_80 (A100) has no ``sub`` / ``mul .bf16x2``: the launcher passes ``PTX=False`` there and the 4-bit
    kernels compile with the fp32 decode route (ptxas refused the PTX decode for sm_80: a review found it)."""
    run_compiled(SM80_SNIPPET, tmp_path)


def test_the_launcher_picks_the_ptx_decode_by_architecture(monkeypatch):
    """sm_90+ compiled: the PTX decode; sm_80 or the interpreter: the fp32 route."""
    import torch

    from moekit.ops import triton_experts_quant as tq

    monkeypatch.setattr(tq, "_interpreting", lambda: False)
    for major, want in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(tq, "_major", lambda device, m=major: m)
        assert tq._ptx_decode(torch.device("cuda", 0)) is want
    monkeypatch.setattr(tq, "_interpreting", lambda: True)
    assert tq._ptx_decode(torch.device("cuda", 0)) is False
