"""The Gluon fp8 decode w13 (:mod:`moekit.ops._gluon.fp8_w13_dec`, w13 config ``"gluon_dec": 1``) against Triton's.

It replaces the Triton w13 of the fp8 decode buckets (swapped tiles, the layout derived in registers, w2's input
quantised in the epilogue) and must give its bits: the same wgmmas per K step, the same scale product and fma, the
same epilogue; only the schedule differs (a producer warp issues every load, the consumer's step k runs while step
k - 1 is promoted). In the inline layout its program 0 also zeroes what the align kernel would (w2's semaphores, the
output rows of tokens without a live slot). On CPU: the plan takes it only for a gated, fused w13, a bad value is
refused, and it compiles for sm_90 with the launcher's arguments, with no load in the consumer's K loop. On the H200
(``gpu``): bit-identical outputs over the awkward decode shapes, with and without programmatic dependent launches, in
a CUDA graph and compiled.
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


def _cfg(dec13: bool, bk: int = 128, bn13: int = 128, bm: int = 16, stages13: int = 3, dec2: int = 0,
         pdl: bool = False, sum_pass: bool = False) -> dict:
    """A decode bucket's swapped config (the shipped fp8 decode shape), with or without the Gluon decode w13 (and
    the decode w2 form ``dec2``), with or without programmatic dependent launches."""
    w13 = {"BN": bn13, "BK": bk, "GROUP_M": 8, "SWAP": 1, "num_warps": 4, "num_stages": stages13}
    w2 = {"BN": 64, "BK": bk, "GROUP_M": 8, "SWAP": 1, "num_warps": 4, "num_stages": 4}
    if dec13:
        w13["gluon_dec"] = 1
    if dec2:
        w2["gluon_dec"] = dec2
    return {"BLOCK_M": bm, "w13": w13, "w2": w2, "tma": True, "fp8_acc": bk, "sum_pass": sum_pass,
            **({"pdl": True} if pdl else {})}


def _plan(t, k, cfg, gated=True):
    return launch_plan(t, 512, 384, 768 if gated else 384, 16, 16, k, torch.bfloat16, 0, gated, False, False, False,
                       False, None, False, 1024, 16, _freeze(cfg))


@pytest.mark.parametrize("t, k, patch, gated, want", [
    (2, 8, {}, True, True),                      # 16 slots: the inline layout, the fused sum
    (3, 8, {}, True, True),                      # 24 slots: the align kernel's layout
    (4, 1, {}, True, True),                      # K = 1: no top-k sum, still the decode w13
    (2, 8, {"sum_pass": True}, True, True),      # the sum in its own pass: w13 is the same
    (2, 8, {}, False, False),                    # not gated (relu2): no gate and up tiles
    (2, 8, {"w13_split": True}, True, False),    # the split w13 (one accumulator, an epilogue pass)
])
def test_plan_takes_the_decode_w13_only_for_a_gated_fused_w13(t, k, patch, gated, want):
    cfg = dict(_cfg(True), **patch)
    assert _plan(t, k, cfg, gated).w13_gluon_dec == want
    assert not _plan(t, k, _cfg(False), gated).w13_gluon_dec


@pytest.mark.parametrize("value", [2, -1, "1", 0.5])
def test_w13_gluon_dec_must_be_off_or_on(value):
    # refused when the plan is made, naming the part, the key and the value, also where this chunk's plan could not
    # run the decode w13 anyway (not gated)
    cfg = _cfg(False)
    cfg["w13"]["gluon_dec"] = value
    for gated in (True, False):
        with pytest.raises(ValueError, match=f'"w13": "gluon_dec" = {value!r}, expected 0 or 1'):
            _plan(2, 8, cfg, gated)


@pytest.mark.parametrize("patch, want", [
    ({}, True),                                    # the decode bucket's tiles
    ({"BLOCK_M": 32}, False),                      # 32 token rows: its accumulators would spill
    ({"w13": {"BN": 32}}, False),                  # a wgmma M side under 64 weight rows
    ({"w13": {"SWAP": 0}}, False),                 # unswapped tiles: the Triton w13
    ({"fp8_acc": 64, "w13": {"BK": 64}}, False),   # a K step of half a scale block
])
def test_launcher_takes_the_decode_w13_only_where_it_gives_the_bits(monkeypatch, patch, want):
    # the GPU check stood in for: the launcher's own test of the tiles (CPU tensors, fp8 block 128 x 128 weights)
    from moekit.ops import triton_experts_quant as tq
    from moekit.ops.triton_configs import merge_config

    monkeypatch.setattr(gluon_experts, "_device_ok", lambda t: True)
    plan = _plan(2, 8, merge_config(_cfg(True), patch))
    spec = tq.QuantSpec.of(Fp8BlockFormat(128, 128))
    q = tq.QuantLaunch(spec, torch.ones(16, 6, 4), torch.ones(16, 4, 3), None, None, 384, 128, 128)
    w1 = torch.empty(16, 768, 512, dtype=torch.float8_e4m3fn)
    assert gluon_experts.fp8_w13_dec_ok(plan, q, w1, interp=False) == want
    assert not gluon_experts.fp8_w13_dec_ok(plan, q, w1, interp=True)  # never under the interpreter
    assert not gluon_experts.fp8_w13_dec_ok(plan, None, w1, interp=False)  # unquantised


def test_the_decode_w13_compiles_without_loads_in_its_k_loop(tmp_path):
    # the launcher's own call (the CPU tensors taken for an sm_90 GPU's) with a swapped decode config asking for the
    # Gluon w13: it replaces Triton's w13 and compiles with exactly the launcher's arguments at 128 registers over 8
    # warps and under half an SM's shared memory with 3 ring slots (two programs per SM; BN 64: 72 registers and a
    # third of it, three per SM), for a Mixtral-like slice
    # (BN 128: w2's input quantised in the epilogue), DeepSeek-V3's (56 K steps, BN 64: a separate quantiser pass),
    # gpt-oss's (swigluoai, biases, a partial last K step: 2880 = 22.5 blocks) and past the inline layout (32 slots:
    # the align kernel's layout). With the plan's "pdl" it is a programmatic dependent of the input quantiser before
    # it, itself a programmatic dependent that waits for its grid before it lets the w13 begin (WAIT_FIRST). In its
    # sm_90 SASS: no spill, the consumer's K
    # loop (the wgmmas) without a global load or TMA issue, the producer's loop with both weight tiles by TMA and the
    # rows and scales by cp.async
    run_compiled("""
import compile_sm90 as c
from moekit.ops import triton_experts as te
te._pdl_ok = lambda dev: True
base = {"BLOCK_M": 16, "tma": True, "fp8_acc": 128,
        "w13": {"BK": 128, "BN": 128, "GROUP_M": 8, "SWAP": 1, "num_stages": 3, "num_warps": 8, "gluon_dec": 1},
        "w2": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 8, "num_warps": 4, "gluon_dec": 2}}
cases = (((8, 2, 4096, 1024, "silu", False), 1, 128, True), ("deepseek", 1, 64, False), ("gpt-oss", 1, 128, True),
         ("deepseek", 4, 128, False))
for shape, t, bn, pdl in cases:
    patch = dict(base, w13=dict(base["w13"], BN=bn), **({"pdl": True} if pdl else {}))
    seen = c.launches(c.FORMATS["fp8_block"], t, shape, patch=patch, gluon=True)
    names = [kf.__name__ for kf, _, _ in seen]
    assert "fp8_w13_dec_kernel" in names and "w13_kernel" not in names, names
    quant = [kw for kf, _, kw in seen if kf.__name__ == "act_quant_kernel"][0]
    # the input's: with "pdl" a programmatic dependent of the launch before it that waits, then lets the w13 begin
    assert all(bool(quant.get(key)) == pdl for key in ("PDL", "WAIT_FIRST", "launch_pdl")), quant
    kf, args, kw = [x for x in seen if x[0].__name__ == "fp8_w13_dec_kernel"][0]
    assert kw["maxnreg"] == (128 if bn == 128 else 72), kw  # BN 64: three programs per SM where 3 slots fit
    assert bool(kw.get("launch_pdl")) == pdl and kw["REQ"] == (1 if bn == 128 else 0), kw
    assert kw["INLINE"] == (t * 8 <= 16 if shape == "deepseek" else True), kw
    k = c.compile_launch(kf, args, kw)
    assert kw["STAGES"] == 3 and (2 if bn == 128 else 3) * (k.metadata.shared + 1024) <= 228 * 1024, k.metadata.shared
    sass = c.sass_text(k)
    assert "LDL" not in sass and "STL" not in sass  # no spill anywhere
    assert ("ACQBULK" in sass) == pdl  # griddepcontrol.wait
    mma_loops = c.inner_loops(k)
    assert len(mma_loops) == 1, shape
    assert not any(op in i for i in mma_loops[0] for op in ("LDG", "UTMALDG")), shape
    assert sum("QGMMA" in i for i in mma_loops[0]) == 2 * 2 * 4 * bn // 64, shape  # 2 steps x gate, up x k32 x m64
    tma_loops = c.inner_loops(k, "UTMALDG")
    assert len(tma_loops) == 1 and sum("UTMALDG" in i for i in tma_loops[0]) == 2, shape
    assert any("LDGSTS" in i for i in tma_loops[0]), shape
print("ok")
""", tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
# (T, E, K, H, I, activation, bias, weight on input, hot, expert map, scale block, w13 BN): DeepSeek-like K steps
# (w13: 56 over H 7168), odd (H 640: 5), partial blocks with swigluoai, a limit and biases (gpt-oss: 2880 = 22.5
# blocks), a hot expert (8 slots of one expert: one block of 8 rows of 4 tokens), expert parallelism (half the experts
# local: dead slots, tokens with none, whose output rows the inline prologue zeroes), 64 x 64 scale blocks, BN 64
# (w2's input quantised by its own pass: REQ 0), K = 1 (no semaphores), the routing weight on the input (K = 1: the
# input quantiser applied it). Past T·K = 16 the align kernel's layout: gpt-oss's T = 8 (32 slots over 128 experts),
# a hot expert over several blocks (80 slots), expert parallelism (40 slots).
GPU_CASES = [
    (1, 16, 8, 7168, 2048, "silu", False, False, False, False, 128, 128),
    (2, 16, 8, 640, 384, "silu", False, False, False, False, 128, 128),
    (3, 8, 4, 2880, 2880, "swigluoai", True, False, False, False, 128, 128),
    (8, 16, 2, 1024, 768, "silu", False, False, True, False, 128, 128),
    (4, 16, 4, 768, 1024, "silu", False, False, False, True, 128, 128),
    (2, 16, 8, 1024, 512, "gelu_tanh", True, False, False, False, 64, 64),
    (2, 16, 8, 1024, 1024, "silu", False, False, False, False, 128, 64),
    (5, 16, 1, 1024, 512, "silu", False, False, False, True, 128, 128),
    (6, 16, 1, 1024, 512, "silu", False, True, False, False, 128, 128),
    (8, 128, 4, 2880, 2880, "swigluoai", True, False, False, False, 128, 128),
    (40, 16, 2, 1024, 512, "silu", False, False, True, False, 128, 128),
    (10, 16, 4, 768, 1024, "silu", False, False, False, True, 128, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t, e, k, h, i, act, bias, on_input, hot, emap, block, bn13", GPU_CASES,
                         ids=["deepseek_like", "odd_steps", "partial_blocks_swigluoai", "hot", "expert_map",
                              "block64_gelu_bias", "bn64_req0", "k1_expert_map", "k1_weight_on_input",
                              "aligned_gpt_oss_t8", "aligned_hot", "aligned_expert_map"])
def test_gpu_gluon_dec13_same_bits_as_triton(monkeypatch, t, e, k, h, i, act, bias, on_input, hot, emap, block,
                                            bn13):
    limit = 7.0 if act == "swigluoai" else None
    run = quantised_run(Fp8BlockFormat(block, block), act, bias, t=t, e=e, h=h, i=i, k=k, hot=hot, emap=emap,
                        limit=limit, on_input=on_input)
    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w13_dec")
    ref = run(_cfg(False, block, bn13))
    assert ref.isfinite().all() and not calls
    n = 0
    # ring depths 2 / 3 / 6 (a slot refilled while the consumer is on the step before), with the Triton w2, the
    # decode w2 and its warp-specialised form after it, and as a programmatic dependent (weight tiles before the
    # producer's grid wait; the input quantiser lets it begin)
    for stages, dec2, pdl in ((2, 0, False), (3, 0, False), (6, 0, False), (3, 1, False), (3, 2, True), (2, 0, True)):
        junk = torch.full_like(ref, float("nan"))  # the output's memory next: rows the prologue must zero
        del junk
        got = run(_cfg(True, block, bn13, stages13=stages, dec2=dec2 if k > 1 else 0, pdl=pdl))
        n += 1
        assert torch.equal(got, ref), (stages, dec2, pdl)
    assert len(calls) == n  # it ran each time it was asked
    if k > 1:  # the top-k sum in its own pass: the prologue zeroes no semaphore
        assert torch.equal(run(_cfg(True, block, bn13, sum_pass=True)), run(_cfg(False, block, bn13, sum_pass=True)))


@pytest.mark.gpu
def test_gpu_gluon_dec13_zeroes_the_rows_of_tokens_without_a_slot(monkeypatch):
    # expert parallelism where some tokens have no local slot at all: their output rows are zero (the inline
    # prologue of the decode w13's program 0, as the align kernel would), even over memory that held NaN
    t, e, k = 4, 16, 2
    run = quantised_run(Fp8BlockFormat(128, 128), "silu", False, t=t, e=e, h=1024, i=512, k=k, emap=True)
    from small_experts import experts_problem

    ids = experts_problem(torch.bfloat16, "silu", False, seed=3, t=t, e=e, h=1024, i=512, k=k)[4]
    dead = (ids >= e // 2).all(dim=1)
    assert dead.any() and not dead.all(), ids  # the case has both kinds of token
    for pdl in (False, True):
        junk = torch.full((t, 1024), float("nan"), device="cuda", dtype=torch.bfloat16)
        del junk
        out = run(_cfg(True, pdl=pdl))
        assert (out[dead] == 0).all() and out[~dead].isfinite().all()


@pytest.mark.gpu
def test_gpu_gluon_dec13_under_cuda_graph_and_compile(monkeypatch):
    # the public quantised call (the custom op) on a decode batch, its config asking for the Gluon decode w13 with
    # programmatic launches: torch.compile(fullgraph=True) and a CUDA graph replayed on new inputs (new routing: other
    # experts, other rows of the inline layout) give the eager bits, and the decode w13 ran
    from moekit.ops import triton_experts_quant as tq

    f, inputs = fp8_decode_call()
    monkeypatch.setattr(tq, "get_config", lambda *a, **kw: _cfg(True, dec2=2, pdl=True))
    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w13_dec")
    assert_compiled_and_graphed_bits(f, inputs(), inputs())
    assert calls, "the Gluon decode w13 did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("t, dec2", [(1, 1), (2, 2), (1, 0)])
def test_gpu_routing_then_the_decode_step_as_programmatic_dependents(monkeypatch, t, dec2):
    # the layer's order in one CUDA graph: the routing kernel (it lets a programmatic dependent begin at once), then
    # the fp8 decode step with "pdl" (the input quantiser waits for the routing, then lets the decode w13 begin, which
    # reads the new ids before its own grid wait). Replayed on 24 new inputs (new ids each time: other experts, other
    # rows of the inline layout), every output has the bits of the same call without PDL: no launch read stale ids
    from moekit.ops import triton_experts_quant as tq
    from moekit.ops.routing import TopKSpec
    from moekit.ops.triton_routing import route_triton

    e, k = 16, 8
    f, inputs = fp8_decode_call(t=t, e=e, k=k)
    spec = TopKSpec(k, "sigmoid", True, 2.5, 4, 2)  # DeepSeek-like grouped routing, with a selection bias
    bias = torch.rand(e, device="cuda") * 0.1

    def step(x, logits):
        w, ids = route_triton(logits, spec, bias)
        return f(x, w, ids)

    def new_inputs():
        return inputs()[0], torch.randn(t, e, device="cuda")

    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w13_dec")
    monkeypatch.setattr(tq, "get_config", lambda *a, **kw: _cfg(True, dec2=dec2, pdl=False))
    sets = [new_inputs() for _ in range(24)]
    refs = [step(x, lg) for x, lg in sets]
    monkeypatch.setattr(tq, "get_config", lambda *a, **kw: _cfg(True, dec2=dec2, pdl=True))
    assert all(torch.equal(step(x, lg), r) for (x, lg), r in zip(sets, refs))  # eager, back to back
    static = [v.clone() for v in sets[0]]
    step(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    for (x, lg), ref in zip(sets[1:], refs[1:]):
        static[0].copy_(x)
        static[1].copy_(lg)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
    assert calls, "the Gluon decode w13 did not run"
