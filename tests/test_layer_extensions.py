"""The issue-#13 extensions of the layer contract, against hand-written formulas (torch backend; the
Triton backend where it supports them): gate_input="block", final_output_transform, routed_shared_experts,
expert_output_norm."""

import pytest
import torch
import torch.nn.functional as F

import moekit

H, HL, I, E, K, T = 16, 12, 8, 6, 2, 9


def _weights(e, h, i, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5


def _expert(w13, w2, e, x):
    gu = w13[e] @ x
    return w2[e] @ (F.silu(gu[: w13.shape[1] // 2]) * gu[w13.shape[1] // 2:])


def test_gate_reads_block_input():
    # Muse Spark / Gemma 4 / Nemotron-H latent: logits = gate(h), the experts run on x = transform(h)
    down = torch.nn.Linear(H, HL, bias=False)
    up = torch.nn.Linear(HL, H, bias=False)
    gate = torch.nn.Linear(H, E, bias=False)
    layer = moekit.FusedMoE(E, K, HL, I, gate=gate, routed_input_transform=down, routed_output_transform=up,
                            gate_input="block", backend="torch")
    w13, w2 = _weights(E, HL, I)
    layer.load_expert_weights(w13, w2)
    h = torch.randn(T, H)
    with torch.no_grad():
        out = layer(h)
        x, s = down(h), torch.softmax(gate(h), -1)
        ref = torch.zeros(T, HL)
        for t in range(T):
            w, ids = torch.topk(s[t], K)
            for wj, e in zip(w / w.sum(), ids):
                ref[t] += wj * _expert(w13, w2, int(e), x[t])
        torch.testing.assert_close(out, up(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gate_input"):
        moekit.FusedMoE(E, K, H, I, gate=gate, gate_input="residual")


def test_final_output_transform_after_the_shared_sum():
    # A.X-K1: out = norm(routed + shared)
    shared = torch.nn.Linear(H, H, bias=False)
    final = torch.nn.LayerNorm(H)
    layer = moekit.FusedMoE(E, K, H, I, shared_experts=shared, final_output_transform=final, backend="torch")
    plain = moekit.FusedMoE(E, K, H, I, backend="torch")
    w13, w2 = _weights(E, H, I)
    for lay in (layer, plain):
        lay.load_expert_weights(w13, w2)
    h, logits = torch.randn(T, H), torch.randn(T, E)
    with torch.no_grad():
        torch.testing.assert_close(layer(h, logits), final(plain(h, logits) + shared(h)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_routed_shared_experts_jointly_normalised(backend):
    # Inkling: S shared experts with their own logits, always selected; w = σ(l) / (Σ_topk σ + Σ_shared σ) · scale
    s_n, scale = 2, 3.0
    bias = torch.rand(E - s_n) * 0.3
    layer = moekit.FusedMoE(E, K, H, I, scoring_func="sigmoid", e_score_correction_bias=bias, routed_scaling_factor=scale,
                            routed_shared_experts=s_n, backend=backend)
    w13, w2 = _weights(E, H, I)
    layer.load_expert_weights(w13, w2)
    h, logits = torch.randn(T, H), torch.randn(T, E) * 2
    weights, ids = layer.router.select_experts(h, logits)
    assert ids.shape == (T, K + s_n)
    out = layer(h, logits)
    ref = torch.zeros(T, H)
    for t in range(T):
        sig = torch.sigmoid(logits[t])
        picks = torch.topk(sig[: E - s_n] + bias, K).indices.tolist() + list(range(E - s_n, E))
        assert sorted(ids[t].tolist()) == sorted(picks)
        denom = sig[picks].sum()
        for e in picks:
            ref[t] += sig[e] / denom * scale * _expert(w13, w2, e, h[t])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="routed_shared_experts"):
        moekit.FusedMoE(E, K, H, I, e_score_correction_bias=torch.zeros(E), routed_shared_experts=s_n)
    with pytest.raises(ValueError, match="routed_shared_experts"):
        moekit.FusedMoE(E, K, H, I, use_grouped_topk=True, num_expert_group=2, topk_group=1, routed_shared_experts=1)


def test_expert_output_norm_before_the_routing_weight():
    # Muse Spark: each expert's output is normalised (a module on [N, H] rows) before the routing weight
    def norm(o):
        return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)

    class Norm(torch.nn.Module):
        def forward(self, o):
            return norm(o)

    layer = moekit.FusedMoE(E, K, H, I, expert_output_norm=Norm(), backend="torch")
    w13, w2 = _weights(E, H, I)
    layer.load_expert_weights(w13, w2)
    h, logits = torch.randn(T, H), torch.randn(T, E)
    ref = torch.zeros(T, H)
    s = torch.softmax(logits, -1)
    for t in range(T):
        w, ids = torch.topk(s[t], K)
        for wj, e in zip(w / w.sum(), ids):
            ref[t] += wj * norm(_expert(w13, w2, int(e), h[t]))
    torch.testing.assert_close(layer(h, logits), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="expert_output_norm.*triton"):
        moekit.FusedMoE(E, K, H, I, expert_output_norm=Norm(), backend="triton")


@pytest.mark.parametrize("act,limit", [("silu_post_clamp", 0.4), ("softcap_swiglu", None)])
def test_new_activations_through_the_layer(act, limit):
    # the layer with each new activation, torch and Triton (interpreter on CPU) against the per-token formula
    from reference import ref_act

    w13, w2 = _weights(E, H, I, seed=3)
    h, logits = torch.randn(T, H) * 3, torch.randn(T, E)
    outs = []
    for backend in ("torch", "triton"):
        layer = moekit.FusedMoE(E, K, H, I, activation=act, swiglu_limit=limit, backend=backend)
        layer.load_expert_weights(w13, w2)
        outs.append(layer(h, logits))
    s = torch.softmax(logits, -1)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        w, ids = torch.topk(s[t], K)
        for wj, e in zip(w / w.sum(), ids):
            a = ref_act((w13[int(e)] @ h[t])[None], act, limit)[0]
            ref[t] += float(wj) * (w2[int(e)].double() @ a)
    for out in outs:
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
