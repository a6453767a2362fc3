"""torch.compile(fullgraph=True) and CUDA-graph capture of whole layers on the Triton backend (GPU)."""

import pytest
import torch

import moekit

pytestmark = pytest.mark.gpu

LAYERS = {
    "deepseek": dict(num_experts=64, top_k=6, hidden_size=256, intermediate_size=128, use_grouped_topk=True,
                     num_expert_group=8, topk_group=4, scoring_func="sigmoid", routed_scaling_factor=2.5,
                     bias=64),
    "gpt-oss": dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, activation="swigluoai",
                    has_bias=True),
    "longcat": dict(num_experts=32, top_k=6, hidden_size=256, intermediate_size=128, zero_expert_type="identity",
                    bias=48, renormalize=False),
    "llama4": dict(num_experts=8, top_k=1, hidden_size=256, intermediate_size=128,
                   custom_routing_function=lambda h, g, k, r: (torch.sigmoid(g.topk(k).values), g.topk(k).indices),
                   apply_router_weight_on_input=True),
}


def build(name, backend):
    kw = dict(LAYERS[name])
    nb = kw.pop("bias", None)
    if nb:
        kw["e_score_correction_bias"] = torch.linspace(0, 0.1, nb, device="cuda")
    layer = moekit.FusedMoE(**kw, params_dtype=torch.bfloat16, device="cuda", backend=backend)
    c, g = layer.moe_config, torch.Generator().manual_seed(0)
    e, h, i, rows = c.num_experts, c.hidden_size, c.intermediate_size, c.w13_rows()

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", torch.bfloat16)

    biases = (rnd(e, rows, scale=0.05), rnd(e, h, scale=0.05)) if c.has_bias else ()
    layer.load_expert_weights(rnd(e, rows, h, scale=h**-0.5), rnd(e, h, i, scale=i**-0.5), *biases)
    return layer


@pytest.mark.parametrize("name", list(LAYERS))
def test_compile_fullgraph_and_cuda_graph(name):
    layer = build(name, "triton")
    ref_layer = build(name, "torch")
    ref_layer.load_state_dict(layer.state_dict())
    e = layer.router.num_logit_columns or layer.router.global_num_experts
    x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(37, e, device="cuda")
    eager = layer(x, logits)
    ref = ref_layer(x.float().to(torch.bfloat16), logits)
    rel = ((eager.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out_c = compiled(x, logits)
    # the same Triton kernels; inductor may fuse the torch-side zero-expert / scaling math differently
    rel_c = ((out_c.float() - eager.float()).norm() / eager.float().norm()).item()
    assert rel_c < 5e-3, rel_c

    # the eager layer forward captured in a CUDA graph replays to the same result on new inputs
    static_x, static_l = x.clone(), logits.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x, static_l)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = layer(static_x, static_l)
    x2, l2 = torch.randn_like(x), torch.randn_like(logits)
    static_x.copy_(x2)
    static_l.copy_(l2)
    g.replay()
    torch.testing.assert_close(static_out, layer(x2, l2), atol=0, rtol=0)
