"""The Gluon 4-bit GEMMs (:mod:`moekit.ops._gluon.w4`, config ``"w13" / "w2": {"gluon": 1}`` on mxfp4 / int4)
against Triton's.

Each must give the same bits as the Triton kernel it replaces (w13: the fused gated epilogue; w2: the sum-pass
branch): the same decoded bf16 tile (the same PTX decode), the same k16 products summed in order on the tensor
cores, the same epilogue functions; only where the decoded tile lives differs (shared memory, read by wgmma). On
CPU: they compile for sm_90 with 16-byte copies, wgmma and no spills, and the launcher takes them only where they
compute those bits. On the H200 (``gpu``): bit-identical outputs over the awkward shapes, swapped and unswapped.
"""

import pytest

import torch

pytest.importorskip("triton")

from compile_check import run_compiled  # noqa: E402
from moekit.ops import gluon_experts, gluon_w4  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.formats import Int4GroupFormat, Mxfp4Format  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402
from moekit.ops.triton_plan import _freeze, launch_plan  # noqa: E402
from small_experts import (assert_compiled_and_graphed_bits, count_calls, experts_problem,  # noqa: E402
                           quantised_run)


def _cfg(g13: bool, g2: bool, bm: int = 16, swap: bool = True, bn13: int = 64, bn2: int = 64, wbuf=None, ws=None,
         rega=False, stages=None, early=False):
    """A 4-bit config (BK 128, the sum pass on) asking for the Gluon w13 / w2 or not (``wbuf``: their
    ``"gluon_wbuf"``, decoded tiles in flight; None: the plan's default; ``ws``: their ``"gluon_ws"``, the
    warp-specialised kernels' decoded slots; ``rega``: ``"gluon_rega"``, the register-operand kernels;
    ``stages``: ``"gluon_stages"``; ``early``: ``"gluon_early"`` beside ``rega``)."""
    w13 = {"BN": bn13, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, "SWAP": int(swap)}
    w2 = {"BN": bn2, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, "SWAP": int(swap)}
    for c, g in ((w13, g13), (w2, g2)):
        if g:
            c["gluon"] = 1
            if wbuf is not None:
                c["gluon_wbuf"] = wbuf
            if ws is not None:
                c["gluon_ws"] = ws
            if rega:  # 2: w13 decodes gate, then up (one fragment live); w2 has one fragment
                c["gluon_rega"] = int(rega) if c is w13 else 1
            if stages is not None:
                c["gluon_stages"] = stages
            if early:
                c["gluon_early"] = 1
    return {"BLOCK_M": bm, "w13": w13, "w2": w2, "sum_pass": True}


def _plan(t, k, cfg, gated=True, on_input=False):
    return launch_plan(t, 512, 384, 768 if gated else 384, 16, 16, k, torch.bfloat16, 0, gated, on_input, False,
                       False, False, None, False, 1024, 16, _freeze(cfg))


def test_the_sm90_heuristic_configs_run_the_gluon_gemms_they_ask_for():
    """The untuned mxfp4 / int4 config on sm_90 (``triton_configs.w4_sm90_tiles``) at 1 to 128 rows per expert: each
    GEMM that asks for a Gluon kernel gets it (not the Triton fallback), and only w2 of the 128-row form stays on
    Triton."""
    from moekit.ops.triton_configs import heuristic_config

    x = torch.empty(4096, 512, dtype=torch.bfloat16)
    w1, w2 = torch.empty(16, 768, 256, dtype=torch.uint8), torch.empty(16, 512, 192, dtype=torch.uint8)
    mx = tq.QuantLaunch(tq.QuantSpec.of(Mxfp4Format()), torch.ones(16, 768, 16, dtype=torch.uint8),
                        torch.ones(16, 512, 12, dtype=torch.uint8), None, None, 384, ptx=True)
    w1i, w2i = torch.empty(16, 768, 64, dtype=torch.int32), torch.empty(16, 512, 48, dtype=torch.int32)
    i4 = tq.QuantLaunch(tq.QuantSpec.of(Int4GroupFormat(32)), torch.ones(16, 768, 16, dtype=torch.bfloat16),
                        torch.ones(16, 512, 12, dtype=torch.bfloat16), None, None, 384, ptx=True)
    dev = gluon_experts._device_ok
    try:
        gluon_experts._device_ok = lambda t: True  # as if on an sm_90 GPU
        for t in (1, 16, 32, 64, 128, 256, 1024):  # 8 slots over 16 experts: 1, 8, 16, 32, 64, 128, 512 rows
            for q, a, b in ((mx, w1, w2), (i4, w1i, w2i)):
                cfg = q.spec.fix_config(heuristic_config(t, 16, 512, 384, 8, torch.bfloat16, 132, q.spec.key, (9, 0)),
                                        torch.bfloat16)
                p = _plan(t, 8, cfg)
                assert p.w13_gluon and p.gluon_rega[0] == 1 and gluon_w4.w4_ok(p, q, "w13", a, x[:t], False), (t, cfg)
                big = cfg["BLOCK_M"] == 128
                assert p.w2_gluon == (not big) and gluon_w4.w4_ok(p, q, "w2", b, x[:t], False) == (not big), (t, cfg)
    finally:
        gluon_experts._device_ok = dev


def test_a_gluon_config_runs_an_align_kernel_at_any_t():
    # 8 slots: the layout would live in registers (no align kernel, no row_start); asking for a Gluon kernel
    # runs the one-program align instead, which stores row_start
    assert _plan(1, 8, _cfg(False, False)).align == "inline"
    p = _plan(1, 8, _cfg(True, True))
    assert p.align == "small" and p.w13_gluon and p.w2_gluon
    # one decoded tile in flight for swapped (decode) tiles, two for unswapped; a config may say which
    assert p.gluon_wbuf == (1, 1)
    assert _plan(300, 8, _cfg(True, True, bm=64, swap=False)).gluon_wbuf == (2, 2)
    assert _plan(1, 8, _cfg(True, True, wbuf=2)).gluon_wbuf == (2, 2)


def test_w4_launcher_refuses_where_the_bits_would_differ():
    p = _plan(300, 8, _cfg(True, True))
    spec = tq.QuantSpec.of(Mxfp4Format())
    w1 = torch.empty(16, 768, 256, dtype=torch.uint8)
    x = torch.empty(300, 512, dtype=torch.bfloat16)
    q = tq.QuantLaunch(spec, torch.ones(16, 768, 16, dtype=torch.uint8), torch.ones(16, 512, 12, dtype=torch.uint8),
                       None, None, 384, ptx=True)
    assert not gluon_w4.w4_ok(p, q, "w13", w1, x, interp=False)  # on the CPU
    dev = gluon_experts._device_ok
    try:
        gluon_experts._device_ok = lambda t: True  # as if on an sm_90 GPU
        assert gluon_w4.w4_ok(p, q, "w13", w1, x, interp=False)
        assert not gluon_w4.w4_ok(p, q, "w13", w1, x, interp=True)  # the interpreter
        assert not gluon_w4.w4_ok(p, q, "w13", w1, x.half(), interp=False)  # fp16 activations
        q_nop = tq.QuantLaunch(spec, q.ws13["ws_ptr"], q.ws2["ws_ptr"], None, None, 384, ptx=False)
        assert not gluon_w4.w4_ok(p, q_nop, "w13", w1, x, interp=False)  # no packed-bf16 decode
        assert not gluon_w4.w4_ok(_plan(300, 8, _cfg(False, True)), q, "w13", w1, x, interp=False)  # not asked
        assert not gluon_w4.w4_ok(_plan(300, 8, _cfg(True, True), on_input=True), q, "w13", w1, x, False)
        assert not gluon_w4.w4_ok(_plan(300, 8, _cfg(True, True, swap=False)), q, "w13", w1, x, False)  # BM 16
        assert gluon_w4.w4_ok(_plan(300, 8, _cfg(True, True, bm=64, swap=False)), q, "w13", w1, x, False)
        wide = _plan(300, 8, _cfg(True, True, bm=64, swap=False, bn13=128))
        assert not gluon_w4.w4_ok(wide, q, "w13", w1, x, False)  # two 64 x 128 accumulators in 4 warps spill
        assert not gluon_w4.w4_ok(p, q, "w13", w1[:, :, :255], x, interp=False)  # rows not 16-byte aligned
        i4 = tq.QuantSpec.of(Int4GroupFormat(32))
        w1i = torch.empty(16, 768, 64, dtype=torch.int32)
        q32 = tq.QuantLaunch(i4, torch.ones(16, 768, 16), torch.ones(16, 512, 12), None, None, 384, ptx=True)
        assert not gluon_w4.w4_ok(p, q32, "w13", w1i, x, interp=False)  # int4 with fp32 scales
        qbf = tq.QuantLaunch(i4, torch.ones(16, 768, 16, dtype=torch.bfloat16),
                             torch.ones(16, 512, 12, dtype=torch.bfloat16), None, None, 384, ptx=True)
        assert gluon_w4.w4_ok(p, qbf, "w13", w1i, x, interp=False)
    finally:
        gluon_experts._device_ok = dev


def _mxfp4_launch():
    """(launch, w13, w2, x) of a small mxfp4 problem (E 16, H 512, I 384; CPU tensors, never read) for the
    launcher's checks."""
    spec = tq.QuantSpec.of(Mxfp4Format())
    w1, w2 = torch.empty(16, 768, 256, dtype=torch.uint8), torch.empty(16, 512, 192, dtype=torch.uint8)
    q = tq.QuantLaunch(spec, torch.ones(16, 768, 16, dtype=torch.uint8), torch.ones(16, 512, 12, dtype=torch.uint8),
                       None, None, 384, ptx=True)
    return q, w1, w2, torch.empty(8, 512, dtype=torch.bfloat16)


def test_warp_specialised_config_and_its_limits():
    # "gluon_ws": decoded slots per GEMM reaches the plan; the launcher takes the warp-specialised kernels only for
    # swapped BN 64 tiles, 2-8 slots, rings within shared memory
    assert _plan(1, 8, _cfg(True, True)).gluon_ws == (0, 0)
    assert _plan(1, 8, _cfg(True, True, ws=4)).gluon_ws == (4, 4)
    q, w1, w2, x = _mxfp4_launch()
    dev = gluon_experts._device_ok
    try:
        gluon_experts._device_ok = lambda t: True  # as if on an sm_90 GPU
        # slots, w13 ok, w2 ok: w13's 6 slots need 252 KB of shared memory (12 + 192 + 48), w2's 8 slots 164 KB
        for ws, ok13, ok2 in ((2, True, True), (4, True, True), (5, True, True), (6, False, True), (8, False, True),
                              (1, False, False), (9, False, False)):
            p = _plan(8, 8, _cfg(True, True, ws=ws))
            assert gluon_w4.w4_ok(p, q, "w13", w1, x, interp=False) is ok13, ws
            assert gluon_w4.w4_ok(p, q, "w2", w2, x, interp=False) is ok2, ws
        # BN 128 (eight-warp partitions spill), unswapped tiles; swapped BLOCK_M 64 fits
        assert not gluon_w4.w4_ok(_plan(8, 8, _cfg(True, True, bn13=128, ws=4)), q, "w13", w1, x, False)
        assert not gluon_w4.w4_ok(_plan(300, 8, _cfg(True, True, bm=64, swap=False, ws=4)), q, "w13", w1, x,
                                       False)
        assert gluon_w4.w4_ok(_plan(300, 8, _cfg(True, True, bm=64, ws=4)), q, "w2", w2, x, False)
    finally:
        gluon_experts._device_ok = dev


def test_register_operand_config_and_its_limits():
    # "gluon_rega": 1 per GEMM reaches the plan; the launcher takes the register-operand kernels for swapped tiles
    # (BN 64 or 128) of at most 128 token rows only (round 14's cap of 32 came from the in-flight fragment race, fixed
    # in round 15), and not together with "gluon_ws"
    assert _plan(1, 8, _cfg(True, True)).gluon_rega == (0, 0)
    assert _plan(1, 8, _cfg(True, True, rega=True)).gluon_rega == (1, 1)
    assert _plan(1, 8, _cfg(True, True, rega=2)).gluon_rega == (2, 1)  # w13 gate, then up (w2: one fragment)
    for part, bad in (("w13", 3), ("w13", "1"), ("w13", -1), ("w2", 2)):
        cfg = _cfg(True, True, rega=True)
        cfg[part]["gluon_rega"] = bad
        with pytest.raises(ValueError, match=f'"{part}": "gluon_rega" = {bad!r}, expected one of'):
            _plan(1, 8, cfg)
    # "gluon_early" (round 20): 0 / 1 per GEMM, and only beside "gluon_rega"
    assert _plan(1, 8, _cfg(True, True, rega=True)).gluon_early == (False, False)
    assert _plan(1, 8, _cfg(True, True, rega=2, early=True)).gluon_early == (True, True)
    for part, bad in (("w13", 2), ("w2", "1"), ("w13", -1)):
        cfg = _cfg(True, True, rega=True)
        cfg[part]["gluon_early"] = bad
        with pytest.raises(ValueError, match=f'"{part}": "gluon_early" = {bad!r}, expected 0 or 1'):
            _plan(1, 8, cfg)
    cfg = _cfg(True, True)
    cfg["w2"]["gluon_early"] = 1
    with pytest.raises(ValueError, match='"w2": "gluon_early" = 1 needs "gluon_rega"'):
        _plan(1, 8, cfg)
    q, w1, w2, x = _mxfp4_launch()
    dev = gluon_experts._device_ok
    try:
        gluon_experts._device_ok = lambda t: True  # as if on an sm_90 GPU
        for cfg, ok in ((_cfg(True, True, rega=True), True), (_cfg(True, True, bn13=128, bn2=128, rega=True), True),
                        (_cfg(True, True, bm=32, rega=True), True), (_cfg(True, True, bm=64, rega=True), True),
                        (_cfg(True, True, bm=128, rega=True), True), (_cfg(True, True, bm=256, rega=True), False),
                        (_cfg(True, True, bm=64, swap=False, rega=True), False),
                        (_cfg(True, True, rega=True, ws=4), False)):
            p = _plan(8, 8, cfg)
            assert gluon_w4.w4_ok(p, q, "w13", w1, x, interp=False) is ok, cfg
            assert gluon_w4.w4_ok(p, q, "w2", w2, x, interp=False) is ok, cfg
    finally:
        gluon_experts._device_ok = dev


def test_gluon_w4_compiles_for_sm90_with_vector_copies_and_no_spills(tmp_path):
    # both kernels, mxfp4 / int4 g32 / int4 g128, swapped (BLOCK_M 16 / 32, BN 64 / 128) and unswapped (BLOCK_M 64),
    # even and partial K (gpt-oss 2880 = 22.5 steps): every copy a 16-byte cp.async, bf16 wgmma, no spills
    run_compiled("""
import re
from pathlib import Path
import compile_sm90 as c
tmp = Path(__import__("tempfile").mkdtemp())
for which in ("w13", "w2"):
    for quant, g in (("mxfp4", 32), ("int4", 32), ("int4", 128)):
        for bm, bn, swap, h, wbuf in ((16, 64, True, 7168, 1), (32, 128, True, 2880, 2), (64, 64, False, 2880, 2),
                                      (128, 64, False, 7168, 1)):
            k = c.gluon_w4(which, quant, bm=bm, bn=bn, swap=swap, h=h, i=h, g=g, wbuf=wbuf, stages=3)
            ptx = k.asm["ptx"]
            sizes = set(re.findall(r"cp\\.async\\.\\w+\\.shared\\.global \\[[^]]*\\], \\[[^]]*\\], (0x\\w+)", ptx))
            assert sizes == {"0x10"}, (which, quant, g, bm, bn, sizes)
            n = bm if swap else bn
            assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16" in ptx, (which, quant, bm, bn)
            rep = c.ptxas_report(ptx, tmp)
            assert "0 bytes spill stores" in rep and "C7514" not in rep, rep
print("ok")
""", tmp_path)


@pytest.mark.parametrize("form", ["warp_specialised", "register_operand"])
def test_swapped_w4_forms_compile_for_sm90_without_spills(tmp_path, form):
    # the two swapped forms over w13 / w2, mxfp4 / int4 g32 / g128, BLOCK_M 16 / 32 / 64, even and partial K: 16-byte
    # cp.async copies, bf16 wgmma with the token rows on N, no spills, no serialised wgmma; and each form's own
    # structure. Warp-specialised (:mod:`moekit.ops._gluon.w4_ws`, BN 64, the launcher's registers, slots and
    # ring depth): setmaxnreg per partition, mbarrier hand-offs, three 4-warp partitions. Register operand
    # (:mod:`moekit.ops._gluon.w4_rega`, BN 64 / 128): the wgmma's A is a register list and the fragment needs no
    # layout conversion (no st.shared, no shuffle: only the ring's cp.async writes shared memory), 16-byte shared
    # loads, four per row and tile (two rows per thread)
    run_compiled(f"""
import re
from pathlib import Path
import compile_sm90 as c
from moekit.ops import gluon_w4 as ge
tmp = Path(__import__("tempfile").mkdtemp())
form = {form!r}
for which, quant, g, bm, bn, h, d in (("w13", "mxfp4", 32, 16, 64, 7168, 4), ("w2", "mxfp4", 32, 16, 64, 2048, 6),
                                      ("w13", "int4", 32, 32, 128, 2880, 3), ("w2", "int4", 128, 64, 64, 2880, 2),
                                      ("w13", "int4", 128, 16, 64, 7168, 2), ("w2", "mxfp4", 32, 32, 128, 2880, 2)):
    kw = dict(bm=bm, h=h, i=h, g=g, bias=which == "w13" and h == 2880, act="swigluoai" if h == 2880 else "silu")
    if form == "warp_specialised":
        k = c.gluon_w4(which, quant, bn=64, stages=ge._WS_STAGES, wspec=(d, ge._WS_DEC_REGS), **kw)
    else:
        k = c.gluon_w4(which, quant, bn=bn, stages=3, rega=True, **kw)
    ptx = k.asm["ptx"]
    sizes = set(re.findall(r"cp\\.async\\.\\w+\\.shared\\.global \\[[^]]*\\], \\[[^]]*\\], (0x\\w+)", ptx))
    assert sizes == {{"0x10"}}, (which, quant, g, bm, sizes)
    mma = r"wgmma\\.mma_async\\.sync\\.aligned\\.m64n(\\d+)k16\\.f32\\.bf16\\.bf16 \\{{[^}}]*\\}}, (\\S)"
    wg = re.findall(mma, ptx)
    assert wg and all(n == str(bm) for n, _ in wg), (which, quant, wg[:2])
    if form == "warp_specialised":
        assert "setmaxnreg.inc.sync.aligned.u32" in ptx and "mbarrier.try_wait.parity" in ptx
        assert k.metadata.num_warps == 12
    else:
        assert all(a == "{{" for _, a in wg), (which, quant, wg[:2])  # A: a register list
        assert "st.shared" not in ptx and "shfl" not in ptx, (which, quant, bm, bn)
        tiles = 2 if which == "w13" else 1
        assert len(re.findall(r"ld\\.shared\\.v4\\.b32", ptx)) == tiles * 4 * 2, (which, quant, bm, bn)
    rep = c.ptxas_report(ptx, tmp)
    assert "0 bytes spill stores" in rep and "C7514" not in rep, rep
print("ok")
""", tmp_path)


def test_register_operand_decode_issues_few_instructions_per_value(tmp_path):
    # 4-bit decode is bound by instruction issue (docs/kernels.md, round 13): the register-operand K step's SASS per
    # decoded value (DeepSeek-V3 slice, BLOCK_M 16, BN 64: 64 values per thread and weight tile). Round 13's loop
    # took 5.7 (mxfp4 w13) / 5.0 (int4 w13); the per-pair decode (one prmt places a byte's two codes as the
    # fragment's k pair: no repacking) and the vector scale loads must keep it at or under these budgets; mxfp4 with
    # its step scales as one u32 per row (SWORD, round 19: 663 -> 611 / 352 -> 330 per step) under its own. The
    # budgets are Triton 3.6's (the pinned and the GPU machines' release); another release's compiler gets 5 % more
    # (Triton 3.9.0: mxfp4 w13 5.23, int4 w2 4.53)
    run_compiled("""
import compile_sm90 as c
import triton
slack = 1.0 if triton.__version__.startswith("3.6.") else 1.05
budget = {("w13", "mxfp4", False): 5.2, ("w2", "mxfp4", False): 5.6, ("w13", "int4", False): 3.9,
          ("w2", "int4", False): 4.4, ("w13", "mxfp4", True): 4.8, ("w2", "mxfp4", True): 5.2}
for (which, quant, sword), per_value in budget.items():
    n, ops = c.sass_loop_mix(c.gluon_w4(which, quant, bm=16, bn=64, stages=4, rega=True, sword=sword))
    values = 64 * (2 if which == "w13" else 1)
    assert n <= per_value * slack * values, (which, quant, sword, n / values, ops)
    assert ops["HGMMA"] == values // 8 and ops.get("LDG", 0) <= values // 32, (which, quant, ops)  # 1 scale load/row
print("ok")
""", tmp_path)


def test_serial_register_operand_w13_fits_four_programs_per_sm(tmp_path):
    # "gluon_rega": 2 exists for its registers (round 19): with gate, then up, one fragment live, the w13 needs at most
    # 128 per thread (four 4-warp programs in an SM's 64 K registers; the two-fragment loop: 145-156, three programs)
    # without spilling, for both formats at the shipped buckets' tiles (BLOCK_M 16, 3 ring slots, DeepSeek-V3 slice);
    # at BLOCK_M 32 (two accumulator columns more) it still takes fewer registers, but over 128
    run_compiled("""
import pathlib, re, tempfile
import compile_sm90 as c
for quant in ("mxfp4", "int4"):
    for bm in (16, 32):
        regs = {}
        for serial in (False, True):
            k = c.gluon_w4("w13", quant, bm, 64, stages=3, rega=True, serial=serial)
            rep = c.ptxas_report(k.asm["ptx"], pathlib.Path(tempfile.mkdtemp()))
            regs[serial] = int(re.search(r"Used (\\d+) registers", rep).group(1))
            assert " 0 bytes spill stores" in rep, rep
        assert regs[True] < regs[False] and (regs[True] <= 128 < regs[False] or bm > 16), (quant, bm, regs)
print("ok")
""", tmp_path)


def test_inflight_fragment_check_finds_a_write_before_the_wait(tmp_path):
    # the checker of the next test on hand-written SASS loops: a write into the A registers of a wgmma group still in
    # flight (round 14's kernels: the next step's loads right after a wait that leaves this step's group running) is
    # found, one after the wait that retires the group is not, nor a write into other registers or the accumulator's
    # own update; the second pass sees the group issued at the loop's end meet the loop's first instructions
    run_compiled("""
import compile_sm90 as c
def loop(*body):
    lines = [".L_x_1:"] + [f"        /*{16 * i:04x}*/                   {b} ;" for i, b in enumerate(body)]
    return "\\n".join(lines + [f"        /*{16 * len(body):04x}*/                   @P0 BRA `(.L_x_1) ;"])
mma = ["HGMMA.64x16x16.F32.BF16 R24, R40, gdesc[UR4], R24", "HGMMA.64x16x16.F32.BF16 R24, R44, gdesc[UR8], R24, gsb0"]
assert c.inflight_fragment_writes(loop("LDS.128 R40, [R2]", *mma, "WARPGROUP.DEPBAR.LE gsb0, 0x0")) == []
racy = c.inflight_fragment_writes(loop("LDS.128 R40, [R2]", *mma, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "IADD3 R46, R1, R2, RZ"))
assert racy == ["LDS.128 R40, [R2]", "IADD3 R46, R1, R2, RZ"], racy
assert c.inflight_fragment_writes(loop("LDS.128 R48, [R2]", *mma, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "IADD3 R8, R1, R2, RZ")) == []
# a write that lands in the middle of a 128-bit load's registers counts too
assert c.inflight_fragment_writes(loop(*mma, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "LDS.128 R38, [R2]")) == ["LDS.128 R38, [R2]"]
print("ok")
""", tmp_path)


def test_register_operand_gemm_never_writes_an_inflight_fragment(tmp_path):
    # round 15: the register-operand GEMMs (wgmma A from registers) waited only for step k - 1's wgmmas after issuing
    # step k's, and the compiled loop wrote the next step's loads and decode into the registers step k's wgmmas were
    # still reading. With BLOCK_M 64 (longer wgmmas) that gave wrong rows on the H200 for gpt-oss and DeepSeek-V3 int4
    # (benchmarks/rega_race_probe.py); at 16 / 32 the race was there but not seen. Now each step waits for its own
    # wgmmas first: no instruction of the loop may write an in-flight fragment, for both formats, both GEMMs, the
    # three tile heights, DeepSeek-V3 (full K steps; mxfp4 with its step scales as one word) and gpt-oss (partial K,
    # biases, swigluoai) slices; w13 also in its gate-then-up form ("gluon_rega": 2)
    run_compiled("""
import compile_sm90 as c
for quant in ("mxfp4", "int4"):
    for which, serial, early in (("w13", False, False), ("w13", True, False), ("w2", False, False),
                                 ("w13", False, True), ("w13", True, True), ("w2", False, True)):
        for bm in (16, 32, 64):
            for h, i, act, bias in ((7168, 2048, "silu", False), (2880, 2880, "swigluoai", True)):
                sword = quant == "mxfp4" and h == 7168  # the step scales as one word (whole K steps only)
                k = c.gluon_w4(which, quant, bm, 64, h, i, stages=3 if bm == 64 else 4, act=act, bias=bias, rega=True,
                               serial=serial, sword=sword, early=early)
                bad = c.inflight_fragment_writes(c.sass_text(k))
                assert bad == [], (quant, which, serial, early, bm, h, bad[:4])
print("ok")
""", tmp_path)


def test_register_operand_early_refill_issues_the_copies_before_the_decode(tmp_path):
    # "gluon_early" (round 20) moves a step's cp.async refill from after its wgmmas to right after its first barrier:
    # in the compiled loop every LDGSTS comes before the decode's first 16-byte shared load (LDS.128) and before the
    # first wgmma; without the key every one comes after the step's last wgmma wait. Both GEMMs, both formats, the
    # three launch shapes the key ships with (BLOCK_M 16 / 64 with 3 slots, 128 with 2), the same instructions
    run_compiled("""
import collections
import compile_sm90 as c
def first(body, op):
    return min(i for i, s in enumerate(body) if op in s)
for quant in ("mxfp4", "int4"):
    for which, bm, bn, st, serial in (("w13", 16, 64, 3, True), ("w13", 64, 64, 3, False), ("w13", 128, 64, 2, True),
                                      ("w2", 16, 64, 3, False), ("w2", 64, 128, 3, False)):
        mixes = []
        for early in (False, True):
            k = c.gluon_w4(which, quant, bm, bn, 7168, 2048, stages=st, rega=True, serial=serial, early=early,
                           sword=quant == "mxfp4")
            body = c._sass_loop(c.sass_text(k))
            copies = [i for i, s in enumerate(body) if "LDGSTS" in s]
            wait = max(i for i, s in enumerate(body) if "WARPGROUP.DEPBAR" in s)
            if early:
                assert max(copies) < min(first(body, "LDS.128"), first(body, "HGMMA")), (quant, which, bm)
            else:
                assert min(copies) > wait, (quant, which, bm)
            mixes.append(collections.Counter(c.opcodes(body)))
        assert mixes[0]["LDGSTS.E.BYPASS.128"] == mixes[1]["LDGSTS.E.BYPASS.128"] > 0, (quant, which, bm, mixes)
        assert mixes[0]["HGMMA.64x%dx16.F32.BF16" % bm] == mixes[1]["HGMMA.64x%dx16.F32.BF16" % bm] > 0
print("ok")
""", tmp_path)


def test_the_w4_launchers_arguments_compile(tmp_path):
    # the launcher's own call with a config asking for both Gluon kernels (swapped at T = 1, unswapped at 1000;
    # then the warp-specialised ones), the CPU tensors taken for an sm_90 GPU's: the Gluon kernels replace Triton's
    # w13 / w2 and compile with exactly the launcher's arguments (DeepSeek-V3 slice: silu; gpt-oss: swigluoai +
    # biases, partial K)
    run_compiled("""
import compile_sm90 as c
sw = {"BLOCK_M": 16, "sum_pass": True, "w13_split": False, "w13": {"SWAP": 1, "gluon": 1, "BN": 64},
      "w2": {"SWAP": 1, "gluon": 1, "BN": 64}}
un = {"BLOCK_M": 64, "sum_pass": True, "w13_split": False, "w13": {"SWAP": 0, "gluon": 1, "BN": 64},
      "w2": {"SWAP": 0, "gluon": 1, "BN": 128}}
for fmt in ("mxfp4", "int4_g32"):
    for shape in ("deepseek", "gpt-oss"):
        for t, patch in ((1, sw), (1000, un)):
            c.compile_gluon_launches(c.FORMATS[fmt], t, shape, "w4_w13_kernel", "w4_w2_sum_kernel", patch)
# the warp-specialised kernels with the launcher's arguments and persistent grid (T = 8: DeepSeek-V3 decode; 64)
ws = {"BLOCK_M": 16, "sum_pass": True, "w13_split": False,
      "w13": {"SWAP": 1, "gluon": 1, "BN": 64, "num_warps": 4, "gluon_ws": 4},
      "w2": {"SWAP": 1, "gluon": 1, "BN": 64, "num_warps": 4, "gluon_ws": 6}}
for fmt, shape, t in (("mxfp4", "deepseek", 8), ("int4_g32", "gpt-oss", 64)):
    c.compile_gluon_launches(c.FORMATS[fmt], t, shape, "w4ws_w13_kernel", "w4ws_w2_sum_kernel", ws)
    grids = {kf.__name__: kw for kf, _, kw in c.launches(c.FORMATS[fmt], t, shape, patch=ws, gluon=True)}
    assert grids["w4ws_w13_kernel"]["D"] == 4 and grids["w4ws_w2_sum_kernel"]["D"] == 6
ra = {"BLOCK_M": 16, "sum_pass": True, "w13_split": False, "w13": {"SWAP": 1, "gluon": 1, "gluon_rega": 1},
      "w2": {"SWAP": 1, "gluon": 1, "gluon_rega": 1}}
for fmt, shape, t in (("mxfp4", "deepseek", 1), ("int4_g32", "gpt-oss", 64), ("mxfp4", "gpt-oss", 8)):
    c.compile_gluon_launches(c.FORMATS[fmt], t, shape, "w4ra_w13_kernel", "w4ra_w2_sum_kernel", ra)
    # mxfp4's step scales as one u32 per row where K steps are whole and scale rows whole words (DeepSeek-V3: 224
    # bytes), not for gpt-oss (2880: a half step, 90-byte rows) nor int4 (bf16 scales)
    sword = {kf.__name__: kw["SWORD"] for kf, _, kw in c.launches(c.FORMATS[fmt], t, shape, patch=ra, gluon=True)
             if kf.__name__.startswith("w4ra")}
    assert set(sword.values()) == {fmt == "mxfp4" and shape == "deepseek"}, (fmt, shape, sword)
# "gluon_early" reaches the kernel it is set on, and only that one
ear = {**ra, "w2": {**ra["w2"], "gluon_early": 1}}
early = {kf.__name__: kw["EARLY"] for kf, _, kw in c.launches(c.FORMATS["mxfp4"], 8, "deepseek", patch=ear, gluon=True)
         if kf.__name__.startswith("w4ra")}
assert early == {"w4ra_w13_kernel": False, "w4ra_w2_sum_kernel": True}, early
print("ok")
""", tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
# (T, E, K, H, I, activation, bias, format, BLOCK_M, SWAP, w13 BN, w2 BN, hot, expert map, gluon_wbuf): DeepSeek-like
# decode (swapped BLOCK_M 16, T = 1 and 8: the one-program align the Gluon config asks for), mid-size swapped with
# BLOCK_M 32 and BN 128, unswapped BLOCK_M 64 and 128, gpt-oss partial K (2880: 22.5 steps) with swigluoai + biases,
# int4 groups of 32 and 128, a hot expert (its rows over many blocks), half the experts local (dead slots); one or
# two decoded tiles in flight (None: the plan's default, 1 swapped / 2 unswapped)
GPU_CASES = [
    (1, 16, 8, 7168, 2048, "silu", False, "mxfp4", 16, True, 64, 64, False, False, None),
    (8, 16, 8, 7168, 2048, "silu", False, "int4_g32", 16, True, 64, 64, False, False, 2),
    (64, 32, 4, 2880, 2880, "swigluoai", True, "mxfp4", 32, True, 64, 128, False, False, None),
    (600, 16, 8, 1024, 768, "silu", False, "mxfp4", 64, False, 64, 128, False, False, None),
    (523, 8, 4, 2880, 2880, "swigluoai", True, "int4_g32", 64, False, 64, 128, False, False, 1),
    (1100, 16, 8, 1024, 1024, "silu", False, "int4_g128", 128, False, 128, 128, False, False, None),
    (300, 16, 4, 1024, 768, "gelu_tanh", False, "mxfp4", 16, True, 64, 64, True, False, 2),
    (200, 16, 4, 1024, 768, "silu", True, "int4_g32", 32, True, 128, 64, False, True, None),
]
_FMTS = {"mxfp4": Mxfp4Format(), "int4_g32": Int4GroupFormat(32), "int4_g128": Int4GroupFormat(128)}


@pytest.mark.gpu
@pytest.mark.parametrize("t, e, k, h, i, act, bias, fmt, bm, swap, bn13, bn2, hot, emap, wbuf", GPU_CASES,
                         ids=["decode_t1_mxfp4", "decode_t8_int4", "swapped_bm32_gptoss", "unswapped_bm64",
                              "unswapped_partial_k_int4", "bm128_int4_g128", "hot_gelu_tanh", "expert_map"])
def test_gpu_gluon_w4_same_bits_as_triton(monkeypatch, t, e, k, h, i, act, bias, fmt, bm, swap, bn13, bn2, hot,
                                          emap, wbuf):
    run = quantised_run(_FMTS[fmt], act, bias, t=t, e=e, h=h, i=i, k=k, hot=hot, emap=emap,
                        limit=7.0 if act == "swigluoai" else None)
    calls13 = count_calls(monkeypatch, gluon_w4, "launch_w4_w13")
    calls2 = count_calls(monkeypatch, gluon_w4, "launch_w4_w2_sum")
    outs = []
    for g13, g2 in ((False, False), (True, True), (True, False), (False, True)):
        cfg = _cfg(g13, g2, bm=bm, swap=swap, bn13=bn13, bn2=bn2, wbuf=wbuf)
        outs.append(run(cfg))
    assert len(calls13) == 2 and len(calls2) == 2  # each Gluon kernel ran where asked
    for o in outs[1:]:
        assert torch.equal(outs[0], o)
    assert outs[0].isfinite().all() and outs[0].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("form", [{"ws": 2}, {"ws": 4}, {"rega": True}, {"rega": True, "stages": 5}, {"rega": 2},
                                  {"rega": True, "early": True}, {"rega": 2, "early": True, "stages": 2}],
                         ids=["warp_specialised_slots2", "warp_specialised_slots4", "register_operand",
                              "register_operand_stages5", "register_operand_serial", "register_operand_early",
                              "register_operand_serial_early_stages2"])
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[9]],
                         ids=["decode_t1_mxfp4", "decode_t8_int4", "swapped_bm32_gptoss", "hot_gelu_tanh",
                              "expert_map"])
def test_gpu_swapped_w4_forms_same_bits_as_triton(monkeypatch, case, form):
    # the swapped forms against the Triton kernels on the swapped cases above: warp-specialised (BN 64; 2 or 4
    # decoded slots; persistent programs over many tiles, e.g. the hot expert's) and register operand (the case's BN
    # 64 / 128; also with 5 ring slots); partial K, dead slots
    t, e, k, h, i, act, bias, fmt, bm, _, bn13, bn2, hot, emap, _ = case
    if "ws" in form:
        bn13 = bn2 = 64
    run = quantised_run(_FMTS[fmt], act, bias, t=t, e=e, h=h, i=i, k=k, hot=hot, emap=emap,
                        limit=7.0 if act == "swigluoai" else None)
    calls13 = count_calls(monkeypatch, gluon_w4, "launch_w4_w13")
    calls2 = count_calls(monkeypatch, gluon_w4, "launch_w4_w2_sum")
    ref = run(_cfg(False, False, bm=bm, bn13=bn13, bn2=bn2))
    out = run(_cfg(True, True, bm=bm, bn13=bn13, bn2=bn2, **form))
    assert len(calls13) == 1 and len(calls2) == 1
    assert torch.equal(ref, out)
    assert ref.isfinite().all() and ref.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("bm", [64, 128])
@pytest.mark.parametrize("fmt,act,bias,h,i", [("int4_g32", "silu", False, 1024, 512),
                                               ("mxfp4", "swigluoai", True, 2880, 2880)], ids=["int4", "mxfp4_gptoss"])
def test_gpu_register_operand_tall_tiles_same_bits_as_triton(monkeypatch, bm, fmt, act, bias, h, i):
    # round 15: 64 / 128 token rows on the wgmma's N side (the compute-bound buckets' tiles). Round 14's kernels gave
    # wrong rows here (the next step's decode wrote the registers of an in-flight wgmma's A fragment); 128 rows run
    # gate, then up, each waited for, with one fragment live. Many row blocks per expert (hot), partial K, biases,
    # w2 with BN 128
    run = quantised_run(_FMTS[fmt], act, bias, t=700, e=16, h=h, i=i, k=4, hot=True,
                        limit=7.0 if act == "swigluoai" else None)
    calls = count_calls(monkeypatch, gluon_w4, "launch_w4_w13")
    ref = run(_cfg(False, False, bm=bm, bn13=64, bn2=128))
    for _ in range(2):  # a race would not show every time
        assert torch.equal(ref, run(_cfg(True, True, bm=bm, bn13=64, bn2=128, rega=True)))
    # the ring refilled a step earlier (round 20), with two slots as DeepSeek-V3 T = 4096 ships it
    assert torch.equal(ref, run(_cfg(True, True, bm=bm, bn13=64, bn2=128, rega=True, early=True, stages=2)))
    assert len(calls) == 3 and ref.isfinite().all() and ref.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{}, {"ws": 4}, {"rega": True}, {"rega": True, "early": True}],
                         ids=["smem", "warp_specialised", "rega", "rega_early"])
def test_gpu_gluon_w4_under_cuda_graph_and_compile(monkeypatch, variant):
    # the public quantised call with a config asking for both Gluon kernels: torch.compile(fullgraph=True) and a CUDA
    # graph replayed on new inputs give the eager bits
    t, e, k, h, i = 8, 16, 8, 1024, 512
    w13, w2, x, w, ids, _, _ = experts_problem(torch.bfloat16, "silu", False, seed=4, t=t, e=e, h=h, i=i, k=k)
    fmt = Mxfp4Format()
    q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), fmt)
    calls = count_calls(monkeypatch, gluon_w4, "launch_w4_w13")
    monkeypatch.setattr(tq, "get_config", lambda *a, **kw: _cfg(True, True, **variant))  # a Gluon config

    def f(x, w, ids):
        return tq.fused_experts_quant_triton(x, q13, q2, w, ids, fmt=fmt, w13_scale=s13, w2_scale=s2)

    _, _, x2, w2_, ids2, _, _ = experts_problem(torch.bfloat16, "silu", False, seed=5, t=t, e=e, h=h, i=i, k=k)
    assert_compiled_and_graphed_bits(f, (x, w, ids), (x2, w2_, ids2))
    assert calls, "the Gluon w13 did not run"
