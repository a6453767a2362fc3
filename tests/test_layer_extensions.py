"""The issue-#13 extensions of the layer contract, against hand-written formulas (torch backend; the
Triton backend where it supports them): gate_input="block", final_output_transform, routed_shared_experts,
expert_output_norm."""

import pytest
import torch
import torch.nn.functional as F

import moekit

H, HL, I, E, K, T = 16, 12, 8, 6, 2, 9
# the Triton backend's cases build CPU layers: the interpreter (a GPU host runs them only with TRITON_INTERPRET=1)
TRITON_CPU = pytest.param("triton", marks=pytest.mark.interpreter)


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


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
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


def _rms(o):
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Norm(torch.nn.Module):
    """Muse Spark: one norm for every expert's output rows."""

    def forward(self, o):
        return _rms(o.float()).to(o.dtype)


class _PerExpertNorm(torch.nn.Module):
    """Ergo: a norm weight per (logical) expert."""

    per_expert = True

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(E, H, generator=torch.Generator().manual_seed(7)) + 0.5)

    def forward(self, o, ids):
        return (_rms(o.float()) * self.weight[ids]).to(o.dtype)


@pytest.mark.parametrize("per_expert", [False, True], ids=["one_norm", "per_expert"])
@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_expert_output_norm_before_the_routing_weight(backend, per_expert):
    # each expert's output rows are normalised before the routing weight, on every backend (Triton: the
    # interpreter on CPU), against the per-token formula in float64; T = 9 tokens, K = 2 of E = 6
    norm = _PerExpertNorm() if per_expert else _Norm()
    layer = moekit.FusedMoE(E, K, H, I, expert_output_norm=norm, backend=backend)
    w13, w2 = _weights(E, H, I)
    layer.load_expert_weights(w13, w2)
    h, logits = torch.randn(T, H), torch.randn(T, E)
    ref = torch.zeros(T, H, dtype=torch.float64)
    s = torch.softmax(logits, -1)
    for t in range(T):
        w, ids = torch.topk(s[t], K)
        for wj, e in zip(w / w.sum(), ids):
            o = _rms(_expert(w13, w2, int(e), h[t]).double())
            ref[t] += float(wj) * (o * norm.weight[int(e)].double() if per_expert else o)
    with torch.no_grad():
        torch.testing.assert_close(layer(h, logits).double(), ref, atol=1e-5, rtol=1e-5)
        assert layer(h[:0], logits[:0]).shape == (0, H)  # the empty batch


def test_expert_output_norm_on_quantised_experts():
    # fp8 block experts (torch twin): the layer equals each slot's own expert row (the experts called
    # for that slot alone, weight 1), normed per expert, weighted and summed in float32
    w13, w2 = _weights(E, 128, I, seed=5)
    norm = _PerExpertNorm()
    norm.weight = torch.nn.Parameter(torch.rand(E, 128) + 0.5)
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    layer = moekit.FusedMoE(E, K, 128, I, expert_output_norm=norm, backend="torch", params_dtype=torch.bfloat16,
                            quant_config=fp8)
    w13q, w2q, s13, s2 = moekit.quantize_experts(w13, w2, fp8)
    layer.load_expert_weights(w13q, w2q, w13_scale=s13, w2_scale=s2)
    h, logits = torch.randn(T, 128, dtype=torch.bfloat16), torch.randn(T, E)
    with torch.no_grad():
        out = layer(h, logits)
        weights, ids = layer.router.select_experts(h, logits)
        experts = layer.routed_experts
        ref = torch.zeros(T, 128)
        for t in range(T):
            for k in range(K):
                row = experts._experts(h[t:t + 1], torch.ones(1, 1), ids[t:t + 1, k:k + 1])
                ref[t] += float(weights[t, k]) * norm(row, ids[t:t + 1, k].long())[0].float()
    torch.testing.assert_close(out, ref.to(torch.bfloat16), atol=0, rtol=0)
    # and the float64 per-token formula on the dequantised weights: the e4m3 activations (not modelled here)
    # leave ~6e-2 at these widths; a wrong norm, expert or weight would leave O(1)
    d13, d2 = moekit.dequantize_experts(w13q, w2q, s13, s2, fp8)
    exact = torch.zeros(T, 128, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            o = _rms(_expert(d13.double(), d2.double(), e, h[t].double()))
            exact[t] += float(weights[t, k]) * o * norm.weight[e].double()
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.1


def test_expert_output_norm_skips_weight_zero_slots_and_chunks(monkeypatch):
    # a slot of weight exactly 0 adds 0 even when its expert's row is not finite (masked zero experts,
    # padding), and chunks of the slot rows give the same values (up to the torch GEMMs' blocking)
    from moekit.experts import output_norm

    norm = _PerExpertNorm()
    layer = moekit.FusedMoE(E, K, H, I, expert_output_norm=norm, backend="torch")
    w13, w2 = _weights(E, H, I, seed=6)
    w13[0] = float("inf")  # expert 0's rows are inf / nan
    layer.load_expert_weights(w13, w2)
    h = torch.randn(T, H)
    ids = torch.tensor([[1, 0]] * T, dtype=torch.int32)
    w = torch.tensor([[1.0, 0.0]] * T)
    experts = layer.routed_experts
    with torch.no_grad():
        out = experts(h, w, ids)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, experts(h, w[:, :1], ids[:, :1]), atol=0, rtol=0)
        monkeypatch.setattr(output_norm, "NORM_WORKSPACE_BYTES", 1)  # one token per chunk
        torch.testing.assert_close(experts(h, w, ids), out, atol=1e-6, rtol=1e-6)


def test_expert_output_norm_refuses_tensor_parallelism():
    from moekit.experts.placement import ExpertPlacement
    from moekit.experts.routed import RoutedExperts

    layer = moekit.FusedMoE(E, K, H, I, backend="torch")
    tp = ExpertPlacement.build(E, tp_size=2, tp_rank=1)
    with pytest.raises(NotImplementedError, match="expert_output_norm with tensor parallelism"):
        RoutedExperts("l", torch.float32, layer.moe_config, placement=tp, expert_output_norm=_Norm())


@pytest.mark.interpreter
def test_graphs_hold_only_graph_safe_norms():
    # the layer's internal CUDA graphs capture an expert output norm only when its class declares
    # _moekit_graph_safe (moekit's RMSNorm / ExpertRMSNorm), watch it, and see its parameters' grad
    from moekit.experts.graphed_plan import graph_plan
    from moekit.loading.blocks import ExpertRMSNorm
    from moekit.runner_graphs import graph_safe as _graph_safe

    safe = ExpertRMSNorm(E, H)
    for norm, ok in ((_Norm(), False), (_PerExpertNorm(), False), (safe, True)):
        layer = moekit.FusedMoE(E, K, H, I, backend="triton", expert_output_norm=norm)  # the interpreter on CPU
        assert _graph_safe(layer.router, layer.routed_experts, layer.expert_executor) is ok
    plan = graph_plan(layer)
    assert safe in plan.inner and safe in plan.watched
    h = torch.randn(2, H)
    assert plan.wants_grad(h, None)  # the norm's weight requires grad
    safe.weight.requires_grad_(False)
    assert not plan.wants_grad(h, None)


def test_per_expert_norm_follows_eplb_moves():
    # after an EPLB move physical slot j holds logical expert perm[j]: the per-expert norm must use the
    # logical expert's weight, so slots routed by physical id equal the unmoved layer routed by logical id
    perm = [3, 0, 5, 1, 4, 2]
    w13, w2 = _weights(E, H, I, seed=2)
    norm = _PerExpertNorm()
    a = moekit.FusedMoE(E, K, H, I, expert_output_norm=norm, backend="torch")
    b = moekit.FusedMoE(E, K, H, I, expert_output_norm=norm, backend="torch")
    a.load_expert_weights(w13, w2)
    b.load_expert_weights(w13[perm], w2[perm])
    b.routed_experts.set_physical_to_logical(perm)
    h = torch.randn(T, H)
    logical = torch.randint(0, E, (T, K), generator=torch.Generator().manual_seed(4)).int()
    physical = torch.tensor([perm.index(e) for e in range(E)])[logical.long()].int()
    w = torch.rand(T, K)
    with torch.no_grad():
        torch.testing.assert_close(b.routed_experts(h, w, physical), a.routed_experts(h, w, logical), atol=0, rtol=0)


def test_expert_output_norm_refuses_weights_on_the_input():
    with pytest.raises(ValueError, match="expert_output_norm cannot be combined with apply_router_weight_on_input"):
        moekit.FusedMoE(E, 1, H, I, expert_output_norm=_Norm(), apply_router_weight_on_input=True)


@pytest.mark.interpreter  # its Triton layers are CPU ones
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


@pytest.mark.parametrize("gate_input", ["routed", "block"])
def test_compute_router_logits(gate_input):
    # (round 59) MoERunner.compute_router_logits: the logits a forward routes with (the gate reads the transformed
    # input, or the block input with gate_input="block"), cast to router_logits_dtype, differentiable; passed back,
    # the forward is the same bits; a layer without a gate says so
    down = torch.nn.Linear(H, HL, bias=False)
    gate = torch.nn.Linear(HL if gate_input == "routed" else H, E, bias=False)
    layer = moekit.FusedMoE(E, K, HL, I, gate=gate, routed_input_transform=down,
                            routed_output_transform=torch.nn.Linear(HL, H, bias=False), gate_input=gate_input,
                            router_logits_dtype=torch.float64, backend="torch")
    layer.load_expert_weights(*_weights(E, HL, I))
    h = torch.randn(2, 5, H)  # [B, S, H]: leading dims flattened
    logits = layer.compute_router_logits(h)
    want = gate(down(h) if gate_input == "routed" else h).reshape(10, E).double()
    assert logits.shape == (10, E) and logits.dtype == torch.float64
    torch.testing.assert_close(logits, want)
    with torch.no_grad():
        assert torch.equal(layer(h, logits), layer(h))
    logits.sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    plain = moekit.FusedMoE(E, K, H, I, backend="torch")
    with pytest.raises(ValueError, match="no gate"):
        plain.compute_router_logits(torch.randn(3, H))
