"""RouterLinear: the torch backend (nn.Linear, or the float32 GEMM of the upcast operands with fp32=True, bit for
bit) and the Triton backend (``router_gate_triton``: float32 sums rounded once; on CPU under the interpreter
here, within float32 summation error of the twin); on a GPU (``gpu`` cases) the Triton gate's rows are the same
bits alone and inside batches of every tile shape (SPEC §9)."""

import pytest
import torch
import torch.nn.functional as F

from moekit.loading.modules import RouterLinear

# the Triton gate's cases run on the GPU where there is one (natively), else on CPU under the interpreter (round 55:
# on a GPU host they ran CPU tensors without the interpreter and failed)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _twin(x, gate, out_dtype, wide=torch.float32):
    b = None if gate.bias is None else gate.bias.to(wide)
    return F.linear(x.to(wide), gate.weight.to(wide), b).to(out_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_backend_is_the_fp32_gemm_of_the_upcast_operands(dtype, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)  # [B, S, H]: leading dims kept
    gate = RouterLinear(64, 16, bias=bias, fp32=True, dtype=dtype)
    out = gate(x)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 16) and not gate.batch_invariant
    assert torch.equal(out, _twin(x, gate, torch.float32))
    assert RouterLinear(64, 16, dtype=dtype)(x).dtype == dtype  # fp32=False keeps the weight dtype


# shapes: the empty batch, decode, a prime width, each tile shape of the launcher (T <= 16, <= 32, <= 64, above),
# H in chunks (> GATE_KS = 1024 columns: fp32 partials summed in chunk order; a last chunk of one column)
@pytest.mark.parametrize("t,h,n", [(0, 64, 8), (1, 97, 13), (5, 64, 8), (17, 130, 16), (33, 64, 40), (129, 200, 24),
                                   (1, 2500, 13), (3, 1025, 8), (70, 2100, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp32", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_gate_matches_its_twin(t, h, n, dtype, fp32, bias):
    g = torch.Generator().manual_seed(t * 7 + h)
    gate = RouterLinear(h, n, bias=bias, fp32=fp32, backend="triton", dtype=dtype, device=DEV)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(n, h, generator=g))
        if bias:
            gate.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(t, h, generator=g).to(DEV, dtype)
    out = gate(x)
    want = torch.float32 if fp32 else dtype
    assert out.dtype == want and out.shape == (t, n) and gate.batch_invariant
    if t:
        ref = _twin(x, gate, torch.float64, wide=torch.float64)
        # fp32 sums (H up to 2500: the GPU's order landed at 1.4e-6 on an H100, round 55; the GPU test's bound);
        # one bf16 rounding
        tol = (1e-6 if DEV == "cpu" else 2e-5) if want == torch.float32 else 2 ** -8
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.interpreter  # the CPU errors of the Triton gate (a GPU host runs it only with TRITON_INTERPRET=1)
def test_triton_gate_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        RouterLinear(8, 4, backend="cuda")
    gate = RouterLinear(8, 4, backend="triton")
    with pytest.raises(TypeError, match="dtype"):  # fp32=False keeps one dtype
        gate(torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="in_features=8"):
        gate(torch.randn(2, 9))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA device"):
        gate(torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fp32", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True),
                                        (torch.float32, True)])
def test_triton_gate_rows_are_batch_invariant(dtype, fp32):
    """DeepSeek-V3's gate (7168 -> 256): each row of batches of 1 .. 2048 tokens (every tile shape) equals the
    same row computed alone and inside the largest batch, bit for bit; within float32 summation error of the
    float64 product."""
    g = torch.Generator().manual_seed(0)
    h, e = 7168, 256
    gate = RouterLinear(h, e, fp32=fp32, backend="triton", device="cuda", dtype=dtype)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(e, h, generator=g) * h ** -0.5)
        big = torch.randn(2048, h, generator=g).to("cuda", dtype)
        full = gate(big)
        ref = F.linear(big.double(), gate.weight.double())
        tol = 2e-5 if fp32 or dtype == torch.float32 else 2 ** -8
        assert ((full.double() - ref).abs().max() / ref.abs().max()).item() < tol
        for t in (1, 2, 7, 16, 17, 32, 33, 64, 65, 129, 1031):
            for start in (0, 2048 - t):
                assert torch.equal(gate(big[start:start + t]), full[start:start + t]), (t, start)
        assert torch.equal(gate(big[5:6]), full[5:6])
        assert torch.equal(gate(big[:0]), full[:0])


def test_router_gate_opcheck():
    # the custom op torch.compile traces (fake tensor shapes, schema, aliasing)
    from moekit.ops import triton_gate

    x, w, b = torch.randn(3, 40, device=DEV), torch.randn(6, 40, device=DEV), torch.randn(6, device=DEV)
    torch.library.opcheck(triton_gate.router_gate_op, (x, w, b, torch.float32))
    torch.library.opcheck(triton_gate.router_gate_op, (x.bfloat16(), w.bfloat16(), None, torch.bfloat16))


def test_triton_gate_rows_in_blocks(monkeypatch):
    # huge batches run the chunked gate over row blocks (bounded partials): the same bits as one launch pair
    from moekit.ops import triton_gate

    g = torch.Generator().manual_seed(5)
    x, w, b = (t.to(DEV) for t in (torch.randn(37, 1100, generator=g), torch.randn(9, 1100, generator=g),
                                   torch.randn(9, generator=g)))
    whole = triton_gate.router_gate_triton(x, w, b, torch.float32)
    monkeypatch.setattr(triton_gate, "GATE_ROWS", 16)  # blocks of 16, 16, 5 rows
    assert torch.equal(triton_gate.router_gate_triton(x, w, b, torch.float32), whole)


# (round 59) the Triton gate has no backward of its own: its logits forward, the torch path's gradients for x, the
# weight and the bias (before: none at all, so a patched model's router did not train on a GPU and the hidden
# states lost the routing's share of their gradient). The empty batch, decode, a prime width, H in chunks.
@pytest.mark.parametrize("t,h,n", [(0, 64, 8), (1, 97, 13), (17, 130, 16), (3, 1025, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp32", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_gate_gradients_are_the_torch_paths(t, h, n, dtype, fp32, bias):
    g = torch.Generator().manual_seed(t + h)
    x = torch.randn(t, h, generator=g).to(dtype).to(DEV)
    gate = RouterLinear(h, n, bias=bias, fp32=fp32, backend="triton", dtype=dtype, device=DEV)
    twin = RouterLinear(h, n, bias=bias, fp32=fp32, backend="torch", dtype=dtype, device=DEV)
    twin.load_state_dict(gate.state_dict())
    dy = torch.randn(t, n, generator=g).to(DEV)
    grads = []
    for m in (gate, twin):
        xi = x.clone().requires_grad_()
        out = m(xi)
        if m is gate:
            with torch.no_grad():
                assert torch.equal(out, gate(x))  # the forward's bits are the kernel's, with or without autograd
        (out.float() * dy).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a is not None and torch.equal(a, b)
    # a frozen gate (only x requires grad) and x frozen (only the weight): each gets its own gradient
    gate.requires_grad_(False)
    xi = x.clone().requires_grad_()
    (gate(xi).float() * dy).sum().backward()
    assert torch.equal(xi.grad, grads[1][0])
