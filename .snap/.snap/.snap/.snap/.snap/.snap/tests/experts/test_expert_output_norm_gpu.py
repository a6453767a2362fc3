"""An expert output norm (Ergo's per-expert RMSNorm, Muse Spark's one norm) on a GPU, Triton backend: the
layer's internal CUDA graph gives the plain eager call's bits, rows alone equal the same rows inside a batch
(SPEC §9), and the torch twin agrees within bf16 / fp8 tolerance (bf16 and fp8 block experts)."""

import pytest
import torch

import moekit
from moekit.loading.blocks import ExpertRMSNorm, RMSNorm

pytestmark = pytest.mark.gpu
DT = torch.bfloat16
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
E, K, H, I = 32, 4, 512, 256


def _layers(norm_kind, quant, backends=("triton", "triton", "torch"), wrap=None):
    """Layers on the same weights and norm (``wrap(norm)`` if given): graphed Triton, plain Triton, torch twin."""
    torch.manual_seed(0)
    if norm_kind == "per_expert":
        norm = ExpertRMSNorm(E, H, 1e-6, device="cuda")
    else:
        norm = RMSNorm(H, 1e-6, device="cuda")
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
    norm = wrap(norm) if wrap is not None else norm
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=DT) * H**-0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=DT) * I**-0.5
    bias = torch.rand(E, device="cuda") * 0.1
    out = []
    for backend, graphs in zip(backends, (64, 0, 0)):
        layer = moekit.FusedMoE(E, K, H, I, params_dtype=DT, device="cuda", backend=backend, scoring_func="sigmoid",
                                e_score_correction_bias=bias, routed_scaling_factor=2.5, expert_output_norm=norm,
                                eager_graph_tokens=graphs, quant_config=quant)
        if quant is None:
            layer.load_expert_weights(w13, w2)
        else:
            w13q, w2q, s13, s2 = moekit.quantize_experts(w13, w2, quant)
            layer.load_expert_weights(w13q, w2q, w13_scale=s13, w2_scale=s2)
        out.append(layer)
    return out


def _inputs(t, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(t, H, device="cuda", dtype=DT, generator=g), torch.randn(t, E, device="cuda", generator=g)


@pytest.mark.parametrize("quant", [None, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("norm_kind", ["per_expert", "one_norm"])
def test_graphs_batches_and_twin(norm_kind, quant):
    graphed, plain, twin = _layers(norm_kind, quant)
    tol = 2e-2 if quant is None else 8e-2  # relative RMS against the torch twin
    with torch.no_grad():
        for t in (1, 5, 37, 64, 300):
            x, logits = _inputs(t, seed=t)
            a, b, ref = graphed(x, logits), plain(x, logits), twin(x, logits)
            assert torch.equal(a, b), f"T={t}: the internal CUDA graph changed bits"
            err = ((b.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < tol, f"T={t}: relative RMS {err:.3g} against the torch twin"
            if t > 1:  # rows alone vs inside the batch
                for row in (0, t // 2, t - 1):
                    alone = plain(x[row:row + 1], logits[row:row + 1])
                    assert torch.equal(alone[0], b[row]), f"T={t}: row {row} alone differs from in the batch"


def test_a_replaced_norm_weight_reaches_the_graphs():
    # the internal graphs watch the norm: a new weight Parameter (another address) is captured again, an
    # in-place edit is read by address; both calls then equal the plain layer's
    graphed, plain, _ = _layers("per_expert", None)
    x, logits = _inputs(5, seed=11)
    with torch.no_grad():
        graphed(x, logits)  # captured
        norm = graphed.routed_experts.expert_output_norm
        norm.weight = torch.nn.Parameter(torch.rand_like(norm.weight) + 0.5, requires_grad=False)  # (shared)
        assert torch.equal(graphed(x, logits), plain(x, logits))
        norm.weight.mul_(1.5)
        assert torch.equal(graphed(x, logits), plain(x, logits))


def test_a_user_norm_runs_eagerly_and_right():
    # a norm class that does not declare _moekit_graph_safe is never captured: the layer runs eagerly, and
    # equals the same norm as moekit's graph-safe module
    class UserNorm(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, rows):
            return self.inner(rows)

    user = _layers("one_norm", None, backends=("triton",), wrap=UserNorm)[0]  # asks for graphs: 64 tokens
    _, plain, _ = _layers("one_norm", None)
    x, logits = _inputs(6, seed=12)
    with torch.no_grad():
        assert torch.equal(user(x, logits), plain(x, logits))
    assert user._graphs is None and plain._graphs is None  # (plain: eager_graph_tokens=0)
