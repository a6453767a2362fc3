"""The Gluon fp8 decode w2 (:mod:`moekit.ops._gluon.fp8_w2_dec`, w2 config ``"gluon_dec": 1``) against Triton's.

It replaces the Triton w2 of the fp8 decode buckets (swapped tiles, the layout derived in registers, the top-k sum
fused) and must give its bits: the same wgmma per K step, the same scale product and fma, the same epilogue and
slot-order sum; only the schedule differs (step k's wgmma runs while step k - 1 is promoted). On CPU: the plan takes
it only where those inputs exist, a bad value is refused, and it compiles for sm_90 with the launcher's arguments.
On the H200 (``gpu``): bit-identical outputs over the awkward decode shapes, in a CUDA graph and compiled too.
Its two schedule options keep those bits: ``"gluon_nt"`` (column tiles per program, one ring) and the plan's
``"pdl"`` (launched as a programmatic dependent; the first weight tiles requested before the grid wait).
"""

import pytest

import torch

pytest.importorskip("triton")

from compile_check import run_compiled  # noqa: E402
from moekit.ops import gluon_experts  # noqa: E402
from moekit.ops.formats import Fp8BlockFormat  # noqa: E402
from moekit.ops.triton_plan import _freeze, launch_plan  # noqa: E402
from small_experts import (assert_compiled_and_graphed_bits, count_calls, fp8_decode_call,  # noqa: E402
                           quantised_run)


def _dec_cfg(dec: int, bk: int = 128, bn2: int = 64, bm: int = 16, stages2: int = 3, nt: int = 1,
             pdl: bool = False) -> dict:
    """A decode bucket's swapped config (the shipped fp8 decode shape), with or without the Gluon w2 (``dec`` 1,
    ``nt`` column tiles per program; 2: its warp-specialised form), with or without programmatic dependent
    launches."""
    w13 = {"BN": 64, "BK": bk, "GROUP_M": 8, "SWAP": 1, "num_warps": 4, "num_stages": 4}
    w2 = {"BN": bn2, "BK": bk, "GROUP_M": 8, "SWAP": 1, "num_warps": 4, "num_stages": stages2}
    if dec:
        w2["gluon_dec"] = int(dec)
    if nt != 1:
        w2["gluon_nt"] = nt
    # the fused top-k sum (the decode w2's; past 64 slots the default is the sum pass)
    return {"BLOCK_M": bm, "w13": w13, "w2": w2, "tma": True, "fp8_acc": bk, "sum_pass": False,
            **({"pdl": True} if pdl else {})}


def _plan(t, k, cfg):
    return launch_plan(t, 512, 384, 768, 16, 16, k, torch.bfloat16, 0, True, False, False, False, False, None, False,
                       1024, 16, _freeze(cfg))


@pytest.mark.parametrize("t, k, patch, want", [
    (2, 8, {}, True),                          # 16 slots: the inline layout, the fused sum
    (1, 4, {}, True),                          # 4 slots
    (3, 8, {}, True),                          # 24 slots: the align kernel's layout (round 30)
    (4, 1, {}, False),                         # K = 1: no top-k sum (the tile goes straight to out)
    (2, 8, {"sum_pass": True}, False),         # the sum in its own pass: no semaphores to bump
    (2, 8, {"w2": {"gluon": 1}}, True),        # the sum-pass Gluon w2 asked too: no inline layout, no sum pass
    (2, 8, {"w2": {"gluon": 1}, "sum_pass": True}, False),  # ... with its sum pass: that one runs
])
def test_plan_takes_the_decode_w2_only_with_its_inputs(t, k, patch, want):
    cfg = _dec_cfg(True)
    for key, v in patch.items():
        if isinstance(v, dict):
            cfg[key] = dict(cfg[key], **v)
        else:
            cfg[key] = v
    assert _plan(t, k, cfg).w2_gluon_dec == want
    assert not _plan(t, k, _dec_cfg(False)).w2_gluon_dec
    cfg["w2"]["gluon_dec"] = 2  # the warp-specialised form: where the plan has the same inputs
    assert _plan(t, k, cfg).w2_gluon_dec == (2 if want else 0)


@pytest.mark.parametrize("value", [3, -1, "1", 0.5])
def test_gluon_dec_must_be_off_or_a_form(value):
    # refused when the plan is made, naming the part, the key and the value, also where the chunk's plan could not
    # run the decode w2 anyway (K = 1)
    cfg = _dec_cfg(False)
    cfg["w2"]["gluon_dec"] = value
    for t, k in ((2, 8), (4, 1)):
        with pytest.raises(ValueError, match=f'"w2": "gluon_dec" = {value!r}, expected 0, 1 or 2'):
            _plan(t, k, cfg)


def test_the_warp_specialised_decode_w2_has_one_tile_per_program():
    # "gluon_dec" 2 with "gluon_nt" > 1 is refused when the plan is made (its programs have one column tile)
    cfg = _dec_cfg(2, nt=2)
    with pytest.raises(ValueError, match='"gluon_dec" = 2 .* cannot be combined with "gluon_nt" = 2; expected 1'):
        _plan(2, 8, cfg)


@pytest.mark.parametrize("value", [0, 17, -2, True, "2", 1.5])
def test_gluon_nt_must_be_a_small_positive_int(value):
    # column tiles per program: refused when the plan is made (0 would launch no program for some tiles)
    cfg = _dec_cfg(True)
    cfg["w2"]["gluon_nt"] = value
    with pytest.raises(ValueError, match=f'"w2": "gluon_nt" = {value!r}, expected an int in 1..16'):
        _plan(2, 8, cfg)


def test_the_decode_launchers_arguments_compile(tmp_path):
    # the launcher's own call (the CPU tensors taken for an sm_90 GPU's) with a swapped decode config asking for the
    # Gluon w2: it replaces Triton's w2 (after Triton's w13 and the w2-input quantiser) and compiles with exactly the
    # launcher's arguments, for DeepSeek-V3's slice (16 K steps), gpt-oss's (swigluoai, biases, a partial last K step:
    # 2880 = 22.5 blocks) and 24 x 128 ... (invariance slice: 6 steps, K = 6), BN 64 and 128, its K loop without a
    # division; past the inline layout (32 slots) it reads the align kernel's layout; with the sum pass the Triton w2
    # runs
    run_compiled("""
import compile_sm90 as c
base = {"BLOCK_M": 16, "tma": True, "fp8_acc": 128,
        "w13": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 4, "num_warps": 4},
        "w2": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 3, "num_warps": 4, "gluon_dec": 1}}
for shape, t, bn in (("deepseek", 1, 64), ("gpt-oss", 1, 64), ("invariance", 2, 128), ("deepseek", 2, 128)):
    patch = dict(base, w2=dict(base["w2"], BN=bn))
    seen = c.launches(c.FORMATS["fp8_block"], t, shape, patch=patch, gluon=True)
    names = [kf.__name__ for kf, _, _ in seen]
    assert "fp8_w2_dec_kernel" in names and "w2_kernel" not in names and "w13_kernel" in names, names
    for kf, args, kw in seen:
        if kf.__name__ == "fp8_w2_dec_kernel":
            assert kw["maxnreg"] == 72, kw  # 7 programs of 4 warps per SM, as the Triton w2
            k = c.compile_launch(kf, args, kw)
            assert k.metadata.shared <= 227 * 1024, k.metadata.shared
            # one column tile per program: its K loop refills without a run-time division (round 31: MUFU.RCP and
            # ~25 instructions per step of a one-warp chain)
            loops = c.inner_loops(k)
            assert loops and not any("MUFU" in i for loop in loops for i in loop), shape
for kf, args, kw in c.launches(c.FORMATS["fp8_block"], 4, "deepseek", patch=base, gluon=True):  # 32 slots: aligned
    if kf.__name__ == "fp8_w2_dec_kernel":
        assert kw["INLINE"] is False and kw["BLOCK_E"] == 32, kw
        c.compile_launch(kf, args, kw)
names = [kf.__name__ for kf, _, _ in c.launches(c.FORMATS["fp8_block"], 4, "deepseek", patch=dict(base, sum_pass=True),
                                                 gluon=True)]
assert "w2_kernel" in names and "fp8_w2_dec_kernel" not in names, names  # the sum in its own pass: Triton's w2
print("ok")
""", tmp_path)


def test_the_decode_w2_with_column_tiles_per_program_and_pdl_compiles(tmp_path):
    # "gluon_nt" 2 / 3 (DeepSeek-V3's 112 column tiles, gpt-oss's 45: a last program with fewer tiles) and the plan's
    # "pdl" (the sm_90 check stood in for): the decode w2 gets NT and PDL with the programmatic launch attribute; the
    # w13 and the w2-input quantiser between them are launched as programmatic dependents too (the quantiser lets w2
    # start at once, then waits), the layer's input quantiser is not; the kernel compiles for sm_90 with
    # griddepcontrol.wait in its SASS and no spill inside its K loop
    run_compiled("""
import compile_sm90 as c
from moekit.ops import triton_experts as te
te._pdl_ok = lambda dev: True
base = {"BLOCK_M": 16, "tma": True, "fp8_acc": 128, "pdl": True,
        "w13": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 4, "num_warps": 4},
        "w2": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 3, "num_warps": 4, "gluon_dec": 1}}
for shape, t, nt in (("deepseek", 1, 2), ("gpt-oss", 1, 3)):
    seen = c.launches(c.FORMATS["fp8_block"], t, shape, patch=dict(base, w2=dict(base["w2"], gluon_nt=nt)), gluon=True)
    names = [kf.__name__ for kf, _, _ in seen]
    assert names[-3:] == ["w13_kernel", "act_quant_kernel", "fp8_w2_dec_kernel"], names
    pdl = [bool(kw.get("launch_pdl")) for _, _, kw in seen]
    assert pdl[-3:] == [True, True, True] and not pdl[0], (names, pdl)
    assert seen[-2][2]["PDL"] and seen[-3][2]["PDL"]
    kf, args, kw = seen[-1]
    assert kw["NT"] == nt and kw["PDL"] and kw["maxnreg"] == 72, kw
    k = c.compile_launch(kf, args, kw)
    sass = c.sass_text(k)
    assert "ACQBULK" in sass  # griddepcontrol.wait
    loops = c.inner_loops(k)
    assert loops and not any("LDL" in i or "STL" in i for loop in loops for i in loop)
print("ok")
""", tmp_path)


def test_the_warp_specialised_decode_w2_compiles_without_loads_in_its_k_loop(tmp_path):
    # "gluon_dec" 2 (the sm_90 checks stood in for) replaces the one-warpgroup decode w2 with the launcher's exact
    # arguments at 128 registers (two programs of 8 warps per SM), for DeepSeek-V3's slice, gpt-oss's (swigluoai,
    # biases, 22.5 K steps), BN 128, past the inline layout (32 slots) and with the plan's "pdl". In its sm_90 SASS the
    # consumer's K loop (the one with the wgmmas) has no global load, no TMA issue and no spill: the producer warp's
    # loop holds the TMA copies and the scales' cp.async
    run_compiled("""
import compile_sm90 as c
from moekit.ops import triton_experts as te
te._pdl_ok = lambda dev: True
base = {"BLOCK_M": 16, "tma": True, "fp8_acc": 128,
        "w13": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 4, "num_warps": 4},
        "w2": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 3, "num_warps": 4, "gluon_dec": 2}}
cases = (("deepseek", 1, 64, False), ("gpt-oss", 1, 64, True), ("invariance", 2, 128, False), ("deepseek", 4, 64, True))
for shape, t, bn, pdl in cases:
    patch = dict(base, w2=dict(base["w2"], BN=bn), **({"pdl": True} if pdl else {}))
    seen = c.launches(c.FORMATS["fp8_block"], t, shape, patch=patch, gluon=True)
    names = [kf.__name__ for kf, _, _ in seen]
    assert "fp8_w2_dec_ws_kernel" in names and "fp8_w2_dec_kernel" not in names and "w2_kernel" not in names, names
    kf, args, kw = [x for x in seen if x[0].__name__ == "fp8_w2_dec_ws_kernel"][0]
    assert kw["maxnreg"] == 128 and "NT" not in kw and bool(kw.get("PDL")) == pdl, kw
    assert kw["INLINE"] == (t * 8 <= 16 if shape == "deepseek" else True), kw
    k = c.compile_launch(kf, args, kw)
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
    sass = c.sass_text(k)
    assert "LDL" not in sass and "STL" not in sass  # no spill anywhere
    assert ("ACQBULK" in sass) == pdl  # griddepcontrol.wait
    mma_loops = c.inner_loops(k)
    assert mma_loops and not any(op in i for loop in mma_loops for i in loop for op in ("LDG", "UTMALDG")), shape
    tma_loops = c.inner_loops(k, "UTMALDG")
    assert tma_loops and all(any("LDGSTS" in i for i in loop) for loop in tma_loops), shape
print("ok")
""", tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
# (T, E, K, H, I, activation, bias, on_input, hot, expert map, scale block, w2 BN): every case has T·K <= 16 (the
# inline layout). DeepSeek-like K steps (w2: 16, even), odd (I 384: 3), partial blocks with swigluoai, a limit and
# biases (gpt-oss: 2880 = 22.5 blocks), the routing weight on the input (K = 2), a hot expert (8 slots of one expert:
# one block, its rows in slot order), expert parallelism (half the experts local: dead slots, tokens with none),
# 64 x 64 scale blocks, BN 128 (one 128-row weight scale per tile). Past T·K = 16 the align kernel's layout
# (round 30): gpt-oss's T = 8 (32 slots over 128 experts: partial blocks, swigluoai, biases), a hot expert over
# two 16-row blocks (80 slots), expert parallelism with dead slots (40 slots) and 128 slots in 2-3 blocks per
# expert (T = 16)
GPU_CASES = [
    (1, 16, 8, 7168, 2048, "silu", False, False, False, False, 128, 64),
    (2, 16, 8, 640, 384, "silu", False, False, False, False, 128, 64),
    (3, 8, 4, 2880, 2880, "swigluoai", True, False, False, False, 128, 64),
    (5, 16, 2, 1024, 512, "gelu_tanh", True, True, False, False, 128, 64),
    (8, 16, 2, 1024, 768, "silu", False, False, True, False, 128, 64),
    (4, 16, 4, 768, 1024, "silu", False, False, False, True, 128, 64),
    (2, 16, 8, 1024, 512, "silu", False, False, False, False, 64, 64),
    (1, 16, 8, 1024, 1024, "silu", False, False, False, False, 128, 128),
    (8, 128, 4, 2880, 2880, "swigluoai", True, False, False, False, 128, 64),
    (40, 16, 2, 1024, 512, "silu", False, False, True, False, 128, 64),
    (10, 16, 4, 768, 1024, "silu", False, False, False, True, 128, 64),
    (16, 16, 8, 1024, 768, "silu", False, False, False, False, 128, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t, e, k, h, i, act, bias, on_input, hot, emap, block, bn2", GPU_CASES,
                         ids=["deepseek_like", "odd_steps", "partial_blocks_swigluoai", "bias_on_input", "hot",
                              "expert_map", "block64", "bn128", "aligned_gpt_oss_t8", "aligned_hot",
                              "aligned_expert_map", "aligned_t16"])
def test_gpu_gluon_dec_same_bits_as_triton(monkeypatch, t, e, k, h, i, act, bias, on_input, hot, emap, block, bn2):
    limit = 7.0 if act == "swigluoai" else None
    run = quantised_run(Fp8BlockFormat(block, block), act, bias, t=t, e=e, h=h, i=i, k=k, hot=hot, emap=emap,
                        on_input=on_input, limit=limit)
    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w2_dec")
    ref = run(_dec_cfg(False, block, bn2))
    assert ref.isfinite().all() and not calls
    for stages in (2, 3, 6):
        assert torch.equal(run(_dec_cfg(True, block, bn2, stages2=stages)), ref), stages
    for nt, pdl in ((2, False), (3, False), (1, True), (4, True)):  # tiles per program; programmatic launches
        assert torch.equal(run(_dec_cfg(True, block, bn2, nt=nt, pdl=pdl)), ref), (nt, pdl)
    # the warp-specialised form (round 31): ring depths 2 / 6 (a slot refilled while the consumer is still on the
    # step before), and as a programmatic dependent (weight tiles before the producer's grid wait)
    for stages, pdl in ((2, False), (6, False), (3, True)):
        assert torch.equal(run(_dec_cfg(2, block, bn2, stages2=stages, pdl=pdl)), ref), ("ws", stages, pdl)
    assert len(calls) == 10  # it ran each time it was asked
    # and the Triton w2 after the w2-input quantiser launched as a programmatic dependent (it lets w2 start, then
    # waits for w13): the same bits too
    assert torch.equal(run(_dec_cfg(False, block, bn2, pdl=True)), ref)
    assert len(calls) == 10
    again = run(_dec_cfg(True, block, bn2))
    assert torch.equal(again, ref)  # and run to run


@pytest.mark.gpu
def test_gpu_gluon_dec_under_cuda_graph_and_compile(monkeypatch):
    # the public quantised call (the custom op) on a decode batch, its config asking for the Gluon w2:
    # torch.compile(fullgraph=True) and a CUDA graph replayed on new inputs (new routing: other experts, other rows
    # of the inline layout) give the eager bits, and the Gluon w2 ran
    from moekit.ops import triton_experts_quant as tq

    f, inputs = fp8_decode_call()
    cfgs = [_dec_cfg(True, nt=2, pdl=True), _dec_cfg(2, pdl=True)]  # with programmatic launches: their edges
    # captured in the graph; the one-warpgroup decode w2, then its warp-specialised form
    monkeypatch.setattr(tq, "get_config", lambda *a, **kw: cfgs[0])
    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w2_dec")

    assert_compiled_and_graphed_bits(f, inputs(), inputs())
    assert calls, "the Gluon decode w2 did not run"
    cfgs.pop(0)
    calls.clear()
    torch._dynamo.reset()
    assert_compiled_and_graphed_bits(f, inputs(), inputs())
    assert calls, "the warp-specialised decode w2 did not run"
