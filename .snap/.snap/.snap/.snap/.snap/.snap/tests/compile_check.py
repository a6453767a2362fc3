"""Run a snippet that compiles moekit's Triton kernels with Triton's real compiler (no GPU needed).

The test session interprets kernels (``TRITON_INTERPRET=1``), so compiled-mode checks run in a subprocess
without it, with ``src`` and ``benchmarks`` (``compile_sm90``) importable and a private Triton cache.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_compiled(snippet: str, tmp_path) -> None:
    """Run ``snippet`` in a fresh interpreter; it must exit 0 and print ``ok``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    res = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
