"""Round 15 diagnostic: does the register-operand 4-bit GEMM race with its own in-flight wgmma?

``ops/_gluon/w4_rega.py`` (round 14) waited only for step k - 1's wgmmas after issuing step k's, then loaded and
decoded step k + 1's fragment while step k's wgmmas still read theirs from registers; the compiled SASS reuses
those registers at once (``tests/ops/test_gluon_w4.py::test_register_operand_gemm_never_writes_an_inflight_fragment``
finds the writes). Round 14 saw wrong rows at BLOCK_M 64 (longer wgmmas) only. This runs the round-14 kernels
(``old_w4_rega.py``, placed beside the new source for the run) and the current ones at BLOCK_M 16 / 32 / 64 against
the Triton kernels of the same tiles, several times: rows that differ from Triton, per variant and repeat.

    PYTHONPATH=src python benchmarks/rega_race_probe.py
"""

import copy
import sys

import torch

sys.path.insert(0, "tests/ops")
sys.path.insert(0, "benchmarks")
import test_batch_invariance_gpu as tb  # noqa: E402
from gluon_ab import kernels, use  # noqa: E402

from moekit.benchmarking import MODELS  # noqa: E402
from moekit.ops import gluon_w4  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.formats import Int4GroupFormat, Mxfp4Format  # noqa: E402
import moekit  # noqa: E402

gluon_w4._REGA_MAX_BM = 64  # BLOCK_M 64 register-operand tiles, which the launcher refuses since round 14


def cfg(bm, gluon, stages):
    w = {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": stages, "num_warps": 4}
    if gluon:
        w = dict(w, gluon=1, gluon_rega=1)
    return {"BLOCK_M": bm, "sum_pass": True, "w13_split": False, "w13": dict(w), "w2": dict(w)}


def main() -> None:
    variants = {"r14": kernels("old", "w4rega"), "r15": kernels("new", "w4rega")}
    for name, fmt in (("deepseek-v3", Int4GroupFormat(32)), ("gpt-oss-120b", Mxfp4Format()),
                      ("deepseek-v3", Mxfp4Format()), ("gpt-oss-120b", Int4GroupFormat(32))):
        m = MODELS[name]
        spec = tq.QuantSpec.of(fmt)
        e, w1, w2, b1, b2 = tb._problem(m, 32)
        k = min(m.K, e)
        q13, q2, s13, s2 = moekit.quantize_experts(w1, w2, fmt)
        limit = 7.0 if m.act == "swigluoai" else None

        def run(x, w, ids, c):
            return tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, None, None, m.act, False, b1, b2,
                                               None, limit, config=copy.deepcopy(c))

        for t in (1024, 4096):
            x, w, ids = tb._routing(t, m.H, e, k, seed=t)
            for bm, stages in ((16, 4), (32, 4), (64, 3)):
                ref = run(x, w, ids, cfg(bm, False, stages))
                for vname, ks in variants.items():
                    use(ks)
                    diffs = []
                    for _ in range(3):
                        o = run(x, w, ids, cfg(bm, True, stages))
                        diffs.append(int(((o.float() - ref.float()).abs().amax(1) > 0).sum()))
                    print(f"{name:13s} {spec.key:9s} T={t:5d} BLOCK_M={bm:3d} {vname}: rows differing from Triton "
                          f"{diffs}", flush=True)
    use(variants["r15"])


if __name__ == "__main__":
    main()
