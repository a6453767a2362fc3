"""The register-operand 4-bit GEMMs on re-laid weights (``RELAID``, :mod:`moekit.ops.w4_layout`): compiled for sm_90
on the CPU (fewer instructions per K step than on SPEC-packed weights, also where rows end in a half chunk)
and, on the GPU, the same bits as the same kernels on SPEC-packed weights (``QuantSpec.relaid``, as a Triton-backend
layer passes it). The speed: ``benchmarks/relaid_probe.py`` (docs/kernels.md, round 44); the layer and the Triton
kernels on re-laid words: ``tests/experts/test_packed_layout.py``."""

import pytest
import torch

gluon = pytest.importorskip("triton.experimental.gluon")

from compile_check import run_compiled  # noqa: E402
from moekit.ops import gluon_w4  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.formats import Int4GroupFormat, Mxfp4Format  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402
from moekit.ops.w4_layout import relay_rega  # noqa: E402
from small_experts import count_calls, experts_problem  # noqa: E402


def test_relaid_register_operand_gemms_compile_with_fewer_instructions(tmp_path):
    # per K step (DeepSeek-V3 slice, BLOCK_M 16, BN 64, the shipped decode forms): no gather and no split of the
    # words, one 16-byte shared load per row instead of four; no shared-memory round trip or shuffle for the layout
    # change (the re-laid fragment is the same registers), no write into an in-flight fragment; measured on Triton
    # 3.6: mxfp4 w13 618 -> 525, w2 336 -> 293, int4 w13 495 -> 395, w2 275 -> 227. With gpt-oss's K (2880: a half
    # chunk at the end of each row, its step's copies 8 bytes wide) mxfp4 w13 692 -> 649, w2 401 -> 362, int4
    # 560 -> 487, 334 -> 287
    run_compiled("""
import compile_sm90 as c
for which in ("w13", "w2"):
    for quant, sword in (("mxfp4", True), ("mxfp4", False), ("int4", False)):
        kw = dict(bm=16, bn=64, stages=3, rega=True, serial=which == "w13", sword=sword, early=True)
        n0, ops0 = c.sass_loop_mix(c.gluon_w4(which, quant, **kw))
        k = c.gluon_w4(which, quant, relaid=True, **kw)
        n1, ops1 = c.sass_loop_mix(k)
        assert n1 <= 0.9 * n0, (which, quant, sword, n0, n1)
        assert ops1["HGMMA"] == ops0["HGMMA"] and ops1["LDS"] * 3 // 2 <= ops0["LDS"], (ops0, ops1)
        assert ops1.get("PRMT", 0) * 2 <= ops0["PRMT"], (ops0, ops1)  # the gather and placing prmt are gone
        assert not ops1.get("STS") and not ops1.get("SHFL"), ops1
        assert not c.inflight_fragment_writes(c.sass_text(k)), (which, quant)
import re
for which in ("w13", "w2"):  # gpt-oss's 2880: 22 whole steps and a half chunk, which the last step copies
    for quant in ("mxfp4", "int4"):
        kw = dict(bm=16, bn=64, stages=3, rega=True, serial=which == "w13", early=True, h=2880, i=2880)
        n0, ops0 = c.sass_loop_mix(c.gluon_w4(which, quant, **kw))
        k = c.gluon_w4(which, quant, relaid=True, **kw)
        n1, ops1 = c.sass_loop_mix(k)
        assert n1 <= 0.95 * n0 and ops1["HGMMA"] == ops0["HGMMA"], (which, quant, n0, n1)
        sass = c.sass_text(k)
        assert not c.inflight_fragment_writes(sass), (which, quant)
        copies = {w: len(re.findall(r"LDGSTS\\.E[.A-Z]*\\." + w + r"\\b", sass)) for w in ("64", "128")}
        assert copies["64"] and copies["128"], copies  # the half chunk in 8-byte copies, whole steps in 16
print("ok")
""", tmp_path)


def test_triton_gemms_decode_relaid_words_in_place(tmp_path):
    # the Triton 4-bit GEMMs (the compute-bound w2 buckets of the H200 tables, gpt-oss's T = 1) on re-laid words:
    # decoded where they lie and the tile permuted into k order, the loop within 15 % of its instructions on
    # SPEC-packed words (Triton 3.6: DeepSeek-V3 mxfp4 w2 T = 4096 649 -> 709, int4 T = 8192 598 -> 532; round 44's
    # integer re-packing first took 997 and 2316). The bits: tests/experts/test_packed_layout.py
    run_compiled("""
import json
import compile_sm90 as c
import moekit
table = json.load(open("src/moekit/configs/NVIDIA_H200.json"))["entries"]
key = "E=256,H=7168,I=2048,K=8,dtype=bf16,gated=1,quant="
for fmt, quant, t, shape in ((moekit.Mxfp4Format(), "mxfp4", 4096, (16, 8, 7168, 2048, "silu", False)),
                             (moekit.Int4GroupFormat(32), "int4_g32", 8192, (16, 8, 7168, 2048, "silu", False)),
                             (moekit.Int4GroupFormat(32), "int4_g32", 1, (16, 4, 2880, 2880, "swigluoai", True))):
    cfg = table[key + quant][str(t)] if t > 1 else None
    for kf, args, kw in c.launches(fmt, t, shape, config=cfg):
        if kf.fn.__name__ not in ("w13_kernel", "w2_kernel") or (t > 1 and kf.fn.__name__ != "w2_kernel"):
            continue
        n = [len(c.inner_loops(c.compile_launch(kf, args, dict(kw, RELAID=r)), "MMA")[0]) for r in (False, True)]
        assert n[1] <= 1.15 * n[0], (quant, t, kf.fn.__name__, n)
print("ok")
""", tmp_path)


def test_gluon_maxnreg_keeps_two_8_warp_programs_per_sm(tmp_path):
    # gpt-oss's re-laid 8-warp w2 (BLOCK_M 64, BN 128: the H200 tables' T = 1024 / 4096 form) took 130 (mxfp4) and
    # 141 (int4) registers per thread, so one program per SM instead of two (on SPEC-packed words 123 / 127): round
    # 46 measured it 30 % / 22 % slower. "gluon_maxnreg": 128 (through the launcher, as a table sets it) compiles it in
    # 128 with no spill and the loop no longer than 3 % past the free allocation's (round 47, Triton 3.6)
    run_compiled("""
import json
import compile_sm90 as c
import moekit
from ir_stats import sass_stats
from pathlib import Path
import tempfile
table = json.load(open("src/moekit/configs/NVIDIA_H200.json"))["entries"]
for fmt, quant in ((moekit.Mxfp4Format(), "mxfp4"), (moekit.Int4GroupFormat(32), "int4_g32")):
    cfg = table["E=128,H=2880,I=2880,K=4,dtype=bf16,gated=1,quant=" + quant]["4096"]
    stats = []
    for regs in (0, 128):
        patch = {"w2": {"BN": 128, "num_warps": 8, "gluon_rega": 1, "gluon_maxnreg": regs}}
        for kf, args, kw in c.launches(fmt, 4096, (128, 4, 2880, 2880, "swigluoai", True), config=cfg, patch=patch,
                                       gluon=True):
            if kf.fn.__name__ == "w4ra_w2_sum_kernel":
                assert kw.get("maxnreg") == (regs or None), kw
                d = Path(tempfile.mkdtemp())
                (d / "k.ptx").write_text(c.compile_launch(kf, args, dict(kw, RELAID=True)).asm["ptx"])
                stats.append(sass_stats(d / "k.ptx"))
    assert len(stats) == 2, stats
    assert stats[0]["regs"] > 128 and stats[1]["regs"] <= 128 and stats[1]["spill"] == 0, (quant, stats)
    assert stats[1]["sass_loop"] <= 1.03 * stats[0]["sass_loop"], (quant, stats)
print("ok")
""", tmp_path)


_FMTS = {"mxfp4": Mxfp4Format(), "int4_g32": Int4GroupFormat(32), "int4_g128": Int4GroupFormat(128)}


def _cfg(bm, bn13, bn2, rega=1, early=False, stages=None):
    """A register-operand config for both GEMMs (BK 128, the sum pass)."""
    out = {"BLOCK_M": bm, "sum_pass": True}
    for part, bn in (("w13", bn13), ("w2", bn2)):
        c = {"BN": bn, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, "SWAP": 1, "gluon": 1,
             "gluon_rega": rega if part == "w13" else 1}
        if early:
            c["gluon_early"] = 1
        if stages:
            c["gluon_stages"] = stages
        out[part] = c
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("form", [{}, {"rega": 2}, {"early": True}, {"rega": 2, "early": True, "stages": 2}],
                         ids=["plain", "serial", "early", "serial_early_stages2"])
@pytest.mark.parametrize("t, e, k, h, i, act, bias, fmt, bm, bn13, bn2, hot", [
    (1, 16, 8, 7168, 2048, "silu", False, "mxfp4", 16, 64, 64, False),  # DeepSeek-V3 slice, decode, SWORD scales
    (8, 16, 8, 7168, 2048, "silu", False, "int4_g32", 16, 64, 64, False),
    (64, 16, 4, 1024, 512, "silu", False, "int4_g128", 16, 64, 64, False),  # one group per K step: 4 words a group
    (300, 16, 4, 1024, 768, "gelu_tanh", False, "mxfp4", 16, 64, 64, True),  # a hot expert over many row blocks
    (200, 16, 4, 1024, 768, "swigluoai", True, "mxfp4", 32, 128, 64, False),  # biases, clamp, BN 128 (8 warps)
    (700, 16, 4, 1024, 512, "silu", False, "int4_g32", 128, 64, 128, True),  # tall tiles: gate, then up
    (8, 16, 4, 2880, 2880, "swigluoai", True, "mxfp4", 16, 64, 64, False),  # gpt-oss slice: rows end in half chunks
    (64, 16, 4, 2880, 2880, "silu", False, "int4_g32", 16, 64, 64, True),
    (300, 16, 4, 960, 704, "gelu_tanh", False, "mxfp4", 128, 64, 128, True),  # half chunks under tall tiles
], ids=["decode_t1_mxfp4", "decode_t8_int4", "int4_g128", "hot_gelu_tanh", "swigluoai_bias_bn128", "tall_bm128",
        "gpt_oss_t8_mxfp4_half_chunk", "gpt_oss_t64_int4_half_chunk", "half_chunks_bm128"])
def test_gpu_relaid_weights_same_bits_as_spec_packed(monkeypatch, t, e, k, h, i, act, bias, fmt, bm, bn13, bn2, hot,
                                                     form):
    w13, w2, x, w, ids, b1, b2 = experts_problem(torch.bfloat16, act, bias, seed=6, t=t, e=e, h=h, i=i, k=k)
    if hot:
        ids[: t // 2, 0] = 0
    q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), _FMTS[fmt])
    cfg = _cfg(bm, bn13, bn2, **form)
    limit = 7.0 if act == "swigluoai" else None

    def run(p13, p2, relaid):
        spec = tq.QuantSpec.of(_FMTS[fmt], relaid=relaid)
        return tq.fused_experts_quant_impl(x, p13, p2, w, ids, spec, s13, s2, None, None, act, False, b1, b2, None,
                                           limit, config=cfg)

    calls = count_calls(monkeypatch, gluon_w4, "launch_w4_w13")
    ref = run(q13, q2, False)
    out = run(relay_rega(q13), relay_rega(q2), True)
    again = run(relay_rega(q13), relay_rega(q2), True)
    assert len(calls) == 3
    assert torch.equal(ref, out) and torch.equal(out, again)
    assert ref.isfinite().all() and ref.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "int4_g32"])
def test_gpu_maxnreg_gives_the_same_bits(fmt):
    # "gluon_maxnreg": 128 on the 8-warp register-operand w2 (gpt-oss slice: rows ending in half chunks, biases,
    # swigluoai, a hot expert), re-laid words: the bits of the same kernels compiled freely and of SPEC-packed words
    w13, w2, x, w, ids, b1, b2 = experts_problem(torch.bfloat16, "swigluoai", True, seed=7, t=300, e=16, h=2880,
                                                 i=2880, k=4)
    ids[:150, 0] = 0
    q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), _FMTS[fmt])
    outs = []
    for regs, relaid in ((0, False), (0, True), (128, True)):
        cfg = _cfg(64, 64, 128)
        cfg["w2"].update(num_warps=8, gluon_maxnreg=regs)
        spec = tq.QuantSpec.of(_FMTS[fmt], relaid=relaid)
        p13, p2 = (relay_rega(q13), relay_rega(q2)) if relaid else (q13, q2)
        outs.append(tq.fused_experts_quant_impl(x, p13, p2, w, ids, spec, s13, s2, None, None, "swigluoai", False, b1,
                                                b2, None, 7.0, config=cfg))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert outs[0].isfinite().all() and outs[0].abs().sum() > 0
