"""Triton routing kernel against route_torch (ids exactly equal, weights within fp32 rounding).

On CPU it runs under the Triton interpreter (``TRITON_INTERPRET=1``, set before kernels import).
"""

import pytest
import torch

import moekit

pytest.importorskip("triton")

from moekit.ops import triton_routing
from moekit.ops.api import route
from moekit.ops.routing import TopKSpec, route_torch
from moekit.ops.triton_routing import route_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tie_free_logits(t, e, seed, dtype=torch.float32):
    """Distinct logits with gaps well above fp32 rounding of the scores (a shuffled ramp)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-3, 3, e)
    rows = torch.stack([base[torch.randperm(e, generator=g)] for _ in range(t)]) if t else torch.empty(0, e)
    return rows.to(dtype).to(DEV)


def compare(logits, spec, bias=None, indices_type=None):
    w, ids = route_triton(logits, spec, bias, indices_type)
    wr, ir = route_torch(logits, spec, bias, indices_type)
    assert ids.dtype == (indices_type or torch.int32) and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), ir.cpu())
    torch.testing.assert_close(w.cpu(), wr.cpu(), atol=1e-6, rtol=1e-5)
    return w, ids


CASES = [
    (7, 16, TopKSpec(4, "softmax", True)),
    (5, 17, TopKSpec(3, "softmax", False)),
    (9, 33, TopKSpec(5, "sigmoid", True, 2.5)),
    (4, 20, TopKSpec(6, "sqrtsoftplus", True, 1.5)),
    (3, 8, TopKSpec(1, "sigmoid", False)),
    (3, 8, TopKSpec(8, "softmax", True)),  # K == E
    (6, 256, TopKSpec(8, "sigmoid", True, 2.5, 8, 4)),  # DeepSeek-V3
    (5, 160, TopKSpec(6, "softmax", False, 16.0, 8, 3)),  # DeepSeek-V2 (20 experts per group)
    (4, 24, TopKSpec(5, "sigmoid", True, 1.0, 4, 2)),
    (4, 6, TopKSpec(2, "sigmoid", True, 1.0, 6, 3)),  # one-expert groups
    (1, 1024, TopKSpec(32, "softmax", True)),
    (0, 64, TopKSpec(4, "softmax", True)),
]


@pytest.mark.parametrize("t,e,spec", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch(t, e, spec, with_bias):
    bias = (torch.arange(e, dtype=torch.float32).flip(0) * 1e-3).to(DEV) if with_bias else None
    compare(tie_free_logits(t, e, seed=t * 31 + e), spec, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_and_int64_ids(dtype):
    logits = tie_free_logits(6, 64, seed=3).to(dtype)
    compare(logits, TopKSpec(6, "softmax", True), indices_type=torch.int64)


def test_ties_break_to_lower_id():
    logits = torch.zeros(4, 32, device=DEV)
    logits[:, 7] = 2.0
    logits[:, 19] = 2.0
    logits[1, 3] = 2.0
    w, ids = compare(logits, TopKSpec(4, "softmax", True))
    assert ids[0].tolist() == [7, 19, 0, 1]
    assert ids[1].tolist() == [3, 7, 19, 0]
    # grouped ties: equal group scores keep the lower group
    w, ids = compare(torch.ones(2, 16, device=DEV), TopKSpec(4, "sigmoid", True, 1.0, 4, 2))
    assert ids[0].tolist() == [0, 1, 2, 3]


def test_nan_inf_policy_ids_stay_valid():
    logits = tie_free_logits(4, 16, seed=9)
    logits[0, 3] = float("nan")
    logits[1] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, 0] = float("-inf")
    for spec in (TopKSpec(4, "softmax", True), TopKSpec(4, "sigmoid", True, 1.0, 4, 2)):
        w, ids = route_triton(logits, spec)
        ids = ids.cpu()
        assert ((ids >= 0) & (ids < 16)).all()
        assert all(len(set(r.tolist())) == 4 for r in ids)  # distinct
        assert 3 not in ids[0].tolist()  # NaN counts as -inf: never chosen over finite scores
    w, ids = route_triton(logits, TopKSpec(4, "softmax", True))
    assert torch.isnan(w[1]).all()  # an all-NaN row: NaN weights, visible, not silently wrong
    assert torch.equal(ids[0].cpu(), route_torch(logits[:1].nan_to_num(nan=-float("inf")), TopKSpec(4))[1][0].cpu())


@pytest.mark.parametrize("spec", [
    TopKSpec(2, "sigmoid", True),  # an all-NaN sigmoid row scored 0 everywhere: weights 0, the token's output 0
    TopKSpec(2, "sqrtsoftplus", True, 1.5),
    TopKSpec(2, "softmax", False),
    TopKSpec(4, "sigmoid", True, 2.5, 4, 2),  # grouped (DeepSeek-V3 style)
])
def test_a_nan_logit_gives_the_row_nan_weights(spec):
    # the selection counts NaN as -inf (valid distinct ids) but the row's weights are NaN, so the NaN reaches the
    # token's output; before, one NaN logit was routed around (finite weights) and an all-NaN sigmoid row got 0
    logits = tie_free_logits(4, 16, seed=3)
    logits[1, 5] = float("nan")  # one NaN logit
    logits[2] = float("nan")  # a NaN hidden state: every logit NaN
    for bias in (None, torch.linspace(-0.1, 0.1, 16, device=DEV)):
        w, ids = route_triton(logits, spec, bias)
        assert torch.isnan(w[1]).all() and torch.isnan(w[2]).all()
        assert torch.isfinite(w[[0, 3]]).all()  # the other rows are untouched
        assert ((ids >= 0) & (ids < 16)).all() and all(len(set(r.tolist())) == spec.top_k for r in ids.cpu())
        wr, ir = route_torch(logits[[0, 3]], spec, bias)
        assert torch.equal(ids[[0, 3]].cpu(), ir.cpu())


def test_a_nan_token_reaches_the_layer_output_on_the_triton_backend():
    # a NaN hidden state under sigmoid routing came out as exactly 0 (weights 0, slots skipped); now NaN
    torch.manual_seed(0)
    e, h, i = 8, 16, 8
    gate = torch.nn.Linear(h, e, bias=False, device=DEV)
    layer = moekit.FusedMoE(e, 2, h, i, backend="triton", scoring_func="sigmoid", gate=gate,
                            e_score_correction_bias=torch.zeros(e), use_grouped_topk=True, num_expert_group=4,
                            topk_group=2, device=DEV).eval()
    layer.load_expert_weights(torch.randn(e, 2 * i, h) * 0.3, torch.randn(e, h, i) * 0.3)
    x = torch.randn(3, h, device=DEV)
    x[1] = float("nan")
    with torch.no_grad():
        y = layer(x)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("e, groups, warps", [
    (8, 1, 1),        # Mixtral: a [1, 8] tile
    (128, 1, 1),      # Qwen3 / gpt-oss: [1, 128]
    (256, 8, 1),      # DeepSeek-V3: [8, 32], one warp (round 33, H200: 3.1-3.3 µs per call against 3.5-3.6 with two)
    (256, 1, 2),      # ungrouped 256: not measured with one, kept at two
    (384, 1, 2),      # Kimi-K2-like: [1, 512], slower with one warp
    (768, 1, 4),      # LongCat-Flash's columns: [1, 1024]
])
def test_routing_kernel_warps_by_tile(e, groups, warps):
    consts = triton_routing._route_constexprs(e, groups, 8, "sigmoid", True, True)
    assert consts["num_warps"] == warps and consts["GP"] * consts["EGP"] >= e


def test_routing_lets_its_dependent_launch_begin_and_the_input_quantiser_waits_first(tmp_path, monkeypatch):
    # sm_90 SASS, compiled on CPU: the routing kernel's TRIGGER puts griddepcontrol.launch_dependents (PREEXIT) among
    # its first instructions, so the experts' input quantiser, a programmatic dependent, is scheduled while it runs;
    # the quantiser's WAIT_FIRST orders its grid wait (ACQBULK) before its own trigger (the decode w13 after it reads
    # the routing ids before its wait), the w2-input quantiser's order stays trigger, then wait
    pytest.importorskip("triton.backends.nvidia")
    from compile_check import run_compiled

    run_compiled("""
import torch, compile_sm90 as c
from moekit.ops._triton.quant import act_quant_kernel
from moekit.ops._triton.topk import route_kernel
from moekit.ops import triton_routing as tr

def ops(k):
    return [l.split("*/")[1].strip() for l in c.sass_text(k).splitlines() if "/*0" in l and "*/" in l]

lg, b, w, ids = torch.empty(1, 256), torch.empty(256), torch.empty(1, 8), torch.empty(1, 8, dtype=torch.int32)
for trig in (True, False):
    kw = dict(tr._route_constexprs(256, 8, 8, "sigmoid", True, True), TRIGGER=trig)
    seq = ops(c.compile_launch(route_kernel, (lg, b, w, ids, 8, 32, 8, 4, 2.5, 256, 8, 8), kw))
    pre = [i for i, o in enumerate(seq) if o.startswith("PREEXIT")]
    assert (pre and pre[0] < 24) if trig else not pre, (trig, pre, seq[:30])
x, xq = torch.empty(2, 512, dtype=torch.bfloat16), torch.empty(2, 512, dtype=torch.float8_e4m3fn)
xs = torch.empty(2, 4)
for first in (True, False):
    kw = dict(G=128, GP=8, BLOCK=512, MODE=0, UE8M0=False, ON_INPUT=False, INTERP=False, num_warps=4, PDL=True,
              WAIT_FIRST=first)
    seq = ops(c.compile_launch(act_quant_kernel, (x, xq, xs, x, None, 512, 2, 512, 512, 4, 0), kw))
    acq = [i for i, o in enumerate(seq) if o.startswith("ACQBULK")]
    pre = [i for i, o in enumerate(seq) if o.startswith("PREEXIT")]
    assert len(acq) == 1 and len(pre) == 1 and (acq[0] < pre[0]) == first, (first, acq, pre)
    assert not any(o.startswith(("LDG", "STG")) for o in seq[:max(acq[0], pre[0])]), seq  # nothing before both
print("ok")
""", tmp_path)
    # the launcher asks for the trigger only where PDL exists (compiled, sm_90+): never on CPU or the interpreter
    seen = {}
    monkeypatch.setattr(triton_routing, "route_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: seen.update(kw))})())
    logits = tie_free_logits(1, 16, seed=3)
    triton_routing.route_impl(logits, None, 2, "softmax", True, 1.0, 1, 1, torch.int32)
    assert seen["TRIGGER"] is triton_routing.pdl_ok(logits.device)
    assert seen["TRIGGER"] is (DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9)


def test_route_dispatch_and_validation():
    logits = tie_free_logits(3, 16, seed=1)
    w, ids = route(logits, TopKSpec(2, "softmax", True), backend="triton")
    assert torch.equal(ids.cpu(), route_torch(logits, TopKSpec(2, "softmax", True))[1].cpu())
    with pytest.raises(ValueError, match="top_k"):
        route(logits, TopKSpec(20), backend="triton")
    with pytest.raises(ValueError, match="num_expert_group"):
        route(logits, TopKSpec(2, "sigmoid", True, 1.0, 3, 1), backend="triton")
    with pytest.raises(NotImplementedError, match="top_k <= 64"):  # the kernel's own limit: a build limit
        route_triton(tie_free_logits(1, 128, seed=1), TopKSpec(65))


def test_routing_kernel_limits_refused_at_construction():
    # round 46: a Triton layer with top_k > 64 was built and loaded, then its first forward raised ValueError
    from moekit import FusedMoE
    from moekit.ops.kernels import kernels_for

    with pytest.raises(NotImplementedError, match="top_k <= 64"):
        FusedMoE(80, 65, 8, 4, backend="triton", device=DEV)
    with pytest.raises(NotImplementedError, match="at most 4096 experts"):
        moekit.FusedTopKRouter(2, 5000, kernels=kernels_for("triton"))
    FusedMoE(80, 65, 8, 4, backend="torch")  # the reference backend has no such limit
    with pytest.raises(NotImplementedError, match="block_k to be a power of two"):  # not at the first forward
        FusedMoE(4, 1, 96, 48, backend="triton", params_dtype=torch.bfloat16, device=DEV,
                 quant_config={"quant_method": "fp8", "weight_block_size": [48, 48]})


def test_opcheck():
    logits = tie_free_logits(3, 16, seed=2)
    args = (logits, None, 4, "softmax", True, 1.0, 1, 1, torch.int32)
    torch.library.opcheck(triton_routing.route_op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096, 20000])
def test_gpu_deepseek_many_tokens(t):
    spec = TopKSpec(8, "sigmoid", True, 2.5, 8, 4)
    g = torch.Generator(device="cuda").manual_seed(t)
    logits = torch.randn(t, 256, device="cuda", generator=g)
    bias = torch.rand(256, device="cuda", generator=g) * 0.1
    w, ids = route_triton(logits, spec, bias)
    wr, ir = route_torch(logits, spec, bias)
    mismatch = (ids != ir).any(dim=1)
    # random fp32 inputs can hold near-ties that rounding orders differently; allow a vanishing few
    assert int(mismatch.sum()) <= max(1, t // 5000)
    torch.testing.assert_close(w[~mismatch], wr[~mismatch], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_renormalising_tiny_selected_scores(backend):
    # round 46: the sum was clamped to >= 1e-20, so selected scores summing below it (a bias-picked softmax score
    # of e^-50, sigmoid scores of logits near -50) were renormalised to far less than 1; only an all-zero top-k
    # (scores that underflowed to 0) is guarded now, and stays 0, not NaN
    def run(logits, k, **kw):
        spec = TopKSpec(top_k=k, renormalize=True, **{n: v for n, v in kw.items() if n != "bias"})
        return route(logits.to(DEV), spec, kw.get("bias"), None, backend)

    w, ids = run(torch.tensor([[50.0, 0.0]]), 1, bias=torch.tensor([0.0, 2.0], device=DEV))
    assert ids.tolist() == [[1]] and w.tolist() == [[1.0]]
    w, ids = run(torch.tensor([[-50.0, -51.0, -52.0]]), 2, scoring_func="sigmoid")
    s = torch.sigmoid(torch.tensor([-50.0, -51.0], dtype=torch.float64))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w.double().cpu(), (s / s.sum())[None], rtol=1e-6, atol=0)
    # round 49: sigmoid as 1 / (1 + e^-x) overflowed e^-x below x = -88.7 (every score 0, the row's weights 0); from
    # e^-|x| the scores reach float32's normal range's end (x ~ -87.3) exactly and its subnormals (to ~ -103) after
    w, ids = run(torch.tensor([[-89.0, -89.5, -92.0]]), 2, scoring_func="sigmoid")
    s = torch.sigmoid(torch.tensor([-89.0, -89.5], dtype=torch.float64))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w.double().cpu(), (s / s.sum())[None], rtol=1e-4, atol=0)
    w, ids = run(torch.tensor([[-200.0, -201.0, -202.0]]), 2, scoring_func="sigmoid")  # sigmoid underflows to 0
    assert ids.tolist() == [[0, 1]] and w.tolist() == [[0.0, 0.0]]
    if backend == "torch":  # subnormal float32 scores (softmax gaps of 95 / 100: e^-95 ~ 5e-42) on the CPU too
        w, ids = run(torch.tensor([[100.0, 5.0, 0.0]]), 1, bias=torch.tensor([0.0, 0.0, 200.0], device=DEV))
        assert ids.tolist() == [[2]] and w.tolist() == [[1.0]]
