"""Shared pytest setup: the Triton interpreter on CPU, the ``gpu`` marker, deterministic seeds.

The Triton interpreter switch is set here, once, at import: conftest is imported before any test
module, so before any ``triton.jit`` kernel is defined. Without CUDA the Triton kernels run under
``TRITON_INTERPRET=1`` (one test deletes it with ``monkeypatch.delenv`` to see the no-Triton error).
"""

import os
import sys
from pathlib import Path


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
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/reference.py (the one float64 oracle) is importable as ``reference`` from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
