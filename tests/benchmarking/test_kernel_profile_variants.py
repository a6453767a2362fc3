"""benchmarks/kernel_profile.py: the config variants it times (named ``--patches``, switch suffixes)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def kp():
    pytest.importorskip("triton")
    sys.path.insert(0, str(BENCH))  # the script imports its sibling probes
    try:
        spec = importlib.util.spec_from_file_location("kernel_profile", BENCH / "kernel_profile.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


BASE = {"BLOCK_M": 16, "tma": True, "w13": {"BN": 64, "num_warps": 4, "num_stages": 4, "SWAP": 1},
        "w2": {"BN": 64, "num_warps": 4, "num_stages": 4, "SWAP": 1}}


def test_patches_merge_per_kernel(kp, monkeypatch):
    monkeypatch.setattr(kp, "PATCHES", {"w2s6": {"w2": {"num_stages": 6}},
                                        "both": {"BLOCK_M": 64, "w13": {"BN": 128, "num_warps": 8}}})
    got = kp.variant(BASE, "w2s6")
    assert got["w2"] == {**BASE["w2"], "num_stages": 6} and got["w13"] == BASE["w13"]  # w13 untouched
    got = kp.variant(BASE, "both")
    assert got["BLOCK_M"] == 64 and got["w13"] == {**BASE["w13"], "BN": 128, "num_warps": 8}
    assert BASE["w2"]["num_stages"] == 4 and BASE["w13"]["BN"] == 64  # the lookup's config is not mutated


def test_suffixes_stack_on_any_variant(kp, monkeypatch):
    monkeypatch.setattr(kp, "PATCHES", {"w2s6": {"w2": {"num_stages": 6}}})
    assert kp.variant(BASE, "base+sum")["sum_pass"] is True
    assert kp.variant(BASE, "base-sum")["sum_pass"] is False
    got = kp.variant(BASE, "w2s6+pdl")
    assert got["pdl"] is True and got["w2"]["num_stages"] == 6
    assert "SWAP" not in kp.variant(BASE, "bm128")["w13"]  # a named tile set drops the swap
