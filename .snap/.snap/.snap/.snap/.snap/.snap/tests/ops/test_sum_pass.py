"""``sum_pass`` (config key): the w2 GEMM stores its weighted slot rows and a separate pass sums each token's
K rows (:mod:`moekit.ops._triton.combine`). It adds the same values in the same order as the fused combine, so
the output must be the same bits — for every epilogue and format, with dead slots (expert-parallel maps,
zero weights) and tokens with no live slot; K == 1 has no combine and ignores the key.
"""

import pytest

import torch

pytest.importorskip("triton")

from moekit.ops.triton_configs import heuristic_config  # noqa: E402
from moekit.ops.triton_experts import fused_experts_impl  # noqa: E402
from moekit.ops.triton_plan import _freeze, _pad, launch_plan  # noqa: E402
from small_experts import DEV, EPILOGUES, FORMATS, E, H, I, K, T, experts_problem, quantised_same_bits  # noqa: E402


def _cfg(sum_pass=False, bn=64):
    cfg = heuristic_config(T, E, H, I, K, torch.bfloat16, 4)
    cfg = dict(cfg, w13=dict(cfg["w13"], BN=bn), w2=dict(cfg["w2"], BN=32))  # H = 64: two w2 column blocks
    return dict(cfg, sum_pass=sum_pass)


@pytest.mark.parametrize("dtype, act, bias", EPILOGUES, ids=lambda v: str(v).replace("torch.", ""))
def test_unquantised_sum_pass_is_the_same_bits(dtype, act, bias):
    w13, w2, x, w, ids, b1, b2 = experts_problem(dtype, act, bias)
    w13, w2 = w13.to(DEV), w2.to(DEV)
    limit = 7.0 if act in ("swigluoai", "silu_post_clamp") else None
    runs = [fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=_cfg(sp))
            for sp in (False, True)]
    assert torch.equal(runs[0], runs[1])
    plan = launch_plan(T, H, I, w13.shape[1], E, E, K, dtype, 0, act != "relu2", False, bias, bias, False, limit,
                       False, 8192, 0, _freeze(_cfg(True)))
    assert plan.sum_pass and plan.w2_kw["SUM_PASS"] and plan.grid_sum == (T, 1)  # the pass really ran


@pytest.mark.parametrize("inline, small", [(32, 8192), (0, 8192), (0, 0)], ids=["inline", "single", "multi"])
def test_dead_slots_and_dead_tokens(monkeypatch, inline, small):
    # an expert map that drops experts 2 and 3 (token rows whose slots all map there are 0), a zero weight
    # (dead on the output-weighted path), on each align path (inline decode, single launch, count + scatter)
    from moekit.ops import triton_experts

    monkeypatch.setattr(triton_experts, "INLINE_SLOTS", inline)
    monkeypatch.setattr(triton_experts, "SMALL_SLOTS", small)
    w13, w2, x, w, ids, _, _ = experts_problem(torch.bfloat16, "silu", False, t=9)
    emap = torch.tensor([0, 1, -1, -1], dtype=torch.int32, device=DEV)
    ids[0] = torch.tensor([2, 3], dtype=ids.dtype)  # token 0: no live slot
    w[1, 0] = 0.0  # token 1: its first slot dead
    w13l, w2l = w13[:2].to(DEV), w2[:2].to(DEV)
    runs = []
    for sp in (False, True):
        out = torch.full_like(x, float("nan"))
        fused_experts_impl(x, w13l, w2l, w, ids, "silu", False, None, None, emap, None, config=_cfg(sp), out=out)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[1][0], torch.zeros_like(runs[1][0])) and not runs[1].isnan().any()


@pytest.mark.parametrize("t, k, key, on", [
    (8, 8, None, True),     # 64 slots: the pass by default (SUM_PASS_SLOTS)
    (7, 9, None, False),    # 63 slots: fused
    (1024, 8, False, False),  # the config's word wins either way
    (2, 2, True, True),
])
def test_default_by_slot_count(t, k, key, on):
    from moekit.ops.triton_plan import SUM_PASS_SLOTS

    assert SUM_PASS_SLOTS == 64
    cfg = {kk: v for kk, v in _cfg().items() if kk != "sum_pass"}
    if key is not None:
        cfg["sum_pass"] = key
    plan = launch_plan(t, H, I, 2 * I, E, E, k, torch.bfloat16, 0, True, False, False, False, False, None, False,
                       8192, 0, _freeze(cfg))
    assert plan.sum_pass == on and plan.w2_kw["SUM_PASS"] == on
    # the fused sum's semaphores are zeroed (align, inline w13) and sized only when w2 sums in its tail
    assert plan.align_kw["COMBINE"] == plan.w13_kw["COMBINE"] == (not on)
    assert plan.i32_sizes[-1] == _pad(1 if on else t * plan.nbn)


def test_top1_ignores_the_key():
    plan = launch_plan(T, H, I, 2 * I, E, E, 1, torch.bfloat16, 0, True, False, False, False, False, None, False,
                       8192, 0, _freeze(_cfg(True)))
    assert not plan.sum_pass and not plan.w2_kw["SUM_PASS"]


@pytest.mark.parametrize("name", ["fp8_block_fused_requant", "fp8_channel", "mxfp4", "int4_g32"])
def test_quantised_sum_pass_is_the_same_bits(name):
    fmt, bn = FORMATS[name]
    assert quantised_same_bits(fmt, [_cfg(sp, bn) for sp in (False, True)])


SM90_SNIPPET = """
import compile_sm90 as c
cfg = {"BLOCK_M": 64, "w13": {"BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
       "w2": {"BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}, "tma": True, "pdl": True,
       "sum_pass": True}
names = set()
for fmt in ("bf16", "fp8_block", "mxfp4"):
    for kf, args, kw in c.launches(c.FORMATS[fmt], 1000, (16, 8, 2048, 768, "silu", False), config=cfg):
        if kf.__name__ in ("w2_kernel", "sum_slots_kernel"):
            ptx = c.compile_launch(kf, args, dict(kw, PDL=True)).asm["ptx"]  # PDL: off on a CPU host
            assert "griddepcontrol.wait" in ptx, (fmt, kf.__name__)
            assert kf.__name__ == "sum_slots_kernel" or "griddepcontrol.launch_dependents" in ptx, fmt
            names.add(kf.__name__)
assert names == {"w2_kernel", "sum_slots_kernel"}, names
print("ok")
"""


def test_sum_pass_kernels_compile_for_sm90(tmp_path):
    """The w2 GEMM that stops after its slot rows and the sum pass compile for Hopper with Triton's real
    compiler (on CPU), both as programmatic dependent launches."""
    pytest.importorskip("triton.backends.nvidia")
    from compile_check import run_compiled

    run_compiled(SM90_SNIPPET, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [40, 3000])
def test_gpu_pdl_sum_pass_is_the_same_bits(t):
    """With PDL the sum pass waits for the w2 grid by ``griddepcontrol.wait`` (w2 releases it at once): the
    output equals the fused combine without PDL, eagerly and replayed from a CUDA graph."""
    w13, w2, x, w, ids, _, _ = experts_problem(torch.bfloat16, "silu", False, t=t, e=16, h=512, i=256, k=6)
    w13, w2 = w13.cuda(), w2.cuda()
    fused = dict(_cfg(False), pdl=False)
    pdl = dict(_cfg(True), pdl=True)

    def run(cfg):
        return fused_experts_impl(x, w13, w2, w, ids, "silu", False, None, None, None, None, config=cfg)

    want = run(fused)
    assert torch.equal(run(pdl), want)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        run(pdl)
        with torch.cuda.graph(graph, stream=stream):
            out = run(pdl)
    torch.cuda.current_stream().wait_stream(stream)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
