"""fused_experts_quant_torch (SPEC §8) against a naive float64 per-token loop of the same quantised math.

The oracle below shares no code with moekit: it dequantises the stored tensors with its own bit
arithmetic, quantises activations per (token, group) in float64, and runs every slot separately.
Tolerances (SPEC §8, relative RMS of the whole output): fp8 <= 5e-3; weight-only <= 1e-2 in bf16,
1e-4 (atol = rtol) in fp32. A variant of the oracle that drops a step shows the tests can fail.
"""

import dataclasses
import math

import pytest
import torch

from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format
from moekit.ops.quantize import quantize_experts
from reference import assert_close_dtype, ref_act, rel_rms

ACTS = ["silu", "gelu", "gelu_tanh", "swigluoai", "relu2"]
FP8 = [Fp8BlockFormat(16, 16), Fp8BlockFormat(16, 16, True), Fp8BlockFormat(128, 128), Fp8ChannelFormat(),
       Fp8ChannelFormat(per_tensor=True), Fp8ChannelFormat(per_tensor=True, static_input=True)]
W4 = [Mxfp4Format(), Int4GroupFormat(32), Int4GroupFormat(16)]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _fmt_id(fmt) -> str:
    """A test id from the format's settings (stable across processes: pytest-xdist workers must collect the same
    ids; a ``hash`` of the format is salted per process)."""
    skip = ("ignore", "targets")
    return type(fmt).__name__ + "".join(f"-{k}={v}" for k, v in dataclasses.asdict(fmt).items() if k not in skip)


# ------------------------------------------------------------------ the float64 oracle
def _grid(s, n, k, bn, bk):
    """Per-element multiplier from per-block scales (float64)."""
    r, c = torch.arange(n) // bn, torch.arange(k) // bk
    return s.double()[r][:, c]


def ref_dequant(fmt, wq, s, shards):
    """One expert's stored weight -> float64 [N, K]."""
    if isinstance(fmt, Mxfp4Format):
        b = wq.long()
        codes = torch.stack([b & 15, b >> 4], -1).flatten(-2)
        mag = torch.tensor(E2M1, dtype=torch.float64)[codes & 7]
        return torch.where(codes >= 8, -mag, mag) * 2.0 ** (s.double() - 127).repeat_interleave(32, -1)
    if isinstance(fmt, Int4GroupFormat):
        u = wq.long() & 0xFFFFFFFF
        q = torch.stack([(u >> (4 * j)) & 15 for j in range(8)], -1).flatten(-2) - 8
        return q.double() * s.double().repeat_interleave(fmt.group_size, -1)
    w = wq.double()
    n, k = w.shape
    rows = n // shards
    if isinstance(fmt, Fp8BlockFormat):
        per = s.shape[0] // shards
        return torch.cat([w[j * rows:(j + 1) * rows] * _grid(s[j * per:(j + 1) * per], rows, k, fmt.block_n,
                                                           fmt.block_k) for j in range(shards)])
    if fmt.per_tensor:
        sc = s.double().reshape(-1)
        return torch.cat([w[j * rows:(j + 1) * rows] * sc[j] for j in range(sc.numel())])
    return w * s.double()[:, None]


def ref_qact(v, fmt, static, skip=False, per_token=False, f32=True):
    """fp8 activation quantisation of one token's vector (identity for weight-only), the result in float64.
    ``f32``: the scale ``s`` and ``v / s`` in float32, as SPEC §8's float32 scales are (a value on an e4m3 rounding
    midpoint in exact arithmetic, e.g. 336 = 1.453125 / (1.9375 / 448), is not one in float32: a float64 scale would
    round it the other way, round 46's fuzzing found); float64 layers quantise in float64."""
    if not fmt.quantizes_activations or skip:
        return v
    ft = torch.float32 if f32 else torch.float64
    if static is not None:
        st = torch.as_tensor(static, dtype=ft)
        return (v.to(ft) / st).clamp(-448, 448).to(torch.float8_e4m3fn).double() * st.double()
    g = fmt.block_k if isinstance(fmt, Fp8BlockFormat) and not per_token else v.numel()
    out = torch.empty_like(v)
    for a in range(0, v.numel(), g):
        s = float(torch.tensor(max(v[a:a + g].abs().max().item(), 1e-10), dtype=ft) / 448)
        if isinstance(fmt, Fp8BlockFormat) and fmt.ue8m0:
            m, ex = math.frexp(s)
            s = 2.0 ** (ex - 1 if m == 0.5 else ex)
        out[a:a + g] = (v[a:a + g].to(ft) / torch.tensor(s, dtype=ft)).clamp(-448, 448).to(torch.float8_e4m3fn) \
            .double() * s
    return out


def ref_quant_experts(x, q, fmt, w, ids, *, activation="silu", b13=None, b2=None, on_input=False, expert_map=None,
                      swiglu_limit=None, in_scales=(None, None), skip_requant=False, per_token=False):
    """[T, H] float64: Σ_j w·(W2 · q(round(act(W13 · q(x) + b13))) + b2), every step in float64."""
    w13q, w2q, s13, s2 = q
    shards = 2 if activation != "relu2" else 1
    dt = x.dtype
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) if expert_map is None else int(expert_map[int(ids[t, j])])
            wt = float(w[t, j])
            if e < 0 or (wt == 0 and not on_input):
                continue
            xin = (x[t].double() * wt).to(dt).double() if on_input else x[t].double()
            f32 = dt != torch.float64
            h = ref_dequant(fmt, w13q[e], s13[e], shards) @ ref_qact(xin, fmt, in_scales[0], per_token=per_token,
                                                                     f32=f32)
            h = h + (b13[e].double() if b13 is not None else 0)
            a = ref_act(h, activation, swiglu_limit).to(dt).double()
            o = ref_dequant(fmt, w2q[e], s2[e], 1) @ ref_qact(a, fmt, in_scales[1], skip_requant, per_token, f32)
            o = o + (b2[e].double() if b2 is not None else 0)
            out[t] += o if on_input else wt * o
    return out


# ------------------------------------------------------------------ cases
def _case(fmt, t, e, k, *, h=None, i=None, activation="silu", bias=False, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = h or (72 if fmt.quantizes_activations else 64)
    i = i or (40 if fmt.quantizes_activations else 32)
    rows = i if activation == "relu2" else 2 * i
    w13 = torch.randn(e, rows, h, generator=g) / math.sqrt(h)
    w2 = torch.randn(e, h, i, generator=g) / math.sqrt(i)
    q = quantize_experts(w13.to(dtype), w2.to(dtype), fmt)
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int() if t else torch.zeros(0, k).int()
    w = torch.rand(t, k, generator=g) + 0.1
    b13 = (torch.randn(e, rows, generator=g) * 0.5).to(dtype) if bias else None
    b2 = (torch.randn(e, h, generator=g) * 0.5).to(dtype) if bias else None
    static = getattr(fmt, "static_input", False)
    ins = (torch.rand(e, generator=g) * 0.01 + 0.005, torch.rand(e, generator=g) * 0.01 + 0.005) if static else None
    return x, q, w, ids, b13, b2, ins


def _run(fmt, x, q, w, ids, ins=None, **kw):
    return fused_experts_quant_torch(x, q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3],
                                     w13_input_scale=ins[0] if ins else None, w2_input_scale=ins[1] if ins else None,
                                     **kw)


def _check(fmt, out, ref, dtype):
    assert out.dtype == dtype and torch.isfinite(out).all()
    if fmt.quantizes_activations:
        assert rel_rms(out, ref) <= 5e-3, rel_rms(out, ref)
    else:
        assert_close_dtype(out, ref, dtype)


def _ref_kw(ins):
    return {"in_scales": (ins[0].max().item(), ins[1].max().item())} if ins is not None else {}


@pytest.mark.parametrize("fmt", FP8 + W4, ids=lambda f: _fmt_id(f))
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_formats_activations_biases(fmt, activation, bias):
    x, q, w, ids, b13, b2, ins = _case(fmt, 11, 5, 2, activation=activation, bias=bias)
    limit = 5.0 if activation == "swigluoai" else None
    out = _run(fmt, x, q, w, ids, ins, activation=activation, w1_bias=b13, w2_bias=b2, swiglu_limit=limit)
    ref = ref_quant_experts(x, q, fmt, w, ids, activation=activation, b13=b13, b2=b2, swiglu_limit=limit, **_ref_kw(ins))
    _check(fmt, out, ref, torch.bfloat16)


@pytest.mark.parametrize("fmt", [FP8[0], FP8[3], W4[0], W4[1]], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(fmt, dtype):
    x, q, w, ids, b13, b2, _ = _case(fmt, 9, 4, 2, bias=True, dtype=dtype)
    out = _run(fmt, x, q, w, ids, w1_bias=b13, w2_bias=b2, activation="gelu")
    _check(fmt, out, ref_quant_experts(x, q, fmt, w, ids, activation="gelu", b13=b13, b2=b2), dtype)


@pytest.mark.parametrize("fmt", [FP8[1], FP8[4], W4[2]], ids=lambda f: f.name)
@pytest.mark.parametrize("t, e, k", [(0, 4, 2), (1, 4, 1), (7, 3, 3), (13, 1, 1), (5, 6, 6)])
def test_token_and_topk_edges(fmt, t, e, k):
    # T = 0 / 1, K = 1, K = E
    x, q, w, ids, *_ = _case(fmt, t, e, k)
    out = _run(fmt, x, q, w, ids)
    assert out.shape == x.shape
    if t:
        _check(fmt, out, ref_quant_experts(x, q, fmt, w, ids), torch.bfloat16)


@pytest.mark.parametrize("fmt", [FP8[0], FP8[2], FP8[3], FP8[5]], ids=lambda f: _fmt_id(f))
def test_prime_sizes_partial_blocks(fmt):
    x, q, w, ids, b13, b2, ins = _case(fmt, 17, 5, 2, h=67, i=37, bias=True)
    out = _run(fmt, x, q, w, ids, ins, w1_bias=b13, w2_bias=b2)
    _check(fmt, out, ref_quant_experts(x, q, fmt, w, ids, b13=b13, b2=b2, **_ref_kw(ins)), torch.bfloat16)


@pytest.mark.parametrize("fmt", [FP8[0], W4[0], W4[1]], ids=lambda f: f.name)
def test_expert_map_and_router_weight_on_input(fmt):
    x, q, w, ids, *_ = _case(fmt, 10, 4, 2)
    emap = torch.tensor([2, -1, 0, -1, 3, 1], dtype=torch.int32)  # 6 global ids, 4 local experts
    gids = torch.stack([torch.randperm(6)[:2] for _ in range(10)]).int()
    out = _run(fmt, x, q, w, gids, expert_map=emap, global_num_experts=6)
    _check(fmt, out, ref_quant_experts(x, q, fmt, w, gids, expert_map=emap), torch.bfloat16)
    w1, ids1 = w[:, :1], ids[:, :1]
    out = _run(fmt, x, q, w1, ids1, apply_router_weight_on_input=True)
    _check(fmt, out, ref_quant_experts(x, q, fmt, w1, ids1, on_input=True), torch.bfloat16)


def test_swiglu_limit_on_gated_activations():
    fmt = FP8[0]
    x, q, w, ids, *_ = _case(fmt, 8, 4, 2)
    x = x * 8  # large pre-activations so the clamp is active
    out = _run(fmt, x, q, w, ids, swiglu_limit=1.5)
    _check(fmt, out, ref_quant_experts(x, q, fmt, w, ids, swiglu_limit=1.5), torch.bfloat16)


@pytest.mark.parametrize("fmt", [FP8[0], W4[1]], ids=lambda f: f.name)
def test_chunking_and_no_cache_are_exact(fmt):
    # tiny workspace: many token chunks, experts dequantised again per chunk; same bits as one chunk
    x, q, w, ids, *_ = _case(fmt, 31, 5, 2)
    big = _run(fmt, x, q, w, ids)
    small = _run(fmt, x, q, w, ids, workspace_bytes=4096)
    assert torch.equal(big, small)
    assert torch.equal(_run(fmt, x[7:8], q, w[7:8], ids[7:8]), big[7:8])  # a token's output ignores the batch


def test_dropping_a_step_is_caught():
    # the oracle without the re-quantisation before w2 (or with per-token instead of per-group scales)
    # moves the output by far more than the fp8 tolerance, so a twin that skipped it would fail
    fmt = Fp8BlockFormat(16, 16)
    x, q, w, ids, *_ = _case(fmt, 16, 4, 2, h=128, i=64)
    x[:, :16] *= 30  # an outlier group: per-token scales would crush the other groups
    full = ref_quant_experts(x, q, fmt, w, ids)
    out = _run(fmt, x, q, w, ids)
    assert rel_rms(out, full) <= 5e-3
    no_requant = rel_rms(out, ref_quant_experts(x, q, fmt, w, ids, skip_requant=True))
    per_token = rel_rms(out, ref_quant_experts(x, q, fmt, w, ids, per_token=True))
    assert no_requant >= 1.4e-2 and per_token >= 1.4e-2, (no_requant, per_token)


def test_errors():
    fmt = FP8[0]
    x, q, w, ids, *_ = _case(fmt, 4, 3, 2)
    with pytest.raises(ValueError, match="w13_scale must have shape"):
        fused_experts_quant_torch(x, q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2][:, :1], w2_scale=q[3])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fused_experts_quant_torch(x, q[0].float(), q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3])
    with pytest.raises(ValueError, match="width"):
        fused_experts_quant_torch(x[:, :8], q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3])
    x5, q5, w5, ids5, *_ = _case(FP8[5], 4, 3, 2)
    with pytest.raises(ValueError, match="w13_input_scale is required"):
        fused_experts_quant_torch(x5, q5[0], q5[1], w5, ids5, fmt=FP8[5], w13_scale=q5[2], w2_scale=q5[3])
    with pytest.raises(ValueError, match="topk_ids must lie"):
        fused_experts_quant_torch(x, q[0], q[1], w, ids + 5, fmt=fmt, w13_scale=q[2], w2_scale=q[3])
    with pytest.raises(ValueError, match="activation"):
        fused_experts_quant_torch(x, q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3], activation="tanh")
    with pytest.raises(ValueError, match="top_k == 1"):
        fused_experts_quant_torch(x, q[0], q[1], w, ids, fmt=fmt, w13_scale=q[2], w2_scale=q[3],
                                  apply_router_weight_on_input=True)
    with pytest.raises(ValueError, match="fmt"):
        fused_experts_quant_torch(x, q[0], q[1], w, ids, fmt=None, w13_scale=q[2], w2_scale=q[3])


def test_oracle_activation_scale_is_float32_at_an_e4m3_midpoint():
    # round 46's fuzzing: 1.453125 / (1.9375 / 448) is 336 exactly in float64, the midpoint of e4m3 320 and 352
    # (ties to even: 320), but 336.00002 in float32 (-> 352, what the twin and kernels compute); the oracle
    # quantises in float32 now, as SPEC §8's float32 scales do, so it agrees with the twin on such a token
    from moekit.ops._quant_rules import dequantize_fp8_activations, quantize_fp8_activations

    fmt = Fp8BlockFormat(16, 16)
    v = torch.tensor([1.9375, 1.453125], dtype=torch.float64)
    q, s = quantize_fp8_activations(v[None].to(torch.bfloat16), 16)
    twin = dequantize_fp8_activations(q, s, 16).double()[0]
    torch.testing.assert_close(ref_qact(v, fmt, None), twin, rtol=1e-6, atol=0)  # the same e4m3 code, 352
    assert (ref_qact(v, fmt, None, f32=False) - twin).abs().max() > 0.1  # a float64 scale picks 320


@pytest.mark.parametrize("fmt", [Mxfp4Format(), Int4GroupFormat(32)], ids=["mxfp4", "int4"])
def test_fp16_weight_only_products_beyond_fp16_range_stay_finite(fmt):
    # round 49: weight-only GEMMs ran in fp16 in the twin: a gate pre-activation of ~ -1e5 (silu ~ -0) became -inf
    # (silu: NaN); the kernels accumulate in fp32. The twin's fp16 GEMMs now run in fp32 (as the unquantised twin's)
    g = torch.Generator().manual_seed(1)
    e, h, inter = 2, 64, 32
    w13 = torch.rand(e, 2 * inter, h, generator=g) * 0.05
    w13[:, :inter] *= -1  # gate rows negative, up rows positive
    w2 = torch.randn(e, h, inter, generator=g) * 0.05
    q13, q2, s13, s2 = quantize_experts(w13.half(), w2.half(), fmt)
    x = torch.full((2, h), 40000.0).half()  # g ~ -7e4 per gate row: beyond fp16
    ids, w = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), torch.full((2, 2), 0.5)
    out = fused_experts_quant_torch(x, q13, q2, w, ids, fmt=fmt, w13_scale=s13, w2_scale=s2)
    assert torch.isfinite(out).all() and out.abs().max() < 1e-2  # silu of a large negative gate: ~0


def test_ue8m0_power_of_two_keeps_inf():
    # round 49: frexp(inf) has exponent 0, so an activation group holding inf got the scale 1 (finite garbage)
    from moekit.ops._quant_rules import _pow2_ceil

    s = torch.tensor([float("inf"), 3.0, 4.0, 0.3])
    assert _pow2_ceil(s).tolist() == [float("inf"), 4.0, 4.0, 0.5]
