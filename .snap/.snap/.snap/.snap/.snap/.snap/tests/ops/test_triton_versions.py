"""Kernel code that newer Triton releases run differently from Triton 3.6 (the pinned test version).

The library must work with the newest Triton. The source check, the shim's typing and the launch options fail on any
release when they regress; the masked kernel shows the defect itself only on Triton 3.9 (whose interpreter failed 55
kernel tests before). Run the suite with another Triton on the path to check that release.
"""

import ast
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import moekit.ops._triton  # noqa: E402,F401  (installs the interpreter shims)

KERNELS = Path(moekit.ops._triton.__file__).parent


def _constexpr_globals(tree: ast.Module) -> set[str]:
    """Module-level names bound to ``tl.constexpr(...)``."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if isinstance(f, ast.Attribute) and f.attr == "constexpr":
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _left_constexpr_ops(tree: ast.Module, consts: set[str]) -> list[str]:
    """Arithmetic and comparisons whose left operand is one of ``consts`` (a name, or an attribute such as
    ``quant.MXFP4``) and whose right operand is not a literal: ``line: source`` each."""
    def is_const(n):
        return (isinstance(n, ast.Name) and n.id in consts) or (isinstance(n, ast.Attribute) and n.attr in consts)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            left, right = node.left, node.right
        elif isinstance(node, ast.Compare):
            left, right = node.left, node.comparators[0]
        else:
            continue
        if is_const(left) and not isinstance(right, ast.Constant):
            hits.append(f"{node.lineno}: {ast.unparse(node)}")
    return hits


def test_no_module_constexpr_on_the_left_of_arithmetic_or_comparisons():
    # Triton 3.9's interpreter evaluates `C * x` or `C < x` (C a module-level tl.constexpr, x a tensor) as a
    # constexpr wrapping a tensor, and the next call fails ("cannot convert ... to tensor"): swigluoai's
    # `OAI_ALPHA * g` broke every gpt-oss launch. `x * C` is the same product (IEEE multiplication commutes).
    # The constants of every kernel module count in every other (they are imported across modules).
    trees = {path: ast.parse(path.read_text()) for path in sorted(KERNELS.rglob("*.py"))}
    consts = set().union(*map(_constexpr_globals, trees.values()))
    assert {"OAI_ALPHA", "MXFP4"} <= consts
    bad = [f"{path.name}:{hit}" for path, tree in trees.items() for hit in _left_constexpr_ops(tree, consts)]
    assert not bad, bad


def test_the_checker_sees_a_constant_on_the_left():
    # the check above must be able to fail: a product, a comparison and an attribute constant on the left
    src = ("import triton.language as tl\nA = tl.constexpr(2.0)\n"
           "def f(g, q):\n    return A * g, tl.where(A < g, g, 0.0), q.A + g, g * A, A == 3\n")
    tree = ast.parse(src)
    consts = _constexpr_globals(tree)
    assert consts == {"A"}
    assert sorted(h.split(": ")[1] for h in _left_constexpr_ops(tree, consts)) == ["A * g", "A < g", "q.A + g"]


@triton.jit
def _masked_copy(x_ptr, o_ptr, T, N, BH: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    hmask = h < N
    v = tl.load(x_ptr + h, mask=hmask & (tok < T), other=0)  # a block mask and a scalar comparison
    tl.store(o_ptr + tok * N + h, v, mask=hmask)


def test_a_scalar_comparison_in_a_block_mask():
    # Triton's interpreter typed a comparison like its operands (int64 here), so the scalar `tok < T` splatted to
    # an integer block, and 3.9's load refused the mask; moekit's shim types comparisons int1 (as compiled code
    # does). The mask of a row past T loads nothing.
    from triton import knobs
    if not knobs.runtime.interpret:
        pytest.skip("the interpreter's defect (CPU tensors)")
    x = torch.arange(1, 17, dtype=torch.int32)
    out = torch.full((3, 13), -1, dtype=torch.int32)
    _masked_copy[(3,)](x, out, 2, 13, BH=16)
    assert torch.equal(out[:2], x[:13].expand(2, 13)) and torch.equal(out[2], torch.zeros(13, dtype=torch.int32))


def test_comparisons_are_typed_int1_in_the_interpreter():
    from triton import knobs
    if not knobs.runtime.interpret:
        pytest.skip("the shim touches the interpreter only")
    import numpy as np
    from triton.runtime import interpreter

    b = interpreter.InterpreterBuilder()
    lhs = interpreter.TensorHandle(np.array([3], dtype=np.int64), tl.int64)
    rhs = interpreter.TensorHandle(np.array([5], dtype=np.int64), tl.int64)
    for name in ("create_icmpSLT", "create_icmpEQ"):
        out = getattr(b, name)(lhs, rhs)
        assert out.dtype == tl.int1 and out.data.dtype == np.bool_, name
    f = interpreter.TensorHandle(np.array([1.5], dtype=np.float32), tl.float32)
    assert b.create_fcmpOLT(f, f).dtype == tl.int1


def test_every_launch_pins_fma_contraction(monkeypatch):
    # Triton 3.9 warns that unset `enable_fp_fusion` turns FMA contraction off from 3.10 on; every moekit launch
    # (router gate and its column-chunk sum, routing, zero experts, bf16 and fp8 experts with the input quantiser)
    # pins it (on, except the zero combination's, off so `routed + x · s` rounds like its twin), so a release's
    # default never changes the kernels' bits
    from triton import knobs
    if not knobs.runtime.interpret:
        pytest.skip("records the launches through the interpreter")
    from triton.runtime import interpreter

    from moekit.ops.formats import Fp8BlockFormat
    from moekit.ops.quantize import quantize_experts
    from moekit.ops.triton_experts import fused_experts_triton
    from moekit.ops.triton_experts_quant import fused_experts_quant_triton
    from moekit.ops.triton_gate import GATE_KS, router_gate_impl
    from moekit.ops.triton_routing import route_impl
    from moekit.ops.triton_zero import zero_combine_impl, zero_slots_impl

    seen = []
    run = interpreter.InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kw):
        seen.append((self.fn.__name__, kw.get("enable_fp_fusion")))
        return run(self, *args, grid=grid, warmup=warmup, **kw)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording)
    g = torch.Generator().manual_seed(0)
    t, e, k, h, i = 3, 4, 2, GATE_KS + 32, 32  # H past one gate chunk: the gate's partial sums take a second kernel
    x = torch.randn(t, h, generator=g)
    logits = router_gate_impl(x, torch.randn(e, h, generator=g), None, torch.float32)
    w, ids = route_impl(logits, None, k, "softmax", True, 1.0, 1, 1, torch.int32)
    zero_ids = torch.tensor([[0, e], [1, 2], [e + 1, 3]], dtype=torch.int32)  # two zero-expert slots
    w_real, ids_real, zero_scale = zero_slots_impl(w, zero_ids, e)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5
    routed = fused_experts_triton(x, w13, w2, w_real, ids_real)
    zero_combine_impl(routed, x, zero_scale, 1.0)
    fmt = Fp8BlockFormat(32, 32)
    w13_q, w2_q, s13, s2 = quantize_experts(w13, w2, fmt)
    fused_experts_quant_triton(x, w13_q, w2_q, w, ids, fmt=fmt, w13_scale=s13, w2_scale=s2)
    names = {n for n, _ in seen}
    assert {"gate_kernel", "gate_sum_kernel", "route_kernel", "zero_slots_kernel", "zero_combine_kernel",
            "w13_kernel", "w2_kernel", "act_quant_kernel"} <= names, names
    assert [n for n, fusion in seen if fusion is not (n != "zero_combine_kernel")] == []


_AFTER_36 = not triton.__version__.startswith("3.6.")


@pytest.mark.xfail(_AFTER_36, strict=True, reason="Triton 3.7 to 3.9 add a fence to the early refill's K loop "
                   "(docs/kernels.md, rounds 41 and 42)")
def test_early_refill_adds_no_synchronisation(tmp_path):
    # The register-operand 4-bit GEMMs refill the ring a step early ("gluon_early": 1, round 20; 56 of the 73 shipped
    # 4-bit buckets): the next step's copies go into one slot before the step reads another. moekit places its own
    # barrier and fence per K step, and under Triton 3.6 the early form's K loop synchronises exactly as the late
    # form's. From 3.7 on (3.7.1, 3.8.0, 3.9.0 checked), the early form gets a MEMBAR and a proxy FENCE more per step
    # (the copies issued after the kernel's own fence, before the wgmma). Round 42 moved that fence after the copies:
    # the extra ones went away, but under 3.9 the steps moved by -1.7 to +1.5 % and under 3.6 they were 1-2 % slower,
    # so the tree keeps its order (the cause of 3.9's 4-bit loss was a barrier after each wgmma wait instead: the
    # next test). Strict: when a release stops adding them this fails, so the early buckets can be re-timed on it.
    from compile_check import run_compiled

    run_compiled("""
import compile_sm90 as c
def sync(which, early):
    _, ops = c.sass_loop_mix(c.gluon_w4(which, "mxfp4", bm=16, bn=64, h=1024, i=1024, e=8, stages=3, rega=True,
                                        early=early))
    return {o: ops.get(o, 0) for o in ("MEMBAR", "FENCE")}
for which in ("w13", "w2"):
    early, late = sync(which, True), sync(which, False)
    assert late == {"MEMBAR": 1, "FENCE": 1}, (which, late)  # the kernels' own: one fence per K step
    assert early == late, (which, early, late)
print("ok")
""", tmp_path)


def test_no_cta_barrier_between_the_gate_and_up_wgmmas(tmp_path):
    # Triton 3.9 (not 3.6 to 3.8) lowers the wait of an asynchronous wgmma (warpgroup_mma_wait) in a kernel of more
    # than 4 warps with a CTA barrier after it, unless its barrier analysis finds a barrier or a memory wait next,
    # before any shared-memory access. The register-operand w13 with BN 128 (8 warps: two warpgroups) runs gate, then
    # up, each wgmma waited for (its A fragment lives in registers, round 15); the up's decode reads shared memory
    # right after the gate's wait, so under 3.9 every K step synchronised the two warpgroups in its middle, and
    # Mixtral's mxfp4 w13 at T = 1024 ran 13 % slower than with synchronous wgmmas (round 42), which compile to the
    # same PTX under 3.6. Nothing may put a barrier between a step's gate and up wgmmas, early or late refill, on any
    # release (checked with 3.6, 3.7.1, 3.8.0 and 3.9.0; the asynchronous form fails it under 3.9).
    from compile_check import run_compiled

    run_compiled("""
import compile_sm90 as c
for kw in (dict(bm=128, early=True), dict(bm=128, early=False), dict(bm=64, early=True, serial=True)):
    ops = c.sass_loop_ops(c.gluon_w4("w13", "mxfp4", bn=128, h=1024, i=1024, e=8, stages=3, rega=True, **kw))
    waits = [n for n, o in enumerate(ops) if o.startswith("WARPGROUP.DEPBAR")]
    mmas = [n for n, o in enumerate(ops) if o.startswith("HGMMA")]
    assert len(waits) == 2, (kw, waits)  # gate, then up
    gap = ops[waits[0]:min(m for m in mmas if m > waits[0])]
    assert not [o for o in gap if o.startswith("BAR")], (kw, [o for o in gap if o.startswith(("BAR", "WARPGROUP"))])
print("ok")
""", tmp_path)


def test_the_gather_pass_keeps_cp_async_and_its_fence_out_of_the_w13_loop(tmp_path):
    # The Triton w13 gathers its activation rows by token with cp.async, which the wgmma then reads from shared
    # memory. Triton 3.7+ fences that hand-over (the generic proxy's writes, the async proxy's reads) after every wait
    # of the K loop, a MEMBAR each (two per step in Mixtral's bf16 w13 under 3.9; 3.6 has none), and Mixtral's bf16
    # steps at T >= 1024 ran 5-9 % slower under 3.9 (round 41). With the gather pass ("gather_pass": the rows copied
    # into the sorted layout first) the tile comes by TMA: no cp.async and no fence in the loop, on any release
    # (round 43: 5-7 % faster under 3.9, 0.7-2.6 % under 3.6 on the H200).
    from compile_check import run_compiled

    run_compiled("""
import collections
import compile_sm90 as c
cfg = {"BLOCK_M": 128, "tma": True, "w13": dict(BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
       "w2": dict(BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3)}
def loop(gather):
    seen = c.launches(None, 512, (8, 2, 1024, 1024, "silu", False), config=dict(cfg, gather_pass=gather))
    names = [kf.__name__ for kf, _, _ in seen]
    assert ("gather_rows_kernel" in names) == gather, names
    kf, a, kw = next(s for s in seen if s[0].__name__ == "w13_kernel")
    assert kw.get("XG", False) == gather, kw.get("XG")
    (body,) = c.inner_loops(c.compile_launch(kf, a, kw))
    return collections.Counter(o.split(".")[0] for o in c.opcodes(body))
on, off = loop(True), loop(False)
assert on["HGMMA"] == off["HGMMA"] == 8, (on, off)
assert off["LDGSTS"] > 0, off  # the pointer gather (so the check below can fail)
assert on["LDGSTS"] == on["MEMBAR"] == 0, on
print("ok")
""", tmp_path)
