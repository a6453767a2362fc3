"""The quantised grouped GEMMs compile for sm_90 (Hopper) with Triton's real compiler, on CPU.

The interpreter runs none of the compiled-mode checks (return types of every reached ``return``, shapes
of dead constexpr branches), so a kernel can pass every interpreter test and still fail to compile on a
GPU. ``benchmarks/compile_sm90.py`` compiles the launcher's kernels for ``GPUTarget("cuda", 90, 32)``
without a device (a subprocess: this session's kernels are interpreted). gpt-oss at T = 1000: partial
K blocks (2880) and the compute-bound tile (BM = 128), where Triton would pick wgmma for fp8.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[2]
FORMATS = "fp8_block,fp8_channel,mxfp4,int4_g32"


def test_quantised_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_sm90.py"), "--fmt", FORMATS, "--shape", "gpt-oss",
         "--t", "1000", "--dump", str(tmp_path / "ir")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for fmt in ("fp8_block", "fp8_channel"):
        for kernel in ("w13_kernel", "w2_kernel"):
            ptx = (tmp_path / "ir" / f"{fmt}_gpt-oss_T1000_{kernel}.ptx").read_text()
            # one MMA for every tile config (SPEC §9): fp16 mma.sync on exact e4m3 upcasts, never the
            # tile-dependent, reduced-precision fp8 wgmma accumulation
            assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx, (fmt, kernel)
            assert "e4m3.e4m3" not in ptx, (fmt, kernel)
