"""The Gluon fp8 block w2 (:mod:`moekit.ops._gluon.fp8_w2`, config ``"w2": {"gluon": 1}``) against the Triton w2.

It must give the same bits as the Triton kernel's sum-pass branch: the same wgmma per K step, the same scale
product and fma, the same epilogue; only the schedule differs (the promotion of step k - 1 runs while step k's
wgmma does). On CPU: it compiles for sm_90 without wgmma serialisation or spills, and the launcher takes it
only where it computes those bits. On the H200 (``gpu``): bit-identical outputs over the awkward shapes.
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
from small_experts import experts_problem  # noqa: E402


def _cfg(gluon: bool, bm: int = 64, bn2: int = 128, sum_pass: bool = True, stages: int = 4):
    w13 = {"BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    w2 = {"BN": bn2, "BK": 128, "GROUP_M": 8, "num_warps": bm // 16, "num_stages": stages}
    if gluon:
        w2["gluon"] = 1
    return {"BLOCK_M": bm, "w13": w13, "w2": w2, "tma": True, "fp8_acc": 128, "sum_pass": sum_pass}


@pytest.mark.parametrize("t, k, sum_pass, small, want", [
    (300, 8, True, 1024, True),     # 2400 slots: count + scatter align, sum pass: the Gluon w2 may run
    (300, 8, False, 1024, False),   # the fused top-k sum in w2's tail: only the Triton kernel has it
    (100, 8, True, 1024, False),    # 800 slots: the one-program align does not store row_start
    (300, 1, True, 1024, False),    # K = 1: no combine, no sum pass
])
def test_plan_takes_the_gluon_w2_only_with_its_inputs(t, k, sum_pass, small, want):
    plan = launch_plan(t, 512, 384, 768, 16, 16, k, torch.bfloat16, 0, True, False, False, False, False, None, False,
                       small, 16, _freeze(_cfg(True, sum_pass=sum_pass)))
    assert plan.w2_gluon == want
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


def test_gluon_fp8_w2_compiles_for_sm90_without_serialised_wgmma(tmp_path):
    # even (16), odd (3) and partial (2880 = 22.5 blocks) K step counts, BLOCK_M 64 / 128, bias and on-input:
    # the sm_90 PTX keeps the fp8 m64n128k32 wgmma, waits for one group per step, and ptxas neither spills nor
    # serialises the wgmmas (C7514: an instruction touched an in-flight accumulator), which would undo the overlap
    run_compiled("""
import tempfile, pathlib
import compile_sm90 as c
for bm, i, bias, on_input in ((64, 2048, False, False), (128, 2048, False, False), (64, 384, True, True),
                              (64, 2880, False, False)):
    k = c.gluon_fp8_w2(bm=bm, i=i, bias=bias, on_input=on_input)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx, (bm, i)
    steps = -(-i // 128)
    waits = ptx.count("wgmma.wait_group.sync.aligned 0;")
    assert waits >= 2 and "wgmma.wait_group.sync.aligned 1;" not in ptx, (bm, i, waits)
    rep = c.ptxas_report(ptx, pathlib.Path(tempfile.mkdtemp()))
    assert "C7514" not in rep and "0 bytes spill stores" in rep, rep
print("ok")
""", tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
# (T, E, K, H, I, bias, on_input, BLOCK_M, hot, expert map): DeepSeek-like K step count (I = 2048: 16, even),
# odd (384: 3), partial blocks (2880: 22.5, gpt-oss), bias + routing weight on the input (K = 1 has no sum pass,
# so K = 2 with the weight on the input), BLOCK_M 128, a hot expert (one expert's rows over many blocks),
# expert parallelism (half the experts local: dead slots)
GPU_CASES = [
    (600, 16, 8, 1024, 2048, False, False, 64, False, False),
    (701, 16, 4, 512, 384, False, False, 64, False, False),
    (523, 8, 4, 2880, 2880, True, False, 64, False, False),
    (600, 16, 2, 1024, 512, True, True, 64, False, False),
    (1100, 16, 8, 1024, 1024, False, False, 128, False, False),
    (900, 16, 4, 768, 1024, False, False, 64, True, False),
    (800, 16, 4, 768, 1024, False, False, 64, False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t, e, k, h, i, bias, on_input, bm, hot, emap", GPU_CASES,
                         ids=["deepseek_like", "odd_steps", "partial_blocks", "bias_on_input", "bm128", "hot",
                              "expert_map"])
def test_gpu_gluon_w2_same_bits_as_triton(monkeypatch, t, e, k, h, i, bias, on_input, bm, hot, emap):
    w13, w2, x, w, ids, b1, b2 = experts_problem(torch.bfloat16, "silu", bias, seed=3, t=t, e=e, h=h, i=i, k=k)
    if hot:
        ids[: t // 2, 0] = 0
        ids[: t // 2, 1:] = torch.arange(1, k, device=ids.device, dtype=ids.dtype)
    q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), Fp8BlockFormat(128, 128))
    spec = tq.QuantSpec.of(Fp8BlockFormat(128, 128))
    n_local = e // 2 if emap else e
    emap_t = None
    if emap:  # experts 0 .. e/2 - 1 on this rank, in order; the others dead
        emap_t = torch.full((e,), -1, dtype=torch.int32, device="cuda")
        emap_t[:n_local] = torch.arange(n_local, dtype=torch.int32, device="cuda")
    calls = []
    real = gluon_experts.launch_fp8_w2_sum
    monkeypatch.setattr(gluon_experts, "launch_fp8_w2_sum", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    outs = []
    for gl_on in (False, True):
        outs.append(tq.fused_experts_quant_impl(
            x, q13[:n_local], q2[:n_local], w, ids, spec, s13[:n_local], s2[:n_local], None, None, "silu", on_input,
            b1[:n_local] if bias else None, b2[:n_local] if bias else None, emap_t, None, config=_cfg(gl_on, bm)))
    assert len(calls) == 1  # the Gluon w2 ran in the second call only
    assert torch.equal(outs[0], outs[1])
    assert outs[1].isfinite().all()
