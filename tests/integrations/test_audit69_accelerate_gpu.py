"""Round 69 on a GPU: a layer whose routed experts' forward is wrapped on the instance (accelerate's offloading hooks
do that, as does a user's wrapper) keeps its internal CUDA graphs off (a replay would skip the wrapper: accelerate's
hook would not bring the offloaded weights, and the graph would read freed memory), and runs under
``accelerate.cpu_offload`` with the GPU as execution device equal to the same layer not offloaded."""

import pytest
import torch

import moekit

pytestmark = pytest.mark.gpu
E, K, H, I = 8, 2, 256, 128


def _layer():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, device="cuda", backend="triton",
                            gate=torch.nn.Linear(H, E, bias=False, device="cuda", dtype=torch.bfloat16))
    layer.load_expert_weights((torch.randn(E, 2 * I, H, generator=g) / 16).bfloat16(),
                              (torch.randn(E, H, I, generator=g) / 16).bfloat16())
    return layer


def test_wrapped_experts_forward_runs_every_call():
    # eager calls of T = 1..4 are graph-eligible: with the experts' forward wrapped on the instance, every call must
    # run the wrapper (a captured graph replays without it)
    layer = _layer()
    x = torch.randn(4, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = [layer(x[:t]).clone() for t in (1, 2, 4)]
    inner, calls = layer.routed_experts.forward, []

    def wrapped(*a, **kw):
        calls.append(1)
        return inner(*a, **kw)

    layer.routed_experts.forward = wrapped
    with torch.no_grad():
        for _ in range(3):
            for t, r in zip((1, 2, 4), ref):
                assert torch.equal(layer(x[:t]), r)
    assert len(calls) == 9


def test_cpu_offload_to_the_gpu():
    # the weights live on the CPU (meta on the module) and the hook brings them to the GPU for each call
    accelerate = pytest.importorskip("accelerate")
    layer = _layer()
    x = torch.randn(3, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x).clone()
    accelerate.cpu_offload(layer.routed_experts, execution_device=torch.device("cuda"))
    assert layer.routed_experts.w13_weight.is_meta
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(layer(x), ref)
