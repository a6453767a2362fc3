"""Shared pytest setup: the ``gpu`` marker skips without CUDA; deterministic seeds."""

import sys
from pathlib import Path

import pytest
import torch

# tests/reference.py (the float64 oracles) is importable as ``reference`` from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
