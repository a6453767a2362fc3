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
