"""The Triton zero-expert and output-combine kernels (``moekit.ops.triton_zero``) against their torch twins
(``moekit.ops.zero_experts``): the same bits (masked ids and weights, the zero slots' float32 weight sum, the rounded
output with the zero contribution ``x · s`` added), and the twins against a naive per-token float64 loop.

On CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``); on a GPU the same cases run on the device.
"""

import pytest
import torch

pytest.importorskip("triton")

from moekit.ops import triton_zero as tz  # noqa: E402
from moekit.ops.zero_experts import zero_combine_torch, zero_slots_torch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _slots(t, k, e, z, h, seed, ids_dtype=torch.int32, dtype=torch.bfloat16, hot_zero=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e + z, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k)
    if hot_zero and t:  # every slot of row 0 a zero expert, row 1 none
        ids[0] = torch.arange(e, e + k) if k <= z else ids[0]
        if t > 1:
            ids[1] = torch.arange(k) % e
    w = torch.rand(t, k, generator=g) * 3.0 + 0.01
    x = torch.randn(t, h, generator=g) * 4
    return x.to(dtype).to(DEV), w.float().to(DEV), ids.to(ids_dtype).to(DEV)


def _naive(w, ids, e):
    """Per token, float64: s = Σ_{ids >= e} w; zero slots -> (0, 0.0)."""
    t = w.shape[0]
    s = torch.zeros(t, dtype=torch.float64)
    wm, im = w.clone().cpu(), ids.clone().cpu()
    for i in range(t):
        for j in range(w.shape[1]):
            if int(ids[i, j]) >= e:
                s[i] += float(w[i, j])
                wm[i, j], im[i, j] = 0.0, 0
    return wm, im, s


CASES = [  # (T, K, E, Z, H): the edge each covers
    (0, 4, 8, 4, 16),       # the empty batch
    (1, 1, 5, 3, 7),        # one token, K = 1, prime H
    (7, 12, 32, 16, 96),    # LongCat-like K = 12 (not a power of two), several zero slots per row
    (5, 4, 4, 4, 1500),     # K = E
    (3, 3, 6, 3, 33),       # K = Z: a row routed only to zero experts (hot_zero) and one with none
]


@pytest.mark.parametrize("t, k, e, z, h", CASES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_zero_slots_kernel_matches_the_twin_bit_for_bit(t, k, e, z, h, ids_dtype):
    x, w, ids = _slots(t, k, e, z, h, seed=t + k + h, ids_dtype=ids_dtype, hot_zero=True)
    wt, it, st = tz.zero_slots_triton(w, ids, e)
    wr, ir, sr = zero_slots_torch(w, ids, e)
    assert it.dtype == ids.dtype and wt.dtype == torch.float32 and st.dtype == torch.float32
    assert st.shape == (t,)  # [T]: no [T, H] buffer
    assert torch.equal(it, ir) and torch.equal(wt, wr) and torch.equal(st, sr)
    wn, in_, sn = _naive(w, ids, e)
    assert torch.equal(ir.cpu(), in_) and torch.equal(wr.cpu(), wn)
    torch.testing.assert_close(sr.cpu().double(), sn, rtol=1e-6, atol=1e-6)
    if t >= 2 and k <= z:  # the all-zero row carries Σw, the row without zero slots exactly 0
        assert st[1] == 0 and st[0] > 0 and bool((it[0] == 0).all()) and bool((wt[0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_zero", [True, False])
@pytest.mark.parametrize("scale", [1.0, 6.0, 2.5])
def test_zero_combine_kernel_matches_the_twin_bit_for_bit(dtype, with_zero, scale):
    for t, h in ((0, 8), (1, 7), (6, 1500)):  # empty, prime H, several column blocks (H > ZERO_BH) ragged
        g = torch.Generator().manual_seed(t + h)
        routed = (torch.randn(t, h, generator=g) * 3).to(dtype).to(DEV)
        x = (torch.randn(t, h, generator=g) * 2).to(dtype).to(DEV)
        s = (torch.rand(t, generator=g) * 1.7).to(DEV) if with_zero else None
        if with_zero and t > 1:
            s[1] = 0.0  # a row with no zero slot
        out = tz.zero_combine_triton(routed, x, s, scale)
        ref = zero_combine_torch(routed, x, s, scale)
        assert out.dtype == dtype and out.shape == routed.shape
        assert torch.equal(out, ref), (t, h)
        zero = x.double() * s.double().unsqueeze(-1) if with_zero else 0
        naive = (routed.double() + zero) * scale  # float64, per element
        tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]  # three float32 roundings
        torch.testing.assert_close(ref.double(), naive, rtol=tol, atol=tol)
        if with_zero and t:  # strided views of the rows and of s give the same bits
            wide = torch.zeros(t, 2 * h, dtype=dtype, device=DEV)
            wide[:, ::2], wide[:, 1::2] = routed, x
            s2 = torch.stack([s, s], 1)[:, 0]
            assert torch.equal(tz.zero_combine_triton(wide[:, ::2], wide[:, 1::2], s2, scale), ref)
            assert torch.equal(tz.zero_combine_op(wide[:, ::2], wide[:, 1::2], s2, scale), ref)


def test_zero_ops_opcheck():
    x, w, ids = _slots(5, 4, 6, 3, 40, seed=3)
    torch.library.opcheck(tz.zero_slots_op, (w, ids, 6))
    routed = torch.randn(5, 40, device=DEV).bfloat16()
    torch.library.opcheck(tz.zero_combine_op, (routed, x, torch.rand(5, device=DEV), 6.0))
    torch.library.opcheck(tz.zero_combine_op, (routed, None, None, 2.5))


@pytest.mark.parametrize("scale_on_output", [False, True])
def test_a_longcat_layer_on_triton_takes_the_zero_path_of_the_twin(scale_on_output):
    # a LongCat-Flash-like layer (zero experts, selection bias, routed_scaling_factor 6 on the weights or the output):
    # every slot routed to a zero expert, so the routed experts add exactly nothing and the Triton layer's output is
    # the twin's ((0 + x · Σw) · scale) bit for bit; with mixed routing both backends agree within bf16 rounding
    from moekit import FusedMoE

    e, z, k, h, i = 12, 4, 4, 48, 16
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.2).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g) * 0.2).bfloat16()
    outs = {}
    for backend in ("torch", "triton"):
        for name, bias in (("all_zero", torch.tensor([0.0] * e + [50.0] * z)),
                           ("mixed", torch.linspace(-0.2, 0.2, e + z))):
            layer = FusedMoE(e, k, h, i, params_dtype=torch.bfloat16, renormalize=False, zero_expert_type="identity",
                             e_score_correction_bias=bias.to(DEV), routed_scaling_factor=6.0,
                             apply_routed_scale_to_output=scale_on_output, backend=backend, device=DEV).eval()
            layer.load_expert_weights(w13.to(DEV), w2.to(DEV))
            x = torch.randn(9, h, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEV)
            logits = torch.randn(9, e + z, generator=torch.Generator().manual_seed(2)).to(DEV)
            with torch.no_grad():
                outs[backend, name] = layer(x, logits)
    assert torch.equal(outs["triton", "all_zero"], outs["torch", "all_zero"])
    assert torch.count_nonzero(outs["torch", "all_zero"]) > 0
    torch.testing.assert_close(outs["triton", "mixed"].float(), outs["torch", "mixed"].float(), rtol=2e-2, atol=2e-2)
