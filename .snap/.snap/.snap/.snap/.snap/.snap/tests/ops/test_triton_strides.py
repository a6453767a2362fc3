"""Non-contiguous inputs reach the Triton kernels as contiguous tensors (the kernels assume unit
last-dim strides): transposed views give the same answer as their contiguous copies.

Runs under the Triton interpreter on CPU (``TRITON_INTERPRET=1``), natively on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

import moekit
from moekit.ops.api import fused_experts, route
from moekit.ops.routing import TopKSpec

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_route_transposed_logits():
    # logits as a transposed view ([T, E] with stride(1) = T): ids must stay in [0, E) and match torch
    t, e = 5, 8
    logits = torch.randn(e, t, device=DEV).t()
    assert not logits.is_contiguous()
    spec = TopKSpec(2, "softmax", True)
    w_tri, ids_tri = route(logits, spec, None, None, "triton")
    w_ref, ids_ref = route(logits.contiguous(), spec, None, None, "torch")
    assert torch.equal(ids_tri.cpu(), ids_ref.cpu())
    torch.testing.assert_close(w_tri.cpu(), w_ref.cpu(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("which", ["x", "w1", "w2", "ids", "weights"])
def test_fused_experts_transposed_views(which):
    # each input in turn as a non-contiguous view of the same values
    t, h, inter, e, k = 7, 16, 8, 4, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, h, generator=g)
    w1 = torch.randn(e, 2 * inter, h, generator=g) * h**-0.5
    w2 = torch.randn(e, h, inter, generator=g) * inter**-0.5
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    w = torch.rand(t, k, generator=g)
    args = {"x": x, "w1": w1, "w2": w2, "ids": ids, "weights": w}
    args = {n: v.to(DEV) for n, v in args.items()}
    ref = fused_experts(args["x"], args["w1"], args["w2"], args["weights"], args["ids"], backend="triton")
    v = args[which]
    # same values, transposed storage
    args[which] = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not args[which].is_contiguous()
    out = fused_experts(args["x"], args["w1"], args["w2"], args["weights"], args["ids"], backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_layer_transposed_inputs():
    # the whole layer on the Triton backend with transposed hidden_states and router_logits
    layer = moekit.FusedMoE(4, 2, 16, 8, backend="triton", device=DEV)
    layer.load_expert_weights(torch.randn(4, 16, 16, device=DEV) * 0.2, torch.randn(4, 16, 8, device=DEV) * 0.2)
    x, lg = torch.randn(16, 7, device=DEV).t(), torch.randn(4, 7, device=DEV).t()
    torch.testing.assert_close(layer(x, lg), layer(x.contiguous(), lg.contiguous()), atol=1e-5, rtol=1e-5)
