"""The fast dequantisers (ops/_dequant_fast.py) against the rules of ops/_quant_rules.py: the same bits, every
byte and scale, partial blocks, shards, every output dtype; and where they must step aside (byte 255, gradients)."""

import pytest
import torch

from moekit.ops import _dequant_fast as fast
from moekit.ops._quant_rules import (fp8_block_dequantize, fp8_block_quantize, int4_group_dequantize,
                                     int4_group_quantize, mxfp4_dequantize, mxfp4_quantize)
from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format
from moekit.ops.quantize import dequantize_weight, quantize_weight

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN payloads and signed zeros count)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_every_byte_every_scale(dtype):
    # every code byte (both nibbles: 16 x 16 values, signed zero incl.) under every valid e8m0 scale 0..254
    # (2^-127, a subnormal, .. 2^127): products round the same way into each dtype (fp16 under/overflows alike)
    codes = torch.arange(256, dtype=torch.uint8).repeat(255, 1)  # [255, 256] -> K = 512
    scale = torch.arange(255, dtype=torch.uint8)[:, None].expand(255, 16).contiguous()
    assert fast.fast_ok(codes, scale, mxfp4=True)
    got = fast.mxfp4_dequantize_fast(codes, scale, dtype)
    assert got.dtype == dtype and got.shape == (255, 512)
    assert torch.equal(bits(got), bits(mxfp4_dequantize(codes, scale).to(dtype)))


def test_mxfp4_byte_255_takes_the_rule():
    # e8m0 255 (OCP's NaN): the rule's ldexp by 2^128 stays finite for small values, a float32 2^128 factor is inf;
    # the fast form steps aside and dequantize_weight gives the rule's bits
    codes = torch.arange(256, dtype=torch.uint8).repeat(2, 1)
    scale = torch.full((2, 16), 127, dtype=torch.uint8)
    scale[1, 3] = 255
    assert not fast.fast_ok(codes, scale, mxfp4=True)
    fmt = Mxfp4Format()
    for dtype in DTYPES:
        assert torch.equal(bits(dequantize_weight(codes, scale, fmt, dtype=dtype)),
                           bits(mxfp4_dequantize(codes, scale).to(dtype)))


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_every_value_every_dtype(group, scale_dtype):
    # random weights (every nibble value appears) with scales from tiny to large (fp16 overflow on the way out),
    # a zero and a negative scale (the rule multiplies whatever is stored)
    torch.manual_seed(0)
    w = torch.randn(37, 256) * torch.logspace(-6, 4, 37)[:, None]
    q, s = int4_group_quantize(w.to(scale_dtype), group)
    s = s.clone()
    s[0, 0], s[1, 0] = 0, -s[1, 0]
    for dtype in DTYPES:
        got = fast.int4_group_dequantize_fast(q, s, group, dtype)
        assert torch.equal(bits(got), bits(int4_group_dequantize(q, s, group).to(dtype))), dtype


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)),  # whole blocks
                                         ((300, 200), (128, 128)),  # partial blocks on both axes
                                         ((3, 5, 7), (2, 4)),  # stacked, tiny, partial
                                         ((1, 1), (128, 128))])  # one element
def test_fp8_block_partial_blocks(shape, block):
    torch.manual_seed(1)
    w = torch.randn(shape) * 3
    q, s = fp8_block_quantize(w, *block)
    q = q.clone()
    q.view(torch.uint8).view(-1)[0] = 0x7F  # e4m3fn's NaN code: NaN in both
    got = fast.fp8_block_dequantize_fast(q, s, *block)
    assert got.shape == q.shape
    assert torch.equal(bits(got), bits(fp8_block_dequantize(q, s, *block)))


@pytest.mark.parametrize("fmt", [Fp8BlockFormat(block_n=128, block_k=128), Fp8BlockFormat(block_n=64, block_k=32),
                                 Mxfp4Format(), Int4GroupFormat(group_size=32)], ids=str)
@pytest.mark.parametrize("shards", [None, 1, 2])
def test_dequantize_weight_same_bits_as_rules(fmt, shards, monkeypatch):
    # the public dequantize_weight (the fast forms) against itself with the fast forms switched off (the rules)
    torch.manual_seed(2)
    w = torch.randn(2, 192, 320) * 0.05  # w13-like: two shards of 96 rows (partial 128-blocks)
    q, s = quantize_weight(w, fmt, shards=shards)
    got = {dt: dequantize_weight(q, s, fmt, shards=shards, dtype=dt) for dt in DTYPES}
    monkeypatch.setattr("moekit.ops.quantize.fast_ok", lambda *a: False)
    for dt in DTYPES:
        assert torch.equal(bits(got[dt]), bits(dequantize_weight(q, s, fmt, shards=shards, dtype=dt))), dt


def test_scales_with_gradients_take_the_rule():
    # a scale that takes gradients: the rule's differentiable form runs (the fast fp8 form writes in place)
    q, s = fp8_block_quantize(torch.randn(8, 8), 4, 4)
    s = s.clone().requires_grad_()
    assert not fast.fast_ok(q, s, mxfp4=False)
    dequantize_weight(q, s, Fp8BlockFormat(block_n=4, block_k=4)).sum().backward()
    assert s.grad is not None and s.grad.shape == s.shape


def test_meta_tensors_take_the_rule():
    # meta tensors (a layer built on meta): no values to look up, shapes only
    codes, scale = mxfp4_quantize(torch.randn(4, 64))
    out = dequantize_weight(codes.to("meta"), scale.to("meta"), Mxfp4Format(), dtype=torch.bfloat16)
    assert out.device.type == "meta" and out.shape == (4, 64) and out.dtype == torch.bfloat16


def test_mxfp4_factor_ignores_the_default_dtype():
    # review of round 68: torch.pow(2.0, int tensor) took torch's default dtype: under float16 scale bytes past its
    # range gave 0 / inf; the factor is made from exponent bits now
    codes = torch.full((1, 48), 0x22, dtype=torch.uint8)  # 1.0 in both nibbles
    scale = torch.tensor([[90, 127, 150]], dtype=torch.uint8)
    want = mxfp4_dequantize(codes, scale)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float16)
        got = dequantize_weight(codes, scale, Mxfp4Format(), dtype=torch.float32)
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(bits(got), bits(want))


def test_fp8_partial_blocks_come_back_contiguous():
    # the padded buffer's view was returned where a block is partial (.view(-1) raised); the rule's is contiguous
    q, s = fp8_block_quantize(torch.randn(130, 70), 128, 64)
    assert dequantize_weight(q, s, Fp8BlockFormat(block_n=128, block_k=64)).is_contiguous()
