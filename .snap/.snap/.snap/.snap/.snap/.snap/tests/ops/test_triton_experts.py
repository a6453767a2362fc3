"""Triton experts kernels against the torch twin (float64) and an independent naive loop.

On CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before any kernel
module is imported) on small shapes; on a CUDA machine the same tests run natively.
"""

import pytest
import torch
from reference import ref_experts

pytest.importorskip("triton")

import moekit
from moekit.ops import triton_experts as te
from moekit.ops.api import fused_experts
from moekit.ops.experts import fused_experts_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def naive(x, w1, w2, w, ids, act="silu", b1=None, b2=None, emap=None, on_input=False, limit=None):
    """The float64 per-token oracle (tests/reference.py), with this file's argument names."""
    return ref_experts(x, w1, w2, w, ids, activation=act, b13=b1, b2=b2, apply_router_weight_on_input=on_input,
                       expert_map=emap, swiglu_limit=limit)


def make(t, e, k, h, i, dtype=torch.float32, act="silu", bias=False, num_global=None, hot=False):
    gen = torch.Generator().manual_seed(1234 + t * 7 + e)
    rows = i if act == "relu2" else 2 * i
    x = torch.randn(t, h, generator=gen).to(dtype)
    w1 = (torch.randn(e, rows, h, generator=gen) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen) / i**0.5).to(dtype)
    b1 = (torch.randn(e, rows, generator=gen) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(e, h, generator=gen) * 0.1).to(dtype) if bias else None
    ng = num_global or e
    if hot:
        ids = torch.zeros(t, k, dtype=torch.int64)
        if k > 1:
            ids[:, 1:] = torch.stack([torch.randperm(ng, generator=gen)[: k - 1] for _ in range(t)])
        ids[:, 1:] = torch.where(ids[:, 1:] == 0, ng - 1, ids[:, 1:])
    else:
        ids = torch.stack([torch.randperm(ng, generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k)
    w = torch.rand(t, k, generator=gen) + 0.05
    to = lambda v: v.to(DEV) if v is not None else None  # noqa: E731
    return to(x), to(w1), to(w2), to(w), ids.to(torch.int32).to(DEV), to(b1), to(b2)


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = ref.cpu().double()
    out = out.cpu().double()
    if out.numel() == 0:
        return
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:
        rel_rms = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        max_err = (out - ref).abs().max().item()
        assert rel_rms <= 1e-2, rel_rms
        assert max_err <= 3e-2 * ref.abs().max().item(), (max_err, ref.abs().max().item())


def run_both(x, w1, w2, w, ids, **kw):
    out = fused_experts(x, w1, w2, w, ids, backend="triton", **kw)
    k64 = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in kw.items()}
    ref = fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids, **k64)
    return out, ref


@pytest.mark.parametrize("t,e,k", [(0, 4, 2), (1, 4, 2), (7, 4, 2), (13, 5, 1), (11, 6, 6), (37, 8, 3)])
def test_shapes_fp32(t, e, k):
    x, w1, w2, w, ids, _, _ = make(t, e, k, 32, 24)
    out, ref = run_both(x, w1, w2, w, ids)
    check(out, ref, torch.float32)
    if t:
        check(out, naive(x.cpu(), w1.cpu(), w2.cpu(), w.cpu(), ids.cpu()), torch.float32)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "swigluoai", "relu2", "softcap_swiglu",
                                 "silu_post_clamp"])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_biases(act, bias):
    x, w1, w2, w, ids, b1, b2 = make(9, 4, 2, 48, 40, act=act, bias=bias)
    kw = dict(activation=act, w1_bias=b1, w2_bias=b2)
    out, ref = run_both(x, w1, w2, w, ids, **kw)
    check(out, ref, torch.float32)
    check(out, naive(x.cpu(), w1.cpu(), w2.cpu(), w.cpu(), ids.cpu(), act,
                     b1.cpu() if bias else None, b2.cpu() if bias else None), torch.float32)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "swigluoai", "silu_post_clamp"])
def test_swiglu_limit(act):
    x, w1, w2, w, ids, _, _ = make(6, 4, 2, 32, 16, act=act)
    x = x * 30  # large pre-activations so that the clamp matters
    out, ref = run_both(x, w1, w2, w, ids, activation=act, swiglu_limit=2.5)
    check(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(dtype):
    x, w1, w2, w, ids, b1, b2 = make(17, 6, 3, 64, 32, dtype=dtype, bias=True)
    out, ref = run_both(x, w1, w2, w, ids, w1_bias=b1, w2_bias=b2)
    check(out, ref, dtype)


def test_apply_router_weight_on_input():
    x, w1, w2, w, ids, _, _ = make(10, 4, 1, 32, 16)
    out, ref = run_both(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    check(out, ref, torch.float32)
    check(out, naive(x.cpu(), w1.cpu(), w2.cpu(), w.cpu(), ids.cpu(), on_input=True), torch.float32)


def test_expert_map_with_holes():
    emap = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1], dtype=torch.int32, device=DEV)
    x, w1, w2, w, ids, _, _ = make(12, 4, 3, 32, 16, num_global=8)
    ids[0] = torch.tensor([1, 3, 6], dtype=torch.int32)  # a token whose every slot is held elsewhere
    out, ref = run_both(x, w1, w2, w, ids, expert_map=emap, global_num_experts=8)
    check(out, ref, torch.float32)
    assert torch.equal(out[0].cpu(), torch.zeros(32))
    check(out, naive(x.cpu(), w1.cpu(), w2.cpu(), w.cpu(), ids.cpu(), emap=emap.cpu()), torch.float32)


def test_hot_expert_zero_weights_int64_ids():
    x, w1, w2, w, ids, _, _ = make(29, 5, 3, 32, 16, hot=True)
    w[::3, 1] = 0.0  # masked zero-expert slots: skipped
    out, ref = run_both(x, w1, w2, w, ids.long())
    check(out, ref, torch.float32)


def test_multi_launch_align_and_chunking(monkeypatch):
    x, w1, w2, w, ids, _, _ = make(40, 6, 2, 32, 16)
    ref = fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids)
    monkeypatch.setattr(te, "SMALL_SLOTS", 8)  # count + scatter kernels instead of the single program
    out = te.fused_experts_triton(x, w1, w2, w, ids)
    check(out, ref, torch.float32)
    out2 = te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None, None, workspace_bytes=6000)
    check(out2, ref, torch.float32)  # several chunks
    assert torch.equal(out, te.fused_experts_triton(x, w1, w2, w, ids))  # deterministic


def test_chunks_are_equal(monkeypatch):
    # a bound of 17 tokens over 40: three chunks of 14, 14, 12 (not 17, 17, 6), results unchanged
    x, w1, w2, w, ids, _, _ = make(40, 6, 2, 32, 16)
    one = te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None, None)
    cfg = te.get_config(x.device, 40, 6, 32, 16, 2, x.dtype, True)
    per_token = 2 * (16 + 32) * x.element_size() + 2 * 12 + 64
    fixed = 6 * int(cfg["BLOCK_M"]) * 16 * x.element_size()
    sizes, run = [], te._run_chunk
    monkeypatch.setattr(te, "_run_chunk", lambda x, *a, **kw: (sizes.append(x.shape[0]), run(x, *a, **kw)))
    out = te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None, None, config=cfg,
                                workspace_bytes=fixed + 17 * per_token)
    assert sizes == [14, 14, 12]
    assert torch.equal(out, one)


def test_chunk_size_default_bound():
    # the default bound's chunks of the benchmark shapes at T = 16384 (shipped H200 tiles: BLOCK_M 64):
    # DeepSeek-V3 fp8 block in one chunk (round 28: 18840 vs 19928 µs in two), LongCat-Flash fp8 still in two
    from types import SimpleNamespace
    from moekit.ops.triton_experts_quant import QuantLaunch

    fp8 = SimpleNamespace(fp8=True, spec=SimpleNamespace(block_k=128))
    fp8.bytes_per_token = lambda *a: QuantLaunch.bytes_per_token(fp8, *a)
    cfg = {"BLOCK_M": 64}
    assert te.DEFAULT_WORKSPACE_BYTES == 6 * 1024**3
    assert te.chunk_size(16384, 7168, 2048, 8, 256, 2, cfg, fp8) == 16384  # DeepSeek-V3 fp8
    assert te.chunk_size(16384, 7168, 2048, 8, 256, 2, cfg, fp8, 4 * 1024**3) == 8192  # the old 4 GiB bound
    assert te.chunk_size(16384, 7168, 2048, 8, 256, 2, cfg) == 16384  # DeepSeek-V3 bf16
    assert te.chunk_size(16384, 6144, 2048, 12, 512, 2, cfg, fp8) == 8192  # LongCat-Flash fp8: two chunks
    assert te.chunk_size(65536, 7168, 2048, 8, 256, 2, cfg) == 65536 // 2  # bf16 past ~44K tokens: two
    # the bound holds: the chosen chunk's scratch, by the same accounting, fits
    per_token = 8 * (2048 + 7168) * 2 + 8 * 12 + 64 + fp8.bytes_per_token(7168, 2048, 8, False)
    assert 2 * 256 * 64 * 2048 * 2 + 16384 * per_token <= te.DEFAULT_WORKSPACE_BYTES


@pytest.mark.parametrize("case", ["plain", "holes", "hot", "k1", "zero_w"])
def test_inline_layout_matches_align(case, monkeypatch):
    """Decode path (T·K <= INLINE_SLOTS: layout built in registers) against the align kernel."""
    emap = None
    if case == "holes":
        emap = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1], dtype=torch.int32, device=DEV)
        x, w1, w2, w, ids, _, _ = make(13, 4, 3, 32, 16, num_global=8)
        ids[2] = torch.tensor([1, 3, 6], dtype=torch.int32)  # a dead token
    elif case == "hot":  # 40 slots of one expert: several BLOCK_M=16 blocks of one expert
        x, w1, w2, w, ids, _, _ = make(20, 4, 2, 32, 16, hot=True)
    elif case == "k1":
        x, w1, w2, w, ids, _, _ = make(30, 4, 1, 32, 16)
    else:
        x, w1, w2, w, ids, _, _ = make(16, 6, 4, 32, 16)
        if case == "zero_w":
            w[::2, 1] = 0.0
            w[3] = 0.0  # every slot of token 3 skipped: its row must be 0
    cfg = {"BLOCK_M": 16, "w13": dict(BN=16, BK=32, GROUP_M=2, num_warps=4, num_stages=2),
           "w2": dict(BN=16, BK=16, GROUP_M=2, num_warps=4, num_stages=2)}
    args = (x, w1, w2, w, ids, "silu", False, None, None, emap, None)
    monkeypatch.setattr(te, "INLINE_SLOTS", 64)  # the kernels hold up to 64 slots in registers
    fast = te.fused_experts_impl(*args, config=cfg)
    monkeypatch.setattr(te, "INLINE_SLOTS", 0)
    slow = te.fused_experts_impl(*args, config=cfg)
    assert torch.equal(fast, slow)
    ref = fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids, expert_map=emap)
    check(fast, ref, torch.float32)


@pytest.mark.parametrize("bm", [16, 32])
def test_explicit_configs(bm):
    x, w1, w2, w, ids, _, _ = make(21, 4, 2, 40, 24)  # H, I not multiples of the tiles
    cfg = {"BLOCK_M": bm, "w13": dict(BN=16, BK=32, GROUP_M=2, num_warps=4, num_stages=2),
           "w2": dict(BN=32, BK=16, GROUP_M=1, num_warps=4, num_stages=2)}
    out = te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None, None, config=cfg)
    check(out, fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids), torch.float32)


@pytest.mark.parametrize("act,bias", [("silu", False), ("swigluoai", True), ("relu2", False)])
def test_tma_weight_tiles(act, bias):
    """Weight tiles through tensor descriptors (rows past I inside a tile belong to the neighbour)."""
    x, w1, w2, w, ids, b1, b2 = make(19, 5, 3, 48, 40, dtype=torch.bfloat16, act=act, bias=bias)
    cfg = {"BLOCK_M": 16, "tma": True, "w13": dict(BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=3),
           "w2": dict(BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=3)}
    out = te.fused_experts_impl(x, w1, w2, w, ids, act, False, b1, b2, None, None, config=cfg)
    k64 = dict(activation=act, w1_bias=b1.double() if bias else None, w2_bias=b2.double() if bias else None)
    check(out, fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids, **k64), torch.bfloat16)
    cfg["tma"] = False
    ref_kernel = te.fused_experts_impl(x, w1, w2, w, ids, act, False, b1, b2, None, None, config=cfg)
    assert ((out.float() - ref_kernel.float()).abs().max() <= 1e-2 * ref_kernel.float().abs().max())


def test_dispatcher_and_layer():
    x, w1, w2, w, ids, _, _ = make(5, 4, 2, 32, 16)
    out = fused_experts(x, w1, w2, w, ids, backend="triton")
    check(out, fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids), torch.float32)
    torch.manual_seed(0)
    lt = moekit.FusedMoE(6, 2, 32, 16, params_dtype=torch.float32, device=DEV, backend="triton")
    lt.load_expert_weights(torch.randn(6, 32, 32, device=DEV) * 0.2, torch.randn(6, 32, 16, device=DEV) * 0.2)
    lr = moekit.FusedMoE(6, 2, 32, 16, params_dtype=torch.float32, device=DEV, backend="torch")
    lr.load_state_dict(lt.state_dict())
    xs, logits = torch.randn(9, 32, device=DEV), torch.randn(9, 6, device=DEV)
    torch.testing.assert_close(lt(xs, logits), lr(xs, logits), atol=1e-4, rtol=1e-4)


def test_validation_errors():
    # the front validates once, then calls the Triton table (which checks nothing again)
    x, w1, w2, w, ids, _, _ = make(3, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="apply_router_weight_on_input"):
        fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True, backend="triton")
    with pytest.raises(ValueError, match="activation"):
        fused_experts(x, w1, w2, w, ids, activation="nope", backend="triton")
    with pytest.raises(TypeError, match="hidden_states"):
        fused_experts(x.double(), w1.double(), w2.double(), w, ids, backend="triton")


def test_opcheck():
    x, w1, w2, w, ids, b1, b2 = make(4, 3, 2, 16, 16, bias=True)
    args = (x, w1, w2, w, ids, "silu", False, b1, b2, None, None)
    torch.library.opcheck(te.fused_experts_op, args)


@pytest.mark.gpu
def test_262144_tokens_int64_offsets():
    t, e, k, h, i = 262144, 8, 2, 4096, 64  # x alone spans 2^30 elements; slot·H offsets pass 2^31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=g) / i**0.5
    ids = torch.randint(0, e, (t, k), device="cuda", generator=g, dtype=torch.int32)
    ids[:, 1] = (ids[:, 0] + 1) % e
    w = torch.rand(t, k, device="cuda", generator=g)
    out = te.fused_experts_triton(x, w1, w2, w, ids)
    for rows in (slice(0, 512), slice(t - 512, t), slice(131072, 131584)):
        ref = fused_experts_torch(x[rows].float(), w1.float(), w2.float(), w[rows], ids[rows])
        check(out[rows], ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 3000])
def test_gpu_bf16_large_and_deterministic(t):
    e, k, h, i = 64, 6, 1024, 384
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=g) / i**0.5
    ids = torch.rand(t, e, device="cuda", generator=g).topk(k, dim=-1).indices.int()
    w = torch.rand(t, k, device="cuda", generator=g)
    out = te.fused_experts_triton(x, w1, w2, w, ids)
    check(out, fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids), torch.bfloat16)
    for _ in range(3):
        assert torch.equal(out, te.fused_experts_triton(x, w1, w2, w, ids))


def test_front_validates_once(monkeypatch):
    # front -> one validation -> table.experts -> custom op -> launcher (never back to the checks)
    from moekit.ops import api, experts

    calls = []
    real = experts.check_experts_inputs
    counting = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(api, "check_experts_inputs", counting)
    monkeypatch.setattr(experts, "check_experts_inputs", counting)
    x, w1, w2, w, ids, _, _ = make(5, 4, 2, 32, 16)
    fused_experts(x, w1, w2, w, ids, backend="triton")
    assert len(calls) == 1


@pytest.mark.parametrize("t, e, k, mode", [
    (128, 128, 8, "small"),    # 1024 slots: the single launch (H200 crossover, Qwen3: 9.2 vs 9.4 µs)
    (256, 128, 8, "multi"),    # 2048 slots over 128 experts: count + scatter (16.4 vs 9.4 µs)
    (1024, 256, 8, "multi"),   # DeepSeek-V3 T = 1024
    (512, 8, 2, "small"),      # Mixtral T = 512: 1024 slots on 8 counters (8.9 vs 9.8 µs)
    (1024, 8, 2, "multi"),     # Mixtral T = 1024: few counters change nothing (15.9 vs 9.8 µs)
    (2, 8, 2, "inline"),       # decode: no align kernel
])
def test_align_mode_bounds(t, e, k, mode):
    """Which align path a chunk takes (``launch_plan``): inline up to ``INLINE_SLOTS`` slots, the single
    launch up to ``SMALL_SLOTS``, then count + scatter, whatever the number of experts."""
    from moekit.ops.triton_configs import heuristic_config

    cfg = te._freeze(heuristic_config(t, e, 256, 128, k, torch.bfloat16))
    plan = te.launch_plan(t, 256, 128, 256, e, e, k, torch.bfloat16, 0, True, False, False, False, False, None,
                          False, te.SMALL_SLOTS, te.INLINE_SLOTS, cfg)
    assert plan.align == mode


def test_the_experts_call_passes_the_align_bounds(monkeypatch):
    """``_run_chunk`` hands ``launch_plan`` the module's align bounds, read at call time."""
    seen = []
    real = te.launch_plan

    def spy(*args, **kw):
        seen.append(args[16:18])
        return real(*args, **kw)

    monkeypatch.setattr(te, "launch_plan", spy)
    monkeypatch.setattr(te, "SMALL_SLOTS", 40)
    x, w1, w2, w, ids, _, _ = make(40, 6, 2, 32, 16)
    te.fused_experts_triton(x, w1, w2, w, ids)
    assert seen == [(40, te.INLINE_SLOTS)]


def _cancelling_fp16_slots(t=3, h=64, i=64):
    """fp16 experts whose two slots give +-7e4 per column (past fp16's 65504) and sum to ~3.8e3: x = 0.5, gate rows
    0.3125 (g = 10), up rows 1/32 (u = 1), w2 = +112 (expert 0) / -106 (expert 1), both slots weighted 1."""
    x = torch.full((t, h), 0.5)
    w13 = torch.cat([torch.full((2, i, h), 0.3125), torch.full((2, i, h), 1 / 32)], dim=1)
    w2 = torch.stack([torch.full((h, i), 112.0), torch.full((h, i), -106.0)])
    ids = torch.tensor([[0, 1]] * t, dtype=torch.int32)
    return x.half(), w13.half(), w2.half(), torch.ones(t, 2), ids


@pytest.mark.parametrize("activation", ["swigluoai", "silu", "gelu", "gelu_tanh"])
def test_huge_negative_gate_gives_zero_not_nan(activation):
    # round 51: the epilogue computed swigluoai as ((u + 1)·g)·σ(αg), which overflowed to -inf for g < -4e37 and gave
    # -inf·0 = NaN; the value is 0 (the twin: tests/ops/test_activation.py). Expert 0: gate -1e38, up 10 (clamped to
    # 7); expert 1 an ordinary expert, so the token's output is its slot alone and finite
    h = i = 64
    x = torch.ones(2, h)
    w13 = torch.zeros(2, 2 * i, h)
    w13[0, :i] = -1e38 / h
    w13[0, i:] = 10.0 / h
    w13[1] = torch.randn(2 * i, h, generator=torch.Generator().manual_seed(0)) / h
    w2 = torch.randn(2, h, i, generator=torch.Generator().manual_seed(1)) / i
    w = torch.full((2, 2), 0.5)
    ids = torch.tensor([[0, 1], [1, 0]])
    ref = fused_experts_torch(x, w13, w2, w, ids, activation=activation)
    out = fused_experts(*(v.to(DEV) for v in (x, w13, w2, w, ids)), activation=activation).cpu()
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    only1 = fused_experts_torch(x, w13, w2, w, torch.tensor([[1, 1], [1, 1]]), activation=activation) / 2
    torch.testing.assert_close(ref, only1, rtol=1e-5, atol=1e-6)  # expert 0 contributed 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [None, {"sum_pass": True}], ids=["table", "sum_pass"])
def test_fp16_slots_past_fp16_range_sum_exactly(config):
    # round 50: the weighted slot rows were stored in fp16 before the top-k sum: two slots of +-7e4 that cancel gave
    # inf (the twin sums fp32 rows). fp16 keeps them in float32 now; the fused sum and the sum pass alike
    x, w13, w2, w, ids = _cancelling_fp16_slots()
    ref = naive(x, w13, w2, w, ids)
    slot0 = naive(x, w13, w2, torch.ones(3, 1), ids[:, :1])
    assert slot0.abs().min() > 65504 and ref.abs().max() < 65504  # the case: only the slots overflow fp16
    args = [v.to(DEV) for v in (x, w13, w2, w, ids)]
    if config is None:
        out = fused_experts(*args)
    else:
        cfg = te.get_config(torch.device(DEV), 3, 2, 64, 64, 2, torch.float16, True)
        out = te.fused_experts_impl(*args, "silu", False, None, None, None, None, config={**cfg, **config})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=2e-3, atol=0)
