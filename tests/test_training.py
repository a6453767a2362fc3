"""Autograd through moekit layers (round 58): gradients of the input, the router logits (so the gate), the expert
weights and biases, against float64 per-token loops written here with torch autograd; the forward's bits unchanged.

Each reference below recomputes the layer in float64 from the same tensors: routing ids from ``reference.ref_route``
(tie-free inputs: the margin is asserted), weights as ``finish(scores(logits)[ids])`` in differentiable float64 ops,
experts by ``reference.ref_act`` per token and slot.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import ref_act, ref_route

import moekit
from moekit.integrations.transformers import patch

E, K, H, I = 6, 2, 16, 12


def _scores64(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    x = logits.double()
    if scoring == "softmax":
        return torch.softmax(x, -1)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    return torch.nn.functional.softplus(x).sqrt()


def _weights64(logits, ids, scoring, renormalize, scale):
    w = _scores64(logits, scoring).gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scale


def _experts64(x, w, ids, w13, w2, b13, b2, activation, limit=None, on_input=False, num_real=None):
    """Σ_j w[t, j] · expert_{ids[t, j]}(x[t]) in float64 (ids >= num_real: identity experts, w · x)."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if num_real is not None and e >= num_real:
                acc = acc + w[t, j] * x[t]
                continue
            xin = w[t, j] * x[t] if on_input else x[t]
            h = w13[e] @ xin + (b13[e] if b13 is not None else 0)
            o = w2[e] @ ref_act(h, activation, limit) + (b2[e] if b2 is not None else 0)
            acc = acc + (o if on_input else w[t, j] * o)
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def _leaf(t):
    return t.detach().double().requires_grad_()


def _expert_tensors(layer, bias: bool, gated: bool = True):
    rows = 2 * I if gated else I
    w13, w2 = torch.randn(E, rows, H) * 0.3, torch.randn(E, H, I) * 0.3
    b13, b2 = (torch.randn(E, rows) * 0.1, torch.randn(E, H) * 0.1) if bias else (None, None)
    layer.load_expert_weights(w13, w2, b13, b2)
    return w13, w2, b13, b2


def _close(got, want, what, rel=2e-5):
    assert got is not None, f"{what}: no gradient"
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want).abs().max().item()
    assert err <= rel * scale + 1e-7, f"{what}: max |got - float64| = {err:.3g}, max |float64| = {scale:.3g}"


def _rms_close(got, want, what, bound=1e-2):
    """bf16 (SPEC §4): relative RMS error <= 1e-2 against the float64 gradient."""
    assert got is not None, f"{what}: no gradient"
    rms = ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    assert rms <= bound, f"{what}: relative RMS {rms:.3g} (bound {bound})"


# (name, FusedMoE keywords, reference routing settings, activation, biases)
CASES = {
    # Mixtral / Qwen3: softmax top-k renormalised
    "softmax": (dict(renormalize=True), dict(scoring="softmax", renormalize=True, scale=1.0), "silu", False),
    # DeepSeek-V3: grouped sigmoid top-k with a selection bias (picks, gets no gradient), scaled weights
    "deepseek": (dict(use_grouped_topk=True, num_expert_group=3, topk_group=2, scoring_func="sigmoid",
                      renormalize=True, routed_scaling_factor=2.5, e_score_correction_bias=torch.linspace(0, .3, E)),
                 dict(scoring="sigmoid", renormalize=True, scale=2.5, groups=(3, 2)), "silu", False),
    # gpt-oss: clamped swiglu with both biases
    "swigluoai": (dict(renormalize=True, activation="swigluoai", swiglu_limit=1.5),
                  dict(scoring="softmax", renormalize=True, scale=1.0), "swigluoai", True),
    # DeepSeek-V4-style sqrtsoftplus scores, not renormalised, exact gelu
    "sqrtsoftplus": (dict(scoring_func="sqrtsoftplus", renormalize=False, activation="gelu"),
                     dict(scoring="sqrtsoftplus", renormalize=False, scale=1.0), "gelu", False),
    # Nemotron-H: non-gated relu², sigmoid, K = E (every expert)
    "relu2_k_eq_e": (dict(scoring_func="sigmoid", renormalize=False, activation="relu2"),
                     dict(scoring="sigmoid", renormalize=False, scale=1.0, top_k=E), "relu2", True),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tokens", [1, 7])
def test_layer_gradients_match_float64_loop(backend, case, tokens):
    kw, route, activation, bias = CASES[case]
    k = route.get("top_k", K)
    layer = moekit.FusedMoE(E, k, H, I, params_dtype=torch.float32, has_bias=bias, backend=backend, **kw)
    w13, w2, b13, b2 = _expert_tensors(layer, bias, gated=activation != "relu2")
    params = [p for p in layer.routed_experts.parameters()]
    for p in params:
        p.requires_grad_(True)
    layer.train()
    x = torch.randn(tokens, H, requires_grad=True)
    logits = (torch.randn(tokens, E) * 2).requires_grad_()
    y = layer(x, logits)
    dy = torch.randn_like(y)
    y.backward(dy)

    groups = route.get("groups", (1, 1))
    bias_sel = kw.get("e_score_correction_bias")
    _, ids, margin = ref_route(logits.detach(), k, scoring_func=route["scoring"], renormalize=route["renormalize"],
                               bias=bias_sel, num_expert_group=groups[0], topk_group=groups[1],
                               routed_scaling_factor=route["scale"])
    assert margin > 1e-4  # tie-free: float32 and float64 pick the same ids
    x64, lg64 = _leaf(x), _leaf(logits)
    t13, t2 = _leaf(w13), _leaf(w2)
    tb13, tb2 = (_leaf(b13), _leaf(b2)) if bias else (None, None)
    w64 = _weights64(lg64, ids, route["scoring"], route["renormalize"], route["scale"])
    ref = _experts64(x64, w64, ids, t13, t2, tb13, tb2, activation, kw.get("swiglu_limit"))
    _close(y.detach(), ref.detach(), "output", rel=1e-5)
    ref.backward(dy.double())
    re = layer.routed_experts
    _close(x.grad, x64.grad, "d hidden_states")
    _close(logits.grad, lg64.grad, "d router_logits")
    _close(re.w13_weight.grad, t13.grad, "d w13")
    _close(re.w2_weight.grad, t2.grad, "d w2")
    if bias:
        _close(re.w13_bias.grad, tb13.grad, "d w13_bias")
        _close(re.w2_bias.grad, tb2.grad, "d w2_bias")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_gate_shared_experts_and_zero_experts_get_gradients(backend):
    # LongCat-Flash: Z = 2 identity experts (their weight reaches d logits and d x), the routed scale on the output,
    # the gate computing the logits, and a sigmoid-gated shared expert (plain torch modules: autograd as usual)
    z = 2
    gate = torch.nn.Linear(H, E + z, bias=False)
    with torch.no_grad():
        gate.weight.mul_(4)  # spread logits: tie-free routing
    shared, shared_gate = torch.nn.Linear(H, H), torch.nn.Linear(H, 1)
    bias_sel = torch.linspace(0, 0.2, E + z)
    layer = moekit.FusedMoE(E, 3, H, I, params_dtype=torch.float32, backend=backend, zero_expert_type="identity",
                            renormalize=False,
                            e_score_correction_bias=bias_sel, routed_scaling_factor=1.5,
                            apply_routed_scale_to_output=True, gate=gate, shared_experts=shared,
                            shared_expert_gate=shared_gate)
    w13, w2, _, _ = _expert_tensors(layer, False)
    x = torch.randn(9, H, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    logits = gate(x.detach())
    _, ids, margin = ref_route(logits.detach(), 3, scoring_func="softmax", bias=bias_sel)
    assert margin > 1e-4 and bool((ids >= E).any())  # some slots went to zero experts
    x64 = _leaf(x)
    g64, s64, sg64 = (copy.deepcopy(m).double() for m in (gate, shared, shared_gate))
    w64 = _weights64(g64(x64), ids, "softmax", False, 1.0)
    routed = _experts64(x64, w64, ids, w13.double(), w2.double(), None, None, "silu", num_real=E) * 1.5
    ref = routed + torch.sigmoid(sg64(x64)) * s64(x64)
    _close(y.detach(), ref.detach(), "output", rel=1e-5)
    ref.backward(dy.double())
    _close(x.grad, x64.grad, "d hidden_states")
    _close(gate.weight.grad, g64.weight.grad, "d gate.weight")
    _close(shared.weight.grad, s64.weight.grad, "d shared_experts.weight")
    _close(shared_gate.weight.grad, sg64.weight.grad, "d shared_expert_gate.weight")
    assert layer.routed_experts.w13_weight.grad is None  # frozen by default (requires_grad=False)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_weight_on_input_and_hash_routing(backend):
    # Llama 4: a custom routing function (torch ops: its weights carry their own gradient), the weight on the input
    from reference import llama4_routing_function

    layer = moekit.FusedMoE(E, 1, H, I, params_dtype=torch.float32, backend=backend,
                            custom_routing_function=llama4_routing_function, apply_router_weight_on_input=True)
    w13, w2, _, _ = _expert_tensors(layer, False)
    x, logits = torch.randn(5, H, requires_grad=True), (torch.randn(5, E) * 2).requires_grad_()
    y = layer(x, logits)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, lg64 = _leaf(x), _leaf(logits)
    ids = torch.sort(lg64.detach(), dim=-1, descending=True, stable=True).indices[:, :1]
    ref = _experts64(x64, torch.sigmoid(lg64.gather(1, ids)), ids, w13.double(), w2.double(), None, None, "silu",
                     on_input=True)
    ref.backward(dy.double())
    _close(x.grad, x64.grad, "d hidden_states (weight on input)")
    _close(logits.grad, lg64.grad, "d router_logits (weight on input)")

    # hash routing: ids from the table, weights from the unbiased softmax scores, renormalised
    table = torch.randint(0, E, (11, K), dtype=torch.int32)
    table[:, 1] = (table[:, 0] + 1) % E  # two distinct experts per token
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend=backend, renormalize=True,
                            hash_indices_table=table)
    w13, w2, _, _ = _expert_tensors(layer, False)
    ids_in = torch.randint(0, 11, (6,))
    x, logits = torch.randn(6, H, requires_grad=True), torch.randn(6, E, requires_grad=True)
    y = layer(x, logits, input_ids=ids_in)
    y.backward(dy[:1].expand(6, H))
    x64, lg64 = _leaf(x), _leaf(logits)
    ids = table[ids_in].long()
    ref = _experts64(x64, _weights64(lg64, ids, "softmax", True, 1.0), ids, w13.double(), w2.double(), None, None,
                     "silu")
    ref.backward(dy[:1].expand(6, H).double())
    _close(x.grad, x64.grad, "d hidden_states (hash)")
    _close(logits.grad, lg64.grad, "d router_logits (hash)")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_output_takes_in_place_ops(backend):
    # a residual added in place (out.add_(x)) on the output of the zero-expert combine / scaled output: not a view
    # of a custom Function's input (which autograd refuses to modify in place)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend=backend, renormalize=True,
                            routed_scaling_factor=2.0, apply_routed_scale_to_output=True)
    w13, w2, _, _ = _expert_tensors(layer, False)
    x, logits = torch.randn(4, H, requires_grad=True), torch.randn(4, E, requires_grad=True)
    out = layer(x, logits)
    out.add_(x)
    out.sum().backward()
    x64, lg64 = _leaf(x), _leaf(logits)
    _, ids, _ = ref_route(logits.detach(), K, renormalize=True)
    ref = _experts64(x64, _weights64(lg64, ids, "softmax", True, 1.0), ids, w13.double(), w2.double(), None, None,
                     "silu") * 2.0 + x64
    ref.sum().backward()
    _close(x.grad, x64.grad, "d hidden_states")
    _close(logits.grad, lg64.grad, "d router_logits")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_bits_do_not_change_with_autograd(backend, dtype):
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=dtype, backend=backend, renormalize=True,
                            routed_scaling_factor=1.7, apply_routed_scale_to_output=True)
    _expert_tensors(layer, False)
    x, logits = torch.randn(13, H, dtype=dtype), torch.randn(13, E)
    with torch.no_grad():
        want = layer(x, logits)
    got = layer(x.clone().requires_grad_(), logits.clone().requires_grad_())
    assert got.requires_grad and torch.equal(got.detach(), want)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bf16_gradients_within_tolerance(backend):
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, backend=backend, renormalize=True)
    w13, w2, _, _ = _expert_tensors(layer, False)
    for p in layer.routed_experts.parameters():
        p.requires_grad_(True)
    x = torch.randn(10, H, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(10, E, requires_grad=True)
    y = layer(x, logits)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad.dtype == torch.bfloat16 and layer.routed_experts.w13_weight.grad.dtype == torch.bfloat16
    _, ids, _ = ref_route(logits.detach(), K, renormalize=True)
    x64, lg64, t13, t2 = _leaf(x), _leaf(logits), _leaf(layer.routed_experts.w13_weight), \
        _leaf(layer.routed_experts.w2_weight)
    ref = _experts64(x64, _weights64(lg64, ids, "softmax", True, 1.0), ids, t13, t2, None, None, "silu")
    ref.backward(dy.double())
    for got, want, what in ((x.grad, x64.grad, "dx"), (logits.grad, lg64.grad, "dlogits"),
                            (layer.routed_experts.w13_weight.grad, t13.grad, "dw13")):
        _rms_close(got, want, what)


QUANT = {
    "fp8_block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]},
    "mxfp4": {"quant_method": "mxfp4"},
    "int4": {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}}},
        "format": "pack-quantized"},
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("fmt,size", [(f, 32) for f in QUANT] + [("mxfp4", 128), ("int4", 128)])
def test_quantised_layers_backpropagate_to_input_and_router(backend, fmt, size):
    # quantised weights stay frozen; the backward runs on the dequantised weights with the activation quantisation
    # as the identity (straight-through): exact float gradients of the dequantised model. Size 128: the Triton layer
    # stores 4-bit words re-laid for its register-operand GEMMs, which the backward lays back
    h, inter = size, size
    layer = moekit.FusedMoE(E, K, h, inter, params_dtype=torch.bfloat16, backend=backend, renormalize=True,
                            quant_config=QUANT[fmt])
    assert layer.routed_experts.packed_layout == ("rega" if size == 128 and backend == "triton" else "spec")
    w13, w2 = torch.randn(E, 2 * inter, h) * 0.2, torch.randn(E, h, inter) * 0.2
    q = moekit.quantize_experts(w13, w2, QUANT[fmt])
    layer.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
    d13, d2 = moekit.ops.quantize.dequantize_experts(*q, QUANT[fmt])
    x = torch.randn(5, h, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(5, E, requires_grad=True)
    y = layer(x, logits)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, ids, _ = ref_route(logits.detach(), K, renormalize=True)
    x64, lg64 = _leaf(x), _leaf(logits)
    ref = _experts64(x64, _weights64(lg64, ids, "softmax", True, 1.0), ids, d13.double(), d2.double(), None, None,
                     "silu")
    ref.backward(dy.double())
    _rms_close(x.grad, x64.grad, f"{fmt}: d hidden_states")  # a bf16 layer: bf16 GEMMs in the backward
    _rms_close(logits.grad, lg64.grad, f"{fmt}: d router_logits")
    assert not layer.routed_experts.w13_weight.requires_grad


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_public_fused_experts_and_empty_batch(backend):
    w1, w2 = (torch.randn(E, 2 * I, H) * 0.3).requires_grad_(), (torch.randn(E, H, I) * 0.3).requires_grad_()
    x = torch.randn(4, H, requires_grad=True)
    w = torch.rand(4, K, requires_grad=True)
    ids = torch.tensor([[0, 5], [5, 1], [2, 3], [3, 0]], dtype=torch.int32)
    y = moekit.fused_experts(x, w1, w2, w, ids, backend=backend)
    y.sum().backward()
    x64, w64, t1, t2 = _leaf(x), _leaf(w), _leaf(w1), _leaf(w2)
    _experts64(x64, w64, ids.long(), t1, t2, None, None, "silu").sum().backward()
    for got, want, what in ((x.grad, x64.grad, "dx"), (w.grad, w64.grad, "dw"), (w1.grad, t1.grad, "dw1"),
                            (w2.grad, t2.grad, "dw2")):
        _close(got, want, what)
    # an expert no slot reached has gradient 0 (experts 4 here)
    assert w1.grad[4].abs().max() == 0

    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend=backend)  # T = 0
    _expert_tensors(layer, False)
    layer.routed_experts.w2_weight.requires_grad_(True)
    x = torch.randn(0, H, requires_grad=True)
    layer(x, torch.randn(0, E)).sum().backward()
    assert x.grad.shape == (0, H) and layer.routed_experts.w2_weight.grad.abs().max() == 0


def test_parallel_layers_refuse_backward():
    # expert / tensor parallel layers exchange tokens with collectives that have no backward: their forward runs as
    # under no_grad (a gate requiring grad must not stop inference) and a backward through it raises. A
    # single-process EPLB layer runs the same executor with no collective, and trains
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, enable_eplb=True, backend="torch")
    _expert_tensors(layer, False)
    x = torch.randn(3, H, requires_grad=True)
    logits = torch.randn(3, E)
    layer(x, logits).sum().backward()
    assert x.grad is not None and math.isfinite(x.grad.abs().sum().item())
    want = layer(x, logits).detach()
    ex = layer.expert_executor
    ex.run_ep = lambda x, w, ids, experts, on_input, **kw: experts(x, w, ids)  # a one-rank "exchange"
    ex.layout = lambda *a: None
    ex.tp_size = 2  # as a tensor-parallel rank would be: the reduction becomes the stand-in below
    import moekit.parallel.executor as executor
    saved = executor.all_reduce_sum
    executor.all_reduce_sum = lambda out, group: out
    try:
        out = layer(x, logits)
        assert torch.equal(out.detach(), want)  # the forward itself runs
        with pytest.raises(NotImplementedError, match="backward through expert / tensor parallel"):
            out.sum().backward()
        layer.routed_experts.w2_weight.requires_grad_(True)  # only the expert weights want a gradient
        out = layer(x.detach(), logits)
        assert out.requires_grad
        with pytest.raises(NotImplementedError, match="backward through expert / tensor parallel"):
            out.sum().backward()
    finally:
        executor.all_reduce_sum = saved


def test_patched_transformers_model_trains_like_transformers():
    # full fine-tuning of a patched Qwen3-MoE (transformers' own parameters keep requires_grad=True): the loss and
    # every parameter's gradient equal transformers' eager experts, the expert stacks included
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, head_dim=8,
        norm_topk_prob=True, experts_implementation="eager")
    ref = transformers.Qwen3MoeForCausalLM(cfg).float().train()
    model = copy.deepcopy(ref)
    assert patch(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ids = torch.randint(0, 64, (2, 5))
    want, got = ref(ids, labels=ids).loss, model(ids, labels=ids).loss
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    theirs = dict(ref.named_parameters())
    renamed = {"moe.gate.weight": "gate.weight", "moe.routed_experts.w13_weight": "experts.gate_up_proj",
               "moe.routed_experts.w2_weight": "experts.down_proj"}
    seen = 0
    for name, p in model.named_parameters():
        for new, old in renamed.items():
            name = name.replace(new, old)
        assert p.grad is not None, name
        _close(p.grad, theirs[name].grad.double(), name, rel=1e-4)
        seen += 1
    assert seen == len(theirs)


def test_compiled_training_fullgraph_equals_eager():
    # torch.compile(fullgraph=True) traces the backward too (a torch.func.vjp per expert, every expert masked over
    # every slot while compiling): the same gradients as eager. "aot_eager": inductor's C++ build is slow on 2 cores
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", renormalize=True,
                            gate=torch.nn.Linear(H, E, bias=False))
    _expert_tensors(layer, False)
    layer.routed_experts.w2_weight.requires_grad_(True)
    x = torch.randn(5, H, requires_grad=True)
    layer(x).sum().backward()
    want = (x.grad.clone(), layer.gate.weight.grad.clone(), layer.routed_experts.w2_weight.grad.clone())
    x.grad = layer.gate.weight.grad = layer.routed_experts.w2_weight.grad = None
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).sum().backward()
    got = (x.grad, layer.gate.weight.grad, layer.routed_experts.w2_weight.grad)
    for g, w, what in zip(got, want, ("dx", "d gate", "d w2")):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=what)


def test_compiled_bf16_training_takes_the_grouped_path():
    # (round 59) compiled bf16 training runs the grouped GEMMs without host reads (the slots sorted on the device,
    # fixed row chunks over every expert), not the masked loop (E times the FLOPs): the compiled backward graph holds
    # grouped GEMMs; the gradients are eager's within bf16 rounding (experts held elsewhere:
    # tests/ops/test_experts_grad.py)
    from torch._dynamo.backends.common import aot_autograd

    backward_ops = []

    def bw(gm, _):
        backward_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=bw)
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.bfloat16, backend="torch", renormalize=True,
                            gate=torch.nn.Linear(32, 8, bias=False, dtype=torch.bfloat16))
    layer.load_expert_weights(torch.randn(8, 32, 32) * 0.2, torch.randn(8, 32, 16) * 0.2)
    experts = layer.routed_experts
    experts.w13_weight.requires_grad_(True), experts.w2_weight.requires_grad_(True)
    x = torch.randn(13, 32).bfloat16().requires_grad_()
    params = (layer.gate.weight, experts.w13_weight, experts.w2_weight)
    grads = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend=backend)):
        torch._dynamo.reset()
        x.grad = None
        for p in params:
            p.grad = None
        (fn(x).float() * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append((x.grad, *(p.grad for p in params)))
    assert sum("_grouped_mm" in op for op in backward_ops) >= 5  # h, o, da, dA, dW13, dW2 (6 when dw is needed)
    for name, a, b in zip(("dx", "d gate", "dW13", "dW2"), *grads):
        rms = ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()
        assert rms <= 1e-2, f"{name}: {rms:.3g}"


def test_compiled_bf16_training_over_many_token_counts():
    # a fullgraph compile of a bf16 layer's training step meets ten token counts (a dynamic T after the first): the
    # traced backward guards T only against its chunk bounds (round 59's review: a loop over T·K rows guarded on T
    # itself, recompiled per T and failed at the 9th), and each T's gradients are eager's within bf16 rounding
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.bfloat16, backend="torch", renormalize=True,
                            gate=torch.nn.Linear(32, 8, bias=False, dtype=torch.bfloat16))
    layer.load_expert_weights(torch.randn(8, 32, 32) * 0.2, torch.randn(8, 32, 16) * 0.2)
    layer.routed_experts.w2_weight.requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for t in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89):
        x = torch.randn(t, 32).bfloat16().requires_grad_()
        got = []
        for fn in (layer, compiled):
            x.grad = layer.routed_experts.w2_weight.grad = None
            fn(x).float().sum().backward()
            got.append((x.grad, layer.routed_experts.w2_weight.grad))
        for a, b in zip(*got):
            rms = ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()
            assert rms <= 1e-2, (t, rms)


GPU_CASES = {"bf16": (torch.bfloat16, None), "fp32": (torch.float32, None),
             "fp8_block": (torch.bfloat16, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128]})}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("tokens", [1, 8, 300])
def test_gpu_triton_gradients_equal_torch_backend(case, tokens):
    # the Triton forward on CUDA through the wrapped table (its grouped bf16 backward path; the fp32 loop) against the
    # torch backend's: the backward is the same torch code, so this checks the Triton forward's saved inputs, the
    # routing kernel's straight-through weights and the CUDA grouped GEMMs (float64 loops check the math on CPU)
    dtype, quant = GPU_CASES[case]
    e, k, h, inter = 16, 4, 256, 128
    layers = {b: moekit.FusedMoE(e, k, h, inter, params_dtype=dtype, backend=b, renormalize=True, device="cuda",
                                 quant_config=quant) for b in ("torch", "triton")}
    w13, w2 = torch.randn(e, 2 * inter, h, device="cuda") * 0.1, torch.randn(e, h, inter, device="cuda") * 0.1
    tensors = moekit.quantize_experts(w13, w2, quant) if quant else (w13.to(dtype), w2.to(dtype))
    grads = {}
    x0, lg0 = torch.randn(tokens, h, device="cuda", dtype=dtype), torch.randn(tokens, e, device="cuda") * 3
    dy = torch.randn(tokens, h, device="cuda", dtype=dtype)
    for b, layer in layers.items():
        if quant:
            layer.load_expert_weights(tensors[0], tensors[1], w13_scale=tensors[2], w2_scale=tensors[3])
        else:
            layer.load_expert_weights(*tensors)
            layer.routed_experts.w13_weight.requires_grad_(True)
        x, lg = x0.clone().requires_grad_(), lg0.clone().requires_grad_()
        for _ in range(2):  # a second call: where graphs would replay
            x.grad = lg.grad = None
            layer(x, lg).backward(dy)
        grads[b] = (x.grad, lg.grad, None if quant else layer.routed_experts.w13_weight.grad)
    for i, what in enumerate(("dx", "dlogits", "dw13")):
        got, want = grads["triton"][i], grads["torch"][i]
        if want is None:
            continue
        rms = ((got.double() - want.double()).pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt()).item()
        assert rms <= (1e-4 if dtype == torch.float32 and not quant else 1e-2), f"{case} {what}: rel RMS {rms:.3g}"


@pytest.mark.gpu
def test_gpu_graphs_step_aside_when_expert_weights_train():
    # the input needs no grad but the expert weights do: a graph replay would return an output without their
    # gradient; the layer runs the plain kernels instead
    layer = moekit.FusedMoE(8, 2, 128, 64, params_dtype=torch.bfloat16, device="cuda")
    layer.load_expert_weights(torch.randn(8, 128, 128, device="cuda", dtype=torch.bfloat16) * 0.1,
                              torch.randn(8, 128, 64, device="cuda", dtype=torch.bfloat16) * 0.1)
    x, lg = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16), torch.randn(4, 8, device="cuda")
    for _ in range(3):
        layer(x, lg)  # inference: graphs captured and replayed
    layer.routed_experts.w2_weight.requires_grad_(True)
    y = layer(x, lg)
    assert y.requires_grad
    y.float().sum().backward()
    assert layer.routed_experts.w2_weight.grad is not None and layer.routed_experts.w2_weight.grad.abs().sum() > 0


class _ScaledRms(torch.nn.Module):
    """An expert output norm with a weight (Muse Spark's form): y / rms(y) · g."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, H))

    def forward(self, o):
        return o / o.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.weight


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_expert_output_norm_gets_gradients(backend):
    # out[t] = Σ_j w_j · norm(expert_j(x_t)): the experts run once per slot with weight 1, the norm and the weighted
    # sum are torch ops; the norm's weight is trained too
    norm = _ScaledRms()
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend=backend, renormalize=True,
                            expert_output_norm=norm)
    w13, w2, _, _ = _expert_tensors(layer, False)
    x, logits = torch.randn(6, H, requires_grad=True), torch.randn(6, E, requires_grad=True)
    dy = torch.randn(6, H)
    layer(x, logits).backward(dy)
    x64, lg64, g64 = _leaf(x), _leaf(logits), _leaf(norm.weight)
    _, ids, _ = ref_route(logits.detach(), K, renormalize=True)
    w64 = _weights64(lg64, ids, "softmax", True, 1.0)
    rows = []
    for t in range(6):
        acc = 0
        for j in range(K):
            e = int(ids[t, j])
            o = w2[e].double() @ ref_act(w13[e].double() @ x64[t], "silu")
            acc = acc + w64[t, j] * (o / o.pow(2).mean().add(1e-6).sqrt() * g64)
        rows.append(acc)
    torch.stack(rows).backward(dy.double())
    _close(x.grad, x64.grad, "d hidden_states")
    _close(logits.grad, lg64.grad, "d router_logits")
    _close(norm.weight.grad, g64.grad, "d norm.weight")


def _gpt_oss(transformers, impl="eager"):
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], experts_implementation=impl)
    model = transformers.GptOssForCausalLM(cfg).float().train()
    with torch.no_grad():  # biases that matter
        for n, p in model.named_parameters():
            if "bias" in n and "norm" not in n:
                p.normal_(0, 0.1)
    return model


def _oss_rows(t: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gate_up stack [E, H, 2I] (gate / up interleaved) -> moekit's [E, 2I, H]; a bias [E, 2I] likewise."""
    t = torch.cat([t[..., 0::2], t[..., 1::2]], -1)
    return t.transpose(1, 2) if t.dim() == 3 else t


def test_patched_gpt_oss_trains_its_converted_stacks():
    # gpt-oss's stacks are converted copies in the patched layer ([E, H, 2I] interleaved -> [E, 2I, H]): they keep
    # the stacks' requires_grad (round 58's user trial: they came out frozen, silently), and their gradients are
    # transformers' in moekit's layout
    transformers = pytest.importorskip("transformers")
    ref = _gpt_oss(transformers)
    model = copy.deepcopy(ref)
    patch(model)
    ids = torch.randint(0, 64, (2, 6))
    ref(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    for layer in range(2):
        theirs, mine = ref.model.layers[layer].mlp.experts, model.model.layers[layer].mlp.moe.routed_experts
        assert all(p.requires_grad for p in mine.parameters(recurse=False))
        _close(mine.w13_weight.grad, _oss_rows(theirs.gate_up_proj.grad).double(), "d w13", rel=1e-5)
        _close(mine.w13_bias.grad, _oss_rows(theirs.gate_up_proj_bias.grad).double(), "d w13_bias", rel=1e-5)
        _close(mine.w2_weight.grad, theirs.down_proj.grad.transpose(1, 2).double(), "d w2", rel=1e-5)


def test_registered_switch_trains_gpt_oss_stacks():
    # experts_implementation="moekit": transformers keeps its router, moekit runs the experts on the module's own
    # stacks, converted per call while autograd is wanted (a cached detached copy gave them no gradient, silently)
    transformers = pytest.importorskip("transformers")
    from moekit.integrations.transformers import register

    register()
    ref = _gpt_oss(transformers)
    model = _gpt_oss(transformers, "moekit")
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 6))
    ref(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        _close(p.grad, theirs[name].grad.double(), name, rel=1e-5)


def test_training_mode_routing_the_patch_cannot_reproduce_is_refused():
    # Mixtral with router_jitter_noise > 0 jitters its input in training mode: the patched block (eval-mode routing)
    # refuses a training-mode call instead of silently routing without the jitter; eval mode and jitter 0 run
    transformers = pytest.importorskip("transformers")
    for jitter in (0.5, 0.0):
        cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                         num_experts_per_tok=2, router_jitter_noise=jitter)
        model = transformers.MixtralForCausalLM(cfg).train()
        patch(model)
        ids = torch.randint(0, 64, (1, 5))
        if jitter:
            with pytest.raises(NotImplementedError, match="router_jitter_noise = 0.5"):
                model(ids)
            model.eval()
        assert model(ids).logits.shape == (1, 5, 64)


def test_frozen_quantised_weights_and_double_backward_raise():
    q = QUANT["fp8_block"]
    layer = moekit.FusedMoE(E, K, 32, 32, params_dtype=torch.bfloat16, backend="torch", quant_config=q)
    qw = moekit.quantize_experts(torch.randn(E, 64, 32) * 0.2, torch.randn(E, 32, 32) * 0.2, q)
    layer.load_expert_weights(qw[0], qw[1], w13_scale=qw[2], w2_scale=qw[3])
    layer.routed_experts.w13_scale.requires_grad_(True)  # a float32 scale can require grad: it would get none
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    out = layer(x, torch.randn(3, E))  # the forward runs (inference with grad enabled); a backward to it raises
    with pytest.raises(NotImplementedError, match=r"\(w13_scale require grad\)"):
        out.float().sum().backward()
    layer.routed_experts.w13_scale.requires_grad_(False)
    x.requires_grad_()
    layer(x, torch.randn(3, E)).float().sum().backward()  # frozen weights: the input's gradient only
    assert x.grad is not None

    # a double backward (a gradient penalty, a Hessian-vector product) through the experts: not silently wrong
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch")
    _expert_tensors(layer, False)
    w13 = layer.routed_experts.w13_weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(layer(torch.randn(4, H), torch.randn(4, E)).pow(3).sum(), w13, create_graph=True)


def test_sqrtsoftplus_gradient_is_finite_for_large_logits():
    # softplus(x) = x past 20: the discarded branch's exp(x) overflows past ~88; its gradient must not turn into NaN
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", scoring_func="sqrtsoftplus",
                            renormalize=True)
    _expert_tensors(layer, False)
    logits = (torch.randn(3, E) + torch.tensor([95.0, 0, 0, 0, 0, 0])).requires_grad_()
    layer(torch.randn(3, H), logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_graphs_step_aside_for_a_trainable_output_norm():
    # the graphs' check reads the routed experts' children too (an expert output norm's weight)
    from moekit.experts.graphed_plan import _training

    norm = _ScaledRms()
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", expert_output_norm=norm)
    assert _training(layer.routed_experts)  # the norm's weight requires grad
    norm.weight.requires_grad_(False)
    assert not _training(layer.routed_experts)
    layer.routed_experts.w13_weight.requires_grad_(True)
    assert _training(layer.routed_experts)
