"""RouterLinear's float32 gate (``linear_fp32``): the float32 GEMM of the upcast operands on CPU (bit for bit), and
on CUDA for bf16 / fp16 operands one tensor-core GEMM with a float32 output, within float32 summation error of
it (``gpu`` cases)."""

import pytest
import torch
import torch.nn.functional as F

from moekit.loading.modules import RouterLinear, linear_fp32


def _ref(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_is_the_fp32_gemm_of_the_upcast_operands(dtype, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)  # [B, S, H]: leading dims kept
    gate = RouterLinear(64, 16, bias=bias, fp32=True, dtype=dtype)
    out = gate(x)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 16)
    b = None if gate.bias is None else gate.bias.float()
    assert torch.equal(out, F.linear(x.float(), gate.weight.float(), b))
    # fp32=False keeps the weight dtype
    assert RouterLinear(64, 16, dtype=dtype)(x).dtype == dtype


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [0, 1, 7, 64, 1031])  # the empty batch, decode, a prime above a tile
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_half_operands_sum_in_fp32(dtype, tokens, bias):
    g = torch.Generator().manual_seed(tokens)
    h, e = 7168, 256  # DeepSeek-V3's gate
    x = torch.randn(tokens, h, generator=g).to("cuda", dtype)
    w = (torch.randn(e, h, generator=g) * h ** -0.5).to("cuda", dtype)
    b = (torch.randn(e, generator=g) * 0.1).to("cuda", dtype) if bias else None
    out = linear_fp32(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (tokens, e)
    if tokens:
        ref = _ref(x, w, b)
        # float32 sums of 7168 exact products: a few ulp of the largest partial sums
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5
        assert torch.equal(linear_fp32(x, w, b), out)  # deterministic
    # autograd wanted: the upcast float32 GEMM (mm with out_dtype is not differentiated here)
    wg = w.clone().requires_grad_(True)
    slow = linear_fp32(x, wg, b)
    assert slow.requires_grad and torch.equal(slow.detach(), F.linear(x.float(), w.float(),
                                                                      None if b is None else b.float()))
    # mixed dtypes (a float32 weight, as some checkpoints store the gate): the upcast GEMM
    assert torch.equal(linear_fp32(x, w.float(), b), F.linear(x.float(), w.float(), None if b is None else b.float()))
