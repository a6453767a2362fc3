"""Shared pytest setup: the Triton interpreter on CPU, the ``gpu`` and ``interpreter`` markers, deterministic seeds.

The Triton interpreter switch is set here, once, at import: conftest is imported before any test
module, so before any ``triton.jit`` kernel is defined. Without CUDA the Triton kernels run under
``TRITON_INTERPRET=1`` (one test deletes it with ``monkeypatch.delenv`` to see the no-Triton error).
"""

import os
import platform
import sys
from pathlib import Path

# The interpreter computes tl.dot with numpy's BLAS, whose float32 sums depend on the kernel OpenBLAS picks (or is
# told: some images set OPENBLAS_CORETYPE=Haswell): with the Haswell or Zen kernels a swapped tile's fp32 dot
# rounded differently from the unswapped one (tests/ops/test_swap_ab.py, on an AMD EPYC), with SkylakeX or
# Sandybridge it did not. The test process uses one kernel on every x86 host (AVX only, set before numpy is
# first imported), so the bit-exact interpreter tests do not depend on the CI machine.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ["OPENBLAS_CORETYPE"] = "Sandybridge"


def _cuda_available() -> bool:
    """torch.cuda.is_available() through NVML: no CUDA context, so worker processes can still fork."""
    saved = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        import torch

        return torch.cuda.is_available()
    finally:
        if saved is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved


CUDA = _cuda_available()
# MOEKIT_TEST_GPU_HOST=1 runs a CPU machine's suite as a GPU host without the interpreter would (the `gpu` tests still
# skip): a test running Triton kernels on CPU tensors that is not marked `interpreter` fails, as it would there
GPU_HOST = CUDA or os.environ.get("MOEKIT_TEST_GPU_HOST") == "1"
if not GPU_HOST:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/reference.py (the one float64 oracle) is importable as ``reference`` from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

# pytest-xdist workers (the device runs use 4-6 on one host): each takes its share of the cores for torch's CPU ops
# (the quantisation of test weights, the CPU twin), not all of them; N workers x all cores oversubscribe the host.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # round 55: on a GPU host the CPU Triton tests failed (34 + 95 on an H100), not skipped
    skip_interp = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (set by "
                                          "this conftest on machines without CUDA)")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
