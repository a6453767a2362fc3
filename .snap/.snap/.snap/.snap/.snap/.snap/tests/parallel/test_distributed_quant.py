"""Quantised layers under expert/tensor parallelism and EPLB, in spawned gloo groups (see dist_checks_quant)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import dist_checks_quant  # noqa: E402
from dist_harness import assert_ok, run_checks  # noqa: E402

pytestmark = pytest.mark.distributed
_RESULTS: dict = {}


def _results() -> dict:
    if not _RESULTS:
        names = list(dist_checks_quant.CHECKS)
        _RESULTS.update(run_checks(2, names, "dist_checks_quant", backend="gloo",
                                   timeout=float(os.environ.get("MOEKIT_DIST_TIMEOUT", "240"))))
    return _RESULTS


# checks whose layers run the Triton backend on CPU tensors (the interpreter; a GPU host runs them only with
# TRITON_INTERPRET=1)
_CPU_TRITON = {"relaid_words_under_tp_ep_eplb"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.interpreter) if n in _CPU_TRITON else n
                                  for n in dist_checks_quant.CHECKS])
def test_gloo_world2_quant(name):
    assert_ok(_results(), name)
