"""The kernels' in-register 4-bit decode, tile by tile, against the twin's dequantisation, bit for bit.

The end-to-end experts tests compare outputs within a relative tolerance; a decode that permutes
nibbles inside a word or misplaces a group scale can stay under a bf16 tolerance of 1e-2 on random
weights. Here one small kernel runs ``load_w_scales`` + ``load_packed_w`` (the grouped GEMMs' own
helpers) over every K step of a packed matrix and stores the [BK, BN] tiles; the result must equal
``mxfp4_dequantize`` / ``int4_group_dequantize`` rounded to the same dtype exactly (the kernels'
values are exact in fp32 before that one rounding). Shapes cover a K tail (EVEN_K False), groups
shorter and longer than the K step, and column tails (N not a multiple of BN). (An int4 offset
one off, 2^23 + 7 for 2^23 + 8, fails 12 of these cases.) The ``gpu`` tests repeat them compiled, where
bf16 takes the packed-bf16 PTX decode (``w4_decode._decode_bf16``), and add every byte under every e8m0 scale.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from moekit.ops._quant_rules import (  # noqa: E402
    int4_group_dequantize, int4_group_quantize, mxfp4_dequantize, mxfp4_quantize,
)
from moekit.ops._triton.quant import INT4, MXFP4  # noqa: E402
from moekit.ops._triton.w4_decode import load_packed_w, load_w_scales  # noqa: E402
from moekit.ops.triton_experts import _interpreting  # noqa: E402
from moekit.ops.triton_experts_quant import _ptx_decode  # noqa: E402


@triton.jit
def _decode_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                   DT: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr, G: tl.constexpr,
                   BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr,
                   PTX: tl.constexpr):
    """out[n, k] = W[n, k] for the BN columns of program ``pid``, one [BK, BN] tile per K step."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    ptrs = w_ptr + offs_n[:, None] * stride_wn + tl.arange(0, BK // PACK)[None, :]
    s_row = s_ptr + offs_n * stride_sn
    for k0 in range(0, K, BK):
        s = load_w_scales(s_row, k0, K, nmask, G, BK)
        w = load_packed_w(ptrs, s, k0, K, nmask, DT, QUANT, PACK, G, BK, BN, EVEN_K, INTERP, 1, PTX)
        kk = k0 + tl.arange(0, BK)
        tl.store(out_ptr + kk[:, None] + offs_n[None, :] * stride_on, w, mask=(kk[:, None] < K) & nmask[None, :])
        ptrs += BK // PACK


def _decode(packed, scale, n, k, quant, pack, g, bk, bn, dtype):
    out = torch.full((n, k), float("nan"), dtype=dtype, device=packed.device)
    dt = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float16: tl.float16}[dtype]
    _decode_kernel[(triton.cdiv(n, bn),)](
        packed, scale, out, n, k, packed.stride(0), scale.stride(0), out.stride(0),
        DT=dt, QUANT=quant, PACK=pack, G=g, BK=bk, BN=bn, EVEN_K=k % bk == 0, INTERP=_interpreting(),
        PTX=_ptx_decode(packed.device))
    return out


# (N, K, BK, BN): exact tiles; a K tail of one group; a column tail; a K step of one group (BK == 32)
SHAPES = [(64, 256, 128, 32), (48, 160, 128, 32), (40, 128, 64, 16), (32, 96, 32, 32)]


# the interpreter on CPU tensors; compiled on a GPU (bf16 there: the packed-bf16 PTX decode on sm_90+)
DEVICES = [pytest.param("cpu", id="cpu", marks=pytest.mark.interpreter),
           pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k, bk, bn", SHAPES)
def test_mxfp4_tiles_decode_exactly(n, k, bk, bn, dtype, device):
    gen = torch.Generator().manual_seed(n * k + bk)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 2, k)  # scales over many exponents
    codes, scale = mxfp4_quantize(w)
    ref = mxfp4_dequantize(codes, scale).to(dtype)
    got = _decode(codes.to(device), scale.to(device), n, k, MXFP4, 2, 32, bk, bn, dtype)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("n, k, bk, bn", SHAPES)
def test_int4_tiles_decode_exactly(n, k, bk, bn, group, dtype, device):
    if k % group:
        pytest.skip("int4 groups tile K exactly (the format's rule)")
    gen = torch.Generator().manual_seed(n * k + group)
    w = (torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, k)).to(dtype)
    packed, scale = int4_group_quantize(w, group)
    ref = int4_group_dequantize(packed, scale, group).to(dtype)
    got = _decode(packed.to(device), scale.to(device), n, k, INT4, 8, group, bk, bn, dtype)
    assert torch.equal(got.cpu(), ref)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_mxfp4_every_byte_under_every_scale():
    """All 256 bytes (both nibbles, signs, -0) under each e8m0 scale 0..254: subnormal 2^-127 scales and
    products (bf16 keeps subnormals), overflow to inf at the top; bit for bit against the fp32 route."""
    n, k = 255, 512
    codes = torch.arange(256, dtype=torch.uint8).repeat(n, 1)  # [255, 256] bytes = 512 codes per row
    scale = torch.arange(255, dtype=torch.uint8)[:, None].repeat(1, k // 32)
    ref = mxfp4_dequantize(codes, scale).to(torch.bfloat16)
    got = _decode(codes.cuda(), scale.cuda(), n, k, MXFP4, 2, 32, 128, 32, torch.bfloat16).cpu()
    same = (got.view(torch.int16) == ref.view(torch.int16))
    assert same.all(), (got[~same][:8], ref[~same][:8], (~same).nonzero()[:8])


@pytest.mark.gpu
def test_gpu_int4_every_nibble_with_extreme_scales():
    """Every nibble in every position of a word, with bf16 scales from tiny (products round or go
    subnormal) to huge, bit for bit against the fp32 route."""
    n, k, g = 64, 256, 32
    nib = torch.arange(16, dtype=torch.int64)
    words = [sum(int((nib[(j + r) % 16]).item()) << (4 * j) for j in range(8)) for r in range(16)]
    packed = torch.tensor([[(w + (1 << 31)) % (1 << 32) - (1 << 31) for w in words] * (k // 8 // 16)] * n,
                          dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    scale = (torch.randn(n, k // g, generator=gen) * torch.logspace(-40, 37, n)[:, None]).to(torch.bfloat16)
    ref = int4_group_dequantize(packed, scale, g).to(torch.bfloat16)
    got = _decode(packed.cuda(), scale.cuda(), n, k, INT4, 8, g, 128, 32, torch.bfloat16).cpu()
    same = (got.view(torch.int16) == ref.view(torch.int16))
    assert same.all(), (got[~same][:8], ref[~same][:8])
