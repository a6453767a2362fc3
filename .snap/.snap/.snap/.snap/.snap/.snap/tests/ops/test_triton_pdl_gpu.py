"""Programmatic dependent launch (config key ``"pdl"``): the same tiles with and without PDL give
bit-identical outputs, also inside a CUDA graph. GPU only (PDL needs compiled kernels on sm_90+)."""

import pytest
import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts as te  # noqa: E402
from moekit.ops.experts import fused_experts_torch  # noqa: E402


def _pdl_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not _pdl_capable(), reason="PDL needs sm_90+")
@pytest.mark.parametrize("tokens", [1, 2])  # the decode (inline) path where PDL is shipped on
def test_pdl_matches_no_pdl_bitwise(tokens, monkeypatch):
    # Qwen3-30B-A3B shape, bf16
    e, k, h, inter = 128, 8, 2048, 768
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, h, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(e, 2 * inter, h, device="cuda", generator=g) * h**-0.5).bfloat16()
    w2 = (torch.randn(e, h, inter, device="cuda", generator=g) * inter**-0.5).bfloat16()
    ids = torch.stack([torch.randperm(e, device="cuda", generator=g)[:k] for _ in range(tokens)]).int()
    w = torch.rand(tokens, k, device="cuda", generator=g)
    base = te.get_config(x.device, tokens, e, h, inter, k, x.dtype, True)

    def run(pdl: bool) -> torch.Tensor:
        monkeypatch.setattr(te, "get_config", lambda *a, **kw: dict(base, pdl=pdl))
        return te.fused_experts_triton(x, w1, w2, w, ids)

    with_pdl, without = run(True), run(False)
    assert torch.equal(with_pdl, without)
    # and inside a CUDA graph
    monkeypatch.setattr(te, "get_config", lambda *a, **kw: dict(base, pdl=True))
    out = torch.empty_like(with_pdl)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(te.fused_experts_triton(x, w1, w2, w, ids))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(te.fused_experts_triton(x, w1, w2, w, ids))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, without)
    # and right: against the float64 torch twin
    ref = fused_experts_torch(x.double(), w1.double(), w2.double(), w, ids)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-2
