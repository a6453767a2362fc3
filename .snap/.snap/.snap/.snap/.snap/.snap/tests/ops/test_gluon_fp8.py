"""The Gluon fp8 block GEMMs (:mod:`moekit.ops._gluon`, config ``"w13" / "w2": {"gluon": 1}``) against Triton's.

Each must give the same bits as the Triton kernel it replaces (w13: the fused epilogue; w2: the sum-pass
branch): the same wgmma per K step, the same scale product and fma, the same epilogue functions; only the
schedule differs (the promotion of step k - 1 runs while step k's wgmma does). On CPU: they compile for sm_90
without wgmma serialisation or spills, and the launcher takes them only where they compute those bits. On the
H200 (``gpu``): bit-identical outputs over the awkward shapes. The warp-specialised, persistent forms (``"gluon_ws"``:
:mod:`moekit.ops._gluon.fp8_w2_ws`, :mod:`moekit.ops._gluon.fp8_w13_ws`) likewise, and the block -> expert table they
read (``_triton.align.block_expert_kernel``) against torch, interpreted on CPU.
"""

import pytest

import torch

pytest.importorskip("triton")

from compile_check import run_compiled  # noqa: E402
from moekit.ops import gluon_experts  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.formats import Fp8BlockFormat  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402
from moekit.ops.triton_plan import _freeze, launch_plan  # noqa: E402
from small_experts import (assert_compiled_and_graphed_bits, count_calls, experts_problem,  # noqa: E402
                           quantised_run)


def _cfg(gluon: bool, bm: int = 64, bn2: int = 128, sum_pass: bool = True, stages: int = 4, w13_gluon=None,
         bn13: int = 64, bk: int = 128):
    w13 = {"BN": bn13, "BK": bk, "GROUP_M": 8, "num_warps": bm // 16, "num_stages": stages}
    w2 = {"BN": bn2, "BK": bk, "GROUP_M": 8, "num_warps": bm // 16, "num_stages": stages}
    if gluon:
        w2["gluon"] = 1
    if gluon if w13_gluon is None else w13_gluon:
        w13["gluon"] = 1
    return {"BLOCK_M": bm, "w13": w13, "w2": w2, "tma": True, "fp8_acc": bk, "sum_pass": sum_pass}


@pytest.mark.parametrize("t, k, sum_pass, want", [
    (300, 8, True, True),     # 2400 slots: count + scatter align, sum pass: the Gluon w2 may run
    (300, 8, False, False),   # the fused top-k sum in w2's tail: only the Triton kernel has it
    (100, 8, True, True),     # 800 slots: the one-program align (it stores row_start too)
    (300, 1, True, False),    # K = 1: no combine, no sum pass
    (2, 8, True, True),       # 16 slots: a Gluon config runs the one-program align (row_start), not the inline layout
])
def test_plan_takes_the_gluon_kernels_only_with_their_inputs(t, k, sum_pass, want):
    plan = launch_plan(t, 512, 384, 768, 16, 16, k, torch.bfloat16, 0, True, False, False, False, False, None, False,
                       1024, 16, _freeze(_cfg(True, sum_pass=sum_pass)))
    assert plan.w2_gluon == want
    assert plan.w13_gluon and plan.align != "inline"  # w13 needs only an align kernel's row_start
    assert not launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None,
                           False, 1024, 16, _freeze(_cfg(False))).w2_gluon


def test_launcher_refuses_where_the_bits_would_differ():
    # CPU tensors, the interpreter, a non-block format, fp8_acc != BK or a tile wider than the scale block: Triton
    plan = launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None,
                       False, 1024, 16, _freeze(_cfg(True)))
    spec = tq.QuantSpec.of(Fp8BlockFormat(128, 128))
    w2 = torch.empty(16, 512, 384, dtype=torch.float8_e4m3fn)
    q = tq.QuantLaunch(spec, torch.ones(16, 6, 4), torch.ones(16, 4, 3), None, None, 384, 128, 128)
    assert not gluon_experts.fp8_w2_ok(plan, q, w2, interp=False)  # on the CPU
    assert not gluon_experts.fp8_w2_ok(plan, None, w2, interp=False)  # unquantised
    w1 = torch.empty(16, 768, 512, dtype=torch.float8_e4m3fn)
    assert not gluon_experts.fp8_w13_ok(plan, q, w1, tma=True, interp=False)
    split = launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None,
                        False, 1024, 16, _freeze(dict(_cfg(True), w13_split=True)))
    assert split.w2_gluon and not split.w13_gluon  # a split w13 has its own epilogue pass: Triton's


def test_gluon_needs_an_nvidia_hopper(monkeypatch):
    # ROCm reports its gfx major as the CUDA capability (MI300: 9): the Hopper kernels must not be chosen there
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    gluon_experts.gluon_available.cache_clear()
    try:
        assert not gluon_experts.gluon_available(0)
    finally:
        gluon_experts.gluon_available.cache_clear()


def test_gluon_fp8_compiles_for_sm90_without_serialised_wgmma(tmp_path):
    # even (16), odd (3) and partial (2880 = 22.5 blocks) K step counts, BLOCK_M 64 / 128, bias and on-input:
    # the sm_90 PTX keeps the fp8 m64n128k32 wgmma, waits for one group per step, and ptxas neither spills nor
    # serialises the wgmmas (C7514: an instruction touched an in-flight accumulator), which would undo the overlap
    run_compiled("""
import tempfile, pathlib
import compile_sm90 as c
for bm, i, bias, on_input, nt in ((64, 2048, False, False, 1), (128, 2048, False, False, 1), (64, 384, True, True, 1),
                                  (64, 2880, False, False, 1), (64, 2048, False, False, 4), (64, 384, True, True, 4)):
    k = c.gluon_fp8_w2(bm=bm, i=i, bias=bias, on_input=on_input, nt=nt)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx, (bm, i)
    steps = -(-i // 128)
    waits = ptx.count("wgmma.wait_group.sync.aligned 0;")
    assert waits >= 2 and "wgmma.wait_group.sync.aligned 1;" not in ptx, (bm, i, waits)
    rep = c.ptxas_report(ptx, pathlib.Path(tempfile.mkdtemp()))
    assert "C7514" not in rep and "0 bytes spill stores" in rep, rep
# w13: gathered rows by cp.async (4 x 16 B per thread and step), two wgmmas per step (gate, up), BN = 64; stacked
# ("gluon_stack"): one m64n128k32 wgmma over the gate and up rows, whose product splits into the two halves in
# registers (no shuffle, no shared-memory exchange: the promotion issues the same 64 FFMA per thread and step)
for kw in (dict(), dict(bm=128), dict(h=2880, i=2880, bias=True, act="swigluoai"), dict(act="gelu_tanh"),
           dict(stack=True), dict(stack=True, bm=128), dict(stack=True, h=2880, i=2880, bias=True, act="swigluoai")):
    k = c.gluon_fp8_w13(**kw)
    ptx = k.asm["ptx"]
    n = 128 if kw.get("stack") else 64
    assert f"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3" in ptx and "cp.async.cg.shared.global" in ptx, kw
    assert "wgmma.wait_group.sync.aligned 1;" not in ptx, kw
    rep = c.ptxas_report(ptx, pathlib.Path(tempfile.mkdtemp()))
    assert "C751" not in rep and "0 bytes spill stores" in rep, (kw, rep)
    (body,) = c.inner_loops(k)
    assert sum("QGMMA" in s for s in body) == 2 * (4 if kw.get("stack") else 8), kw  # two K steps per loop turn
    ops = [o.split(".")[0] for o in c.opcodes(body)]
    assert ops.count("FFMA") == 128 and not {"SHFL", "STS"} & set(ops), (kw, ops)
print("ok")
""", tmp_path)


def test_gluon_fp8_ws_compiles_for_sm90_without_spills_or_serialised_wgmma(tmp_path):
    # the warp-specialised w2 (fp8_w2_ws.py): one or two consumer warpgroups (BLOCK_M 64) and one 8-warp consumer
    # (BLOCK_M 128), even / odd / partial / single K step counts, bias and on-input, BN 64, 64 x 64 scale blocks and
    # 256 experts: the fp8 wgmma, no spill and no ptxas C75xx warning (C7514 / C7512:
    # wgmma serialised; C7517: a wait injected), the register split (producers 40, consumers 232 when they share
    # the SM with a second consumer), the scales copied by the producer onto the ring's barrier, and in the SASS
    # every consumer K loop (the innermost loops around the wgmmas) without a global load: its scales come from
    # shared memory, so no long-scoreboard wait feeds its fma
    run_compiled("""
import pathlib, re, tempfile
import compile_sm90 as c

cases = [dict(nc=1), dict(nc=2), dict(nc=1, bm=128), dict(nc=2, i=384, bias=True, on_input=True),
         dict(nc=2, i=2880), dict(nc=1, bm=128, i=2880, bias=True), dict(nc=2, bn=64), dict(nc=2, i=128),
         dict(nc=2, e=256), dict(nc=1, bm=128, e=256), dict(nc=2, bk=64, bn=64, i=512, h=1024)]
for kw in cases:
    k = c.gluon_fp8_w2_ws(**kw)
    ptx = k.asm["ptx"]
    n = 64 if kw.get("bn") == 64 else 128
    assert f"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3" in ptx, kw
    assert "wgmma.wait_group.sync.aligned 1;" not in ptx and "cp.async.mbarrier.arrive" in ptx, kw
    regs = {int(r) for r in re.findall(r"setmaxnreg\\.(?:inc|dec)\\.sync\\.aligned\\.u32\\s+(\\d+);", ptx)}
    assert max(regs) <= 256 and 40 in regs and (kw.get("nc") == 1 or 232 in regs), (kw, regs)
    rep = c.ptxas_report(ptx, pathlib.Path(tempfile.mkdtemp()))
    assert "C75" not in rep and "0 bytes spill stores" in rep, (kw, rep)
    loops = c.inner_loops(k)
    assert len(loops) == kw.get("nc", 2), (kw, len(loops))  # one K loop per consumer
    for body in loops:
        assert not any("LDG" in s for s in body) and sum("LDS" in s for s in body) >= 2, (kw, body)
print("ok")
""", tmp_path)


def test_gluon_fp8_w13_ws_compiles_for_sm90_without_spills_or_serialised_wgmma(tmp_path):
    # the warp-specialised w13 (fp8_w13_ws.py): one or two consumer warpgroups (BLOCK_M 64), one 8-warp consumer
    # (BLOCK_M 128) and two consumers sharing each 128-row tile (64 rows each, one ring); even (56), odd (5, 3),
    # partial (2880 = 22.5 blocks) and single K step counts; swigluoai with biases, gelu_tanh; BN 16 / 32 / 64;
    # 64 x 64 scale blocks with w2's input quantised in the epilogue (REQ 1); 256 experts: the fp8 m64nBNk32 wgmma (one wait per step pair), no spill and no ptxas C75xx warning, the register
    # split (producers 48, consumers 224-232 beside a second consumer), one K loop per consumer without a global
    # load (its scales come from shared memory) and one loop per one-warp producer that loads the sorted row tile
    # and both weight tiles by TMA (3 bulk tensor copies) and only the step's scales by cp.async (BM / 32 per
    # thread each: no row gather)
    run_compiled("""
import pathlib, re, tempfile
import compile_sm90 as c

cases = [dict(nc=2), dict(nc=1), dict(nc=1, bm=128), dict(nc=2, h=2880, i=2880, bias=True, act="swigluoai"),
         dict(nc=2, bn=32, h=640, i=384), dict(nc=1, h=384, act="gelu_tanh", bias=True), dict(nc=2, h=128),
         dict(nc=2, req=1, bk=64, h=1024, i=512), dict(nc=1, bm=128, h=2880, i=2880, bias=True, act="swigluoai"),
         dict(nc=2, e=256), dict(nc=2, bn=16, h=640, i=384), dict(nc=2, bm=128),
         dict(nc=2, bm=128, h=2880, i=2880, bias=True, act="swigluoai")]
for kw in cases:
    coop = kw["nc"] == 2 and kw.get("bm") == 128  # two consumers on one tile: one ring, one producer
    k = c.gluon_fp8_w13_ws(**kw)
    ptx = k.asm["ptx"]
    assert f"wgmma.mma_async.sync.aligned.m64n{kw.get('bn', 64)}k32.f32.e4m3.e4m3" in ptx, kw
    assert "wgmma.wait_group.sync.aligned 1;" not in ptx and "cp.async.mbarrier.arrive" in ptx, kw
    assert re.search(r"cp\\.async\\.bulk\\.tensor\\.2d\\.shared::(cluster|cta)\\.global", ptx), kw  # (3.9: cta)
    regs = {int(r) for r in re.findall(r"setmaxnreg\\.(?:inc|dec)\\.sync\\.aligned\\.u32\\s+(\\d+);", ptx)}
    assert max(regs) <= 256 and 48 in regs and (kw["nc"] == 1 or {224, 232} <= regs), (kw, regs)
    rep = c.ptxas_report(ptx, pathlib.Path(tempfile.mkdtemp()))
    assert "C75" not in rep and "0 bytes spill stores" in rep, (kw, rep)
    loops = c.inner_loops(k)
    assert len(loops) == kw["nc"], (kw, len(loops))  # one K loop per consumer
    for body in loops:
        assert not any("LDG" in s for s in body) and sum("LDS" in s for s in body) >= 6, (kw, body)
        assert sum("QGMMA" in s for s in body) == 2 * 2 * (kw.get("bk", 128) // 32), kw  # 2 steps x gate, up
    producers = c.inner_loops(k, "UTMALDG")
    assert len(producers) == (1 if coop else kw["nc"]), (kw, len(producers))
    for body in producers:
        assert sum("UTMALDG" in s for s in body) == 3, (kw, body)  # the sorted rows, the gate and the up tile
        copies = sum(bool(re.match(r"(@!?U?P\\w+\\s+)?LDGSTS", s)) for s in body)
        assert 3 <= copies <= 3 * kw.get("bm", 64) // 32, (kw, copies)  # s_x, S_gate, S_up of the step's rows
print("ok")
""", tmp_path)


def _block_table(counts: torch.Tensor, bm: int, n_blocks: int) -> torch.Tensor:
    """``_triton.align.block_expert_kernel``'s table for ``counts`` (rows per local expert), run (interpreted on
    CPU) on the align kernel's exclusive scan: [n_blocks] int32."""
    from moekit.ops._triton.align import block_expert_kernel

    e = counts.numel()
    nb = (counts + bm - 1) // bm
    row_start = ((torch.cumsum(nb, 0) - nb) * bm).to(torch.int32)
    blk = torch.full((n_blocks,), -1, dtype=torch.int32, device=counts.device)
    block_e = 1 << e.bit_length()  # next power of two >= e + 1, as the plan's BLOCK_E
    block_b = max(16, min(256, 8192 // block_e))
    block_expert_kernel[(-(-n_blocks // block_b),)](counts, row_start, blk, n_blocks, e, BM=bm, BLOCK_E=block_e,
                                                    BLOCK_B=block_b)
    return blk


@pytest.mark.parametrize("e, bm, seed", [(1, 64, 0), (5, 16, 1), (16, 64, 2), (16, 128, 3), (256, 64, 4)])
def test_block_expert_table_against_torch(e, bm, seed):
    # the persistent Gluon GEMMs' block -> expert table: block b belongs to expert e iff it lies in e's padded
    # blocks (experts with no row have none), E_local for the blocks past the last expert's (up to the plan's
    # bound on the blocks); experts with no rows, one hot expert over many blocks, exact multiples of BM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 3 * bm, (e,), generator=g)
    counts[torch.randperm(e, generator=g)[: e // 3]] = 0
    counts[0] = 5 * bm + 1 if e > 1 else counts[0]
    counts[-1] = 2 * bm if e > 2 else counts[-1]
    slots = int(counts.sum())
    n_blocks = -(-(slots + min(slots, e) * (bm - 1)) // bm)  # the plan's num_pid_m
    blk = _block_table(counts.to(torch.int32).to(dev), bm, n_blocks).cpu()
    want = torch.cat([torch.full((int(-(-c // bm)),), i, dtype=torch.int32) for i, c in enumerate(counts.tolist())])
    assert want.numel() <= n_blocks
    want = torch.cat([want, torch.full((n_blocks - want.numel(),), e, dtype=torch.int32)])
    assert torch.equal(blk, want)


def test_block_expert_table_after_the_align_kernel():
    # end to end on the align kernel's own layout (the one-program align, interpreted on CPU): every live sorted row
    # r holds a slot of the expert blk[r // BM], and the blocks past the last expert's say E_local
    from moekit.ops._triton import align
    from moekit.ops.triton_plan import launch_plan

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t, k, e, bm = 40, 4, 12, 16
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    ids[:10] = torch.arange(k, dtype=torch.int32)  # a hot expert (0) and experts with no slot (e - 1 at most)
    ids, tw = ids.to(dev), torch.rand(t, k, generator=g).to(dev) + 0.1
    cfg = _cfg(True, bm)
    cfg["w13"]["gluon_ws"] = 2
    p = launch_plan(t, 64, 64, 128, e, e, k, torch.bfloat16, 0, True, False, False, False, False, None, False, 1024,
                    16, _freeze(cfg))
    assert p.align == "small" and p.i32_sizes[6] >= p.num_pid_m  # the table has its own scratch view
    i32 = lambda n: torch.zeros(n, dtype=torch.int32, device=dev)  # noqa: E731
    counts, loc, rank, live, row_start = i32(e + 1), i32(t * k), i32(t * k), i32(t), i32(e)
    srt, sem = i32(p.rows), i32(1)
    out = torch.zeros(t, 64, dtype=torch.bfloat16, device=dev)
    align.align_small_kernel[(1,)](ids, tw, loc, counts, loc, rank, live, sem, out, row_start, srt, t, k, 64, e, e,
                                   1, ids.stride(0), tw.stride(0), out.stride(0), **p.align_kw)
    blk = torch.full((p.num_pid_m,), -1, dtype=torch.int32, device=dev)
    from moekit.ops import gluon_experts

    gluon_experts.launch_block_table(lambda kf, grid, *a, **kw: kf[grid](*a, **kw), p, counts, row_start, blk, e)
    counts, row_start, srt, blk = counts[:e].cpu(), row_start.cpu(), srt.cpu(), blk.cpu()
    for x in range(e):
        rows = torch.arange(int(row_start[x]), int(row_start[x]) + int(counts[x]))
        assert torch.equal(ids.cpu().flatten()[srt[rows].long()], torch.full_like(rows, x).int()), x
        assert (blk[rows // bm] == x).all(), x
    used = int(((counts + bm - 1) // bm).sum())
    assert (blk[used:] == e).all() and (blk[:used] < e).all()


def _ws_plan(nc, bm: int = 64, bn2: int = 128, bk: int = 128, part: str = "w2", bn13: int = 64):
    cfg = _cfg(True, bm, bn2=bn2, bk=bk, bn13=bn13)
    cfg[part]["gluon_ws"] = nc
    return launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None,
                       False, 1024, 16, _freeze(cfg))


def test_warp_specialised_w2_limits():
    # "gluon_ws" (w2) is the consumer count of the warp-specialised fp8 w2: 1 or 2 with BLOCK_M 64, 1 with BLOCK_M
    # 128 (two 8-warp consumers would need twice the SM's registers), BN 32-128; outside these (and at 0) the
    # one-warpgroup Gluon w2 runs (the same bits). Its rings fit ~220 KB of shared memory with 2+ slots each
    ok = gluon_experts.fp8_w2_ws_ok
    assert _ws_plan(2).gluon_ws == (0, 2)
    assert ok(_ws_plan(1)) and ok(_ws_plan(2)) and ok(_ws_plan(1, bm=128)) and ok(_ws_plan(2, bn2=64, bk=64))
    assert not ok(_ws_plan(0)) and not ok(_ws_plan(3)) and not ok(_ws_plan(2, bm=128))
    assert not ok(_ws_plan(1, bn2=256)) and not ok(_ws_plan(1, bm=32))
    stages = gluon_experts.fp8_w2_ws_stages
    for bm, bn, bk, nc in ((64, 128, 128, 1), (64, 128, 128, 2), (128, 128, 128, 1), (64, 64, 64, 2), (64, 32, 128, 2)):
        n = stages(bm, bn, bk, nc)
        assert 2 <= n <= 8 and nc * n * ((bm + bn) * bk + 8 * bm) <= 220 * 1024, (bm, bn, bk, nc, n)
    assert stages(64, 128, 128, 2) == 4 and stages(64, 128, 128, 1) == 8 and stages(128, 128, 128, 1) == 6


def test_warp_specialised_w13_limits():
    # "gluon_ws" (w13): the consumer count of the warp-specialised fp8 w13, 1 or 2 with BLOCK_M 64 (each its own
    # tiles) or 128 (one 8-warp consumer, or two sharing each tile: one ring); BN 16-64 (six [64, BN] fp32 tiles
    # per consumer thread), BK 64 / 128; outside these (and at 0) the one-warpgroup Gluon w13 runs (the same bits).
    # Its rings (a [BM, BK] and two [BN, BK] fp8 tiles, three scales per row and slot) fit ~220 KB of shared memory
    # with 2+ slots each; a plan asking for a warp-specialised GEMM holds a block -> expert table of one entry per
    # row block
    ok = gluon_experts.fp8_w13_ws_ok
    plan = lambda nc, **kw: _ws_plan(nc, part="w13", **kw)  # noqa: E731
    assert plan(2).gluon_ws == (2, 0) and plan(2).i32_sizes[6] >= plan(2).num_pid_m
    assert _ws_plan(0).i32_sizes[6] == 32  # no table asked: a minimal view
    assert ok(plan(1)) and ok(plan(2)) and ok(plan(1, bm=128)) and ok(plan(2, bn13=32)) and ok(plan(2, bk=64))
    assert ok(plan(2, bm=128)) and gluon_experts.fp8_w13_ws_coop(128, 2) and not gluon_experts.fp8_w13_ws_coop(64, 2)
    assert not ok(plan(0)) and not ok(plan(3)) and not ok(plan(1, bm=32))
    assert not ok(plan(1, bn13=128)) and not ok(_ws_plan(2))  # BN 128: twelve accumulators; the w2 key is w2's
    stages = gluon_experts.fp8_w13_ws_stages
    for bm, bn, bk, nc in ((64, 64, 128, 1), (64, 64, 128, 2), (128, 64, 128, 1), (64, 32, 128, 2), (64, 64, 64, 2),
                           (128, 64, 128, 2)):
        n = stages(bm, bn, bk, nc)
        rings = 1 if bm == 128 else nc
        assert 2 <= n <= 8 and rings * n * ((bm + 2 * bn) * bk + 12 * bm) <= 220 * 1024, (bm, bn, bk, nc, n)
    assert stages(64, 64, 128, 2) == 4 and stages(64, 64, 128, 1) == 8 and stages(128, 64, 128, 1) == 6
    assert stages(128, 64, 128, 2) == 6  # one ring for both consumers


@pytest.mark.parametrize("value", ["1", 2, 0.5, None])
def test_gluon_stack_must_be_on_or_off(value):
    # a "gluon_stack" other than 0 / 1 / a bool is refused when the plan is made, naming the part, key and value
    cfg = _cfg(True)
    cfg["w13"]["gluon_stack"] = value
    with pytest.raises(ValueError, match=f'"w13": "gluon_stack" = {value!r}, expected 0 or 1'):
        launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None, False,
                    1024, 16, _freeze(cfg))
    cfg["w13"]["gluon_stack"] = True
    assert launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None,
                       False, 1024, 16, _freeze(cfg)).gluon_stack


@pytest.mark.parametrize("part", ["w13", "w2"])
@pytest.mark.parametrize("value", ["2", -1, 1.5, None])
def test_gluon_ws_must_be_a_count(part, value):
    # a "gluon_ws" that is no int >= 0 is refused when the plan is made, naming the part, the key and the value
    # (True and 2.0 too, unless the plan cache holds the equal config with 1 / 2: then they mean that)
    cfg = _cfg(True)
    cfg[part]["gluon_ws"] = value
    with pytest.raises(ValueError, match=f'"{part}": "gluon_ws" = {value!r}, expected an int >= 0'):
        launch_plan(300, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None, False,
                    1024, 16, _freeze(cfg))


def test_the_warp_specialised_launchers_arguments_compile(tmp_path):
    # the launcher's own call with "gluon_ws" 1 / 2 (the CPU tensors taken for an sm_90 GPU's, 132 SMs): the
    # warp-specialised w2 / w13 replace the Gluon w2 / w13 with their persistent grids and compile with exactly the
    # launcher's arguments; a count outside their limits (3) runs the one-warpgroup Gluon kernel
    run_compiled("""
import compile_sm90 as c
for shape in ("deepseek", "gpt-oss"):
    for nc in (1, 2):
        c.compile_gluon_launches(c.FORMATS["fp8_block"], 1000, shape, "fp8_w13_kernel", "fp8_w2_ws_sum_kernel",
                                 {"w2": {"gluon_ws": nc}})
        kw = {kf.__name__: kw for kf, _, kw in c.launches(c.FORMATS["fp8_block"], 1000, shape,
                                                          patch={"w2": {"gluon_ws": nc}}, gluon=True)}
        assert kw["fp8_w2_ws_sum_kernel"]["NC"] == nc and kw["fp8_w2_ws_sum_kernel"]["STAGES"] == 8 // nc, kw
names = [kf.__name__ for kf, _, _ in c.launches(c.FORMATS["fp8_block"], 1000, "deepseek", patch={"w2": {"gluon_ws": 3}},
                                                 gluon=True)]
assert "fp8_w2_sum_kernel" in names and "fp8_w2_ws_sum_kernel" not in names, names
# the warp-specialised w13 (alone and beside the warp-specialised w2): its persistent grid, ring slots and
# consumers, the block -> expert table written once per chunk, before the first kernel that reads it (and not at
# all when neither runs: a count outside the limits gives the one-warpgroup Gluon w13)
for shape in ("deepseek", "gpt-oss"):
    for ws13, ws2 in ((1, 0), (2, 0), (2, 2), (1, 1)):
        patch = {"w13": {"gluon_ws": ws13}, "w2": {"gluon_ws": ws2}}
        w2 = "fp8_w2_ws_sum_kernel" if ws2 else "fp8_w2_sum_kernel"
        c.compile_gluon_launches(c.FORMATS["fp8_block"], 1000, shape, "fp8_w13_ws_kernel", w2, patch)
        seen = c.launches(c.FORMATS["fp8_block"], 1000, shape, patch=patch, gluon=True)
        names = [kf.__name__ for kf, _, _ in seen]
        assert names.count("block_expert_kernel") == 1, names
        assert names.index("block_expert_kernel") + 1 == names.index("fp8_w13_ws_kernel"), names
        kw = {kf.__name__: kw for kf, _, kw in seen}
        assert kw["fp8_w13_ws_kernel"]["NC"] == ws13 and kw["fp8_w13_ws_kernel"]["STAGES"] == 8 // ws13, kw
        grid = {kf.__name__: a for kf, a, _ in seen}  # (the launches record no grid: the table's size instead)
        assert grid["block_expert_kernel"][3] == grid["fp8_w13_ws_kernel"][15], names  # n_blocks = num_pid_m
names = [kf.__name__ for kf, _, _ in c.launches(c.FORMATS["fp8_block"], 1000, "deepseek",
                                                 patch={"w13": {"gluon_ws": 3}}, gluon=True)]
assert "fp8_w13_kernel" in names and "fp8_w13_ws_kernel" not in names and "block_expert_kernel" not in names, names
names = [kf.__name__ for kf, _, _ in c.launches(c.FORMATS["fp8_block"], 1000, "deepseek", patch={"w2": {"gluon_ws": 2}},
                                                 gluon=True)]
assert names.count("block_expert_kernel") == 1 and names.index("block_expert_kernel") + 1 == names.index(
    "fp8_w2_ws_sum_kernel"), names
print("ok")
""", tmp_path)


def test_the_launchers_arguments_compile(tmp_path):
    # the launcher's own call (heuristic fp8 config at T = 1000: unswapped, "gluon": 1), with the CPU tensors
    # taken for an sm_90 GPU's: both Gluon kernels are launched in place of Triton's w13 / w2, and compile with
    # exactly the arguments the launcher passes (DeepSeek-V3 slice: silu; gpt-oss: swigluoai + biases, partial K)
    run_compiled("""
import compile_sm90 as c
for shape in ("deepseek", "gpt-oss"):
    c.compile_gluon_launches(c.FORMATS["fp8_block"], 1000, shape, "fp8_w13_kernel", "fp8_w2_sum_kernel")
print("ok")
""", tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
# (T, E, K, H, I, activation, bias, on_input, BLOCK_M, hot, expert map, scale block): DeepSeek-like K step counts
# (w13 56 / w2 16, even), odd (H 640: 5, I 384: 3), partial blocks and swigluoai with a limit and biases (gpt-oss:
# 2880 = 22.5 blocks), the routing weight on the input with gelu_tanh (K = 2: K = 1 has no sum pass), BLOCK_M 128,
# a hot expert (one expert's rows over many blocks) with silu_post_clamp, expert parallelism (half the experts
# local: dead slots), 64 x 64 scale blocks (w13 BN = the group: w2's input quantised in w13's epilogue), 600 slots
# (the one-program align kernel)
GPU_CASES = [
    (600, 16, 8, 7168, 2048, "silu", False, False, 64, False, False, 128),
    (701, 16, 4, 640, 384, "silu", False, False, 64, False, False, 128),
    (523, 8, 4, 2880, 2880, "swigluoai", True, False, 64, False, False, 128),
    (600, 16, 2, 1024, 512, "gelu_tanh", True, True, 64, False, False, 128),
    (1100, 16, 8, 1024, 1024, "silu", False, False, 128, False, False, 128),
    (900, 16, 4, 768, 1024, "silu_post_clamp", False, False, 64, True, False, 128),
    (800, 16, 4, 768, 1024, "silu", False, False, 64, False, True, 128),
    (600, 16, 4, 1024, 512, "silu", False, False, 64, False, False, 64),
    (150, 8, 4, 1024, 768, "silu", False, False, 64, False, False, 128),
]
gpu_cases = pytest.mark.parametrize(
    "t, e, k, h, i, act, bias, on_input, bm, hot, emap, block", GPU_CASES,
    ids=["deepseek_like", "odd_steps", "partial_blocks_swigluoai", "bias_on_input", "bm128", "hot", "expert_map",
         "block64_fused_requant", "single_program_align"])


def _case_run(t, e, k, h, i, act, bias, on_input, hot, emap, block):
    """:func:`small_experts.quantised_run` of one ``GPU_CASES`` problem (fp8 block ``block`` x ``block``)."""
    limit = 7.0 if act in ("swigluoai", "silu_post_clamp") else None
    return quantised_run(Fp8BlockFormat(block, block), act, bias, t=t, e=e, h=h, i=i, k=k, hot=hot, emap=emap,
                         on_input=on_input, limit=limit)


@pytest.mark.gpu
@gpu_cases
def test_gpu_gluon_same_bits_as_triton(monkeypatch, t, e, k, h, i, act, bias, on_input, bm, hot, emap, block):
    run = _case_run(t, e, k, h, i, act, bias, on_input, hot, emap, block)
    calls13 = count_calls(monkeypatch, gluon_experts, "launch_fp8_w13")
    calls2 = count_calls(monkeypatch, gluon_experts, "launch_fp8_w2_sum")
    outs = []
    # Triton only; both Gluon kernels; each alone (the w13 output feeds the other kernel unchanged); the Gluon w2
    # with 3 and 8 column tiles per program ("gluon_nt": a last group short of tiles, more than a row has); the
    # Gluon w13 with gate and up stacked into one tile and one wgmma ("gluon_stack"), alone and beside the Gluon w2
    for g2, g13, nt, stack in ((False, False, 1, 0), (True, True, 1, 0), (False, True, 1, 0), (True, False, 1, 0),
                               (True, False, 3, 0), (True, True, 8, 0), (False, True, 1, 1), (True, True, 1, 1)):
        cfg = _cfg(g2, bm, bn2=min(128, block), w13_gluon=g13, bk=block)
        cfg["w2"]["gluon_nt"] = nt
        if stack:
            cfg["w13"]["gluon_stack"] = 1
        outs.append(run(cfg))
    assert len(calls13) == 5 and len(calls2) == 5  # each Gluon kernel ran where asked
    for o in outs[1:]:
        assert torch.equal(outs[0], o)
    assert outs[0].isfinite().all()


def _record_ws(monkeypatch, name: str = "fp8_w2_ws_ok") -> list:
    """Record what :func:`gluon_experts.fp8_w2_ws_ok` (or ``name``: ``fp8_w13_ws_ok``) answered at every Gluon
    w2 (w13) launch (True: the warp-specialised kernel ran)."""
    took, real = [], getattr(gluon_experts, name)
    monkeypatch.setattr(gluon_experts, name, lambda p: took.append(real(p)) or took[-1])
    return took


@pytest.mark.gpu
@gpu_cases
def test_gpu_gluon_ws_same_bits_as_triton(monkeypatch, t, e, k, h, i, act, bias, on_input, bm, hot, emap, block):
    # the warp-specialised, persistent Gluon w2 ("gluon_ws": 1 and 2 consumers; each tile's expert from the block ->
    # expert table) against the Triton kernels, after Triton's w13 and after the Gluon w13; persistent programs
    # over more tiles than SMs (a consumer with several tiles, row blocks past the last expert skipped) and, in the
    # last case, fewer tiles than two per program (a second consumer and its producer with none)
    run = _case_run(t, e, k, h, i, act, bias, on_input, hot, emap, block)
    took = _record_ws(monkeypatch)
    ref = run(_cfg(False, bm, bn2=min(128, block), bk=block))
    assert ref.isfinite().all()
    forms = ((1, False), (2, False), (1, True), (2, True))
    for nc, g13 in forms:
        cfg = _cfg(True, bm, bn2=min(128, block), w13_gluon=g13, bk=block)
        cfg["w2"]["gluon_ws"] = nc
        assert torch.equal(ref, run(cfg)), (nc, g13)
    # it ran wherever its limits hold (BLOCK_M 128: one consumer; two fall back to the one-warpgroup Gluon w2)
    assert took == [bm == 64 or nc == 1 for nc, _ in forms]


@pytest.mark.gpu
@gpu_cases
def test_gpu_gluon_w13_ws_same_bits_as_triton(monkeypatch, t, e, k, h, i, act, bias, on_input, bm, hot, emap,
                                              block):
    # the warp-specialised, persistent Gluon w13 ("gluon_ws": 1 and 2 consumers, the rows by TMA from activations
    # quantised into the sorted rows) against the Triton kernels and the one-warpgroup Gluon w13, before Triton's
    # w2, the Gluon w2 and the warp-specialised w2 (which then reads the table the w13 wrote), and with BLOCK_M 128
    # two consumers sharing each tile (64 rows each; the tiling changes no reduction order, so the bits are the
    # reference's): odd / partial K steps, swigluoai with biases, w2's input quantised in the epilogue (64 x 64
    # blocks), a hot expert, expert parallelism (dead slots), row blocks past the last expert, fewer tiles than
    # consumers (the last case)
    run = _case_run(t, e, k, h, i, act, bias, on_input, hot, emap, block)
    took13 = _record_ws(monkeypatch, "fp8_w13_ws_ok")
    took2 = _record_ws(monkeypatch)
    bn2 = min(128, block)
    ref = run(_cfg(False, bm, bn2=bn2, bk=block))
    assert ref.isfinite().all()
    assert torch.equal(ref, run(_cfg(True, bm, bn2=bn2, bk=block)))  # the one-warpgroup Gluon GEMMs
    forms = ((1, False, 0, bm), (2, False, 0, bm), (1, True, 0, bm), (2, True, 0, bm), (2, True, 2, bm),
             (1, True, 1, bm), (2, False, 0, 128), (2, True, 1, 128))
    for nc, g2, ws2, bm_ in forms:
        cfg = _cfg(g2, bm_, bn2=bn2, w13_gluon=True, bk=block)
        cfg["w13"]["gluon_ws"] = nc
        if ws2:
            cfg["w2"]["gluon_ws"] = ws2
        assert torch.equal(ref, run(cfg)), (nc, g2, ws2, bm_)
    # each ran wherever its limits hold (the w2: BLOCK_M 128 with one consumer only; two fall back to the
    # one-warpgroup Gluon w2)
    assert took13 == [False] + [True] * len(forms), took13
    assert took2 == [False] + [bool(ws2) and (bm_ == 64 or ws2 == 1) for _, g2, ws2, bm_ in forms if g2], took2


@pytest.mark.gpu
@pytest.mark.parametrize("ws13, ws", [(0, 0), (0, 1), (0, 2), (2, 0), (1, 2)])
def test_gpu_gluon_under_cuda_graph_and_compile(monkeypatch, ws13, ws):
    # the public quantised call with the heuristic config (unswapped tiles at 300 rows per expert: both Gluon
    # kernels; ws13 / ws: with the warp-specialised w13 / w2 of 1 / 2 consumers, and their block -> expert table):
    # torch.compile(fullgraph=True) and a CUDA graph replayed on new inputs give the eager bits
    from moekit.ops.triton_configs import heuristic_config

    t, e, k, h, i = 600, 16, 8, 1024, 512
    cfg = heuristic_config(t, e, h, i, k, torch.bfloat16, 132, quant="fp8_block128x128")
    assert cfg["w13"].get("gluon") and cfg["w2"].get("gluon")
    took, took13 = _record_ws(monkeypatch), _record_ws(monkeypatch, "fp8_w13_ws_ok")
    if ws or ws13:  # (a copy: returned configs are shared)
        cfg = {**cfg, "w13": {**cfg["w13"], "gluon_ws": ws13}, "w2": {**cfg["w2"], "gluon_ws": ws}}
        monkeypatch.setattr(tq, "get_config", lambda *a, **kw: cfg)
    w13, w2, x, w, ids, _, _ = experts_problem(torch.bfloat16, "silu", False, seed=4, t=t, e=e, h=h, i=i, k=k)
    fmt = Fp8BlockFormat(128, 128)
    q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), fmt)
    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w13")

    def f(x, w, ids):
        return tq.fused_experts_quant_triton(x, q13, q2, w, ids, fmt=fmt, w13_scale=s13, w2_scale=s2)

    _, _, x2, w2_, ids2, _, _ = experts_problem(torch.bfloat16, "silu", False, seed=5, t=t, e=e, h=h, i=i, k=k)
    assert_compiled_and_graphed_bits(f, (x, w, ids), (x2, w2_, ids2))
    assert calls, "the Gluon w13 did not run"
    assert took and all(took) == bool(ws), took  # the warp-specialised w2 ran iff asked
    assert took13 and all(took13) == bool(ws13), took13  # the warp-specialised w13 likewise
