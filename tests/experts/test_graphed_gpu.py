"""The layer's internal CUDA graphs (eager calls of T <= eager_graph_tokens) on a GPU: bit-identical to
the plain eager call, invalidated when weights move, off under torch.compile and inside a user's
capture, memory returned when the layer goes. (Host time is measured by ``moekit bench --eager``.)"""

import gc

import pytest
import torch

import moekit
from moekit.benchmarking import MODELS

pytestmark = pytest.mark.gpu
DT = torch.bfloat16


class Shared(torch.nn.Module):
    """A stand-in shared expert (the runner then consumes the graph's static output itself)."""

    def __init__(self, h):
        super().__init__()
        self.lin = torch.nn.Linear(h, h, bias=False, device="cuda", dtype=DT)

    def forward(self, x):
        return self.lin(x)


def _pair(name: str, experts: int | None = None, shared: bool = False, **kw):
    """(graphed layer, plain layer) of a benchmark shape with the same weights (fewer experts if
    asked; zero experts, if the model has them, then number half of ``experts``)."""
    m = MODELS[name]
    if experts:
        m = m.replace(E=experts, Z=experts // 2 if m.Z else 0)
    torch.manual_seed(0)
    bias = torch.rand(m.E + m.Z, device="cuda") * 0.1 if m.sel_bias else None
    mod = Shared(m.H) if shared else None
    layers = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, device="cuda", backend="triton",
                              e_score_correction_bias=bias, shared_experts=mod, eager_graph_tokens=n,
                              **m.layer_kwargs(), **kw) for n in (8, 0)]
    re = layers[1].routed_experts
    with torch.no_grad():
        re.w13_weight.normal_(0, m.H**-0.5)
        re.w2_weight.normal_(0, m.I**-0.5)
        if m.has_bias:
            re.w13_bias.uniform_(-0.05, 0.05)
            re.w2_bias.uniform_(-0.05, 0.05)
    layers[1].load_expert_weights(re.w13_weight, re.w2_weight, re.w13_bias, re.w2_bias)
    layers[0].routed_experts.adopt_weights(re.w13_weight, re.w2_weight, re.w13_bias, re.w2_bias)
    return layers[0], layers[1], m


def _inputs(m, t, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(t, m.H, device="cuda", dtype=DT, generator=g),
            torch.randn(t, m.E + m.Z, device="cuda", generator=g))


@pytest.mark.parametrize("name, experts, shared", [("qwen3-30b-a3b", None, False), ("deepseek-v3", 32, True),
                                                   ("gpt-oss-120b", 16, False), ("longcat-flash", 64, False)])
def test_bit_identical_to_plain_eager(name, experts, shared):
    graphed, plain, m = _pair(name, experts, shared)
    kept = []
    for t in range(1, 9):
        for seed in range(3):  # capture call, then two replays on new inputs
            x, lg = _inputs(m, t, 100 * t + seed)
            out = graphed(x, lg)
            assert torch.equal(out, plain(x, lg)), (t, seed)
            kept.append((out, plain(x, lg)))
    assert len(graphed._graphs) == 8
    assert all(torch.equal(a, b) for a, b in kept)  # earlier outputs were not overwritten by later replays
    x, lg = _inputs(m, 9, 7)  # above the limit: eager, no new graph
    assert torch.equal(graphed(x, lg), plain(x, lg)) and len(graphed._graphs) == 8


def test_invalidation_after_loading_and_adopting():
    graphed, plain, m = _pair("qwen3-30b-a3b", 16)
    x, lg = _inputs(m, 4, 1)
    graphed(x, lg)
    graphed(x, lg)
    re = plain.routed_experts
    w13, w2 = torch.randn_like(re.w13_weight) * 0.02, torch.randn_like(re.w2_weight) * 0.03
    graphed.load_expert_weights(w13, w2)  # in place: the graphs read the new weights by address
    assert torch.equal(graphed(x, lg), plain(x, lg))
    new13, new2 = w13.flip(0).contiguous(), w2.flip(0).contiguous()
    graphed.routed_experts.adopt_weights(new13, new2)  # new addresses: the graphs are recaptured
    plain.routed_experts.adopt_weights(new13, new2)
    before = graphed._graphs._state
    assert torch.equal(graphed(x, lg), plain(x, lg)) and graphed._graphs._state != before
    assert torch.equal(graphed(x, lg), plain(x, lg)) and len(graphed._graphs) == 1


def test_off_under_compile_and_autograd():
    graphed, plain, m = _pair("qwen3-30b-a3b", 16)
    x, lg = _inputs(m, 2, 3)
    torch._dynamo.reset()
    out = torch.compile(graphed, fullgraph=True)(x, lg)
    assert len(graphed._graphs) == 0
    assert ((out.float() - plain(x, lg).float()).norm() / out.float().norm()).item() < 5e-3
    with torch.enable_grad():
        graphed(x, lg.requires_grad_())
    assert len(graphed._graphs) == 0


def test_inside_a_user_capture():
    graphed, plain, m = _pair("qwen3-30b-a3b", 16)
    x, lg = _inputs(m, 3, 5)
    graphed(x, lg)  # warm-up (its own graph for T = 3)
    sx, sl = x.clone(), lg.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = graphed(sx, sl)  # captured into the user's graph, eagerly
    assert len(graphed._graphs) == 1
    for seed in (6, 7):
        x2, l2 = _inputs(m, 3, seed)
        sx.copy_(x2)
        sl.copy_(l2)
        g.replay()
        assert torch.equal(static_out, plain(x2, l2))


def test_memory_released_with_the_layer():
    def run():
        graphed, plain, m = _pair("deepseek-v3", 16)
        for t in range(1, 9):
            graphed(*_inputs(m, t, t))
        assert len(graphed._graphs) == 8

    run()  # one-time allocations (kernels, handles) happen here
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    run()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == alloc
    assert torch.cuda.memory_reserved() <= reserved


def test_whole_graph_with_moekit_gate_and_shared_experts():
    """DeepSeek-V3-like layer with moekit's own gate (fp32 RouterLinear), SharedMLP and a sigmoid shared
    gate: one whole graph per T (calls without logits), bit-identical to the plain eager call."""
    from moekit.loading.modules import RouterLinear, SharedMLP

    m = MODELS["deepseek-v3"].replace(E=32)
    torch.manual_seed(0)
    bias = torch.rand(m.E, device="cuda") * 0.1
    mods = [dict(gate=RouterLinear(m.H, m.E, fp32=True, device="cuda", dtype=DT),
                 shared_experts=SharedMLP(m.H, 256, device="cuda", dtype=DT),
                 shared_expert_gate=torch.nn.Linear(m.H, 1, bias=False, device="cuda", dtype=DT)) for _ in range(2)]
    layers = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, device="cuda", backend="triton",
                              e_score_correction_bias=bias, eager_graph_tokens=n, **m.layer_kwargs(), **kw)
              for n, kw in zip((8, 0), mods)]
    graphed, plain = layers
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.02)
        graphed.load_state_dict(plain.state_dict())
        assert graphed._make_graph_plan().whole_gate
        for t in (1, 3, 8):
            for seed in range(3):
                shape = (2, t // 2, m.H) if t % 2 == 0 else (t, m.H)  # [B, S, H] inputs too
                x = torch.randn(*shape, device="cuda", dtype=DT)
                assert torch.equal(graphed(x), plain(x)), (t, seed)
        assert len(graphed._graphs) == 3
        graphed.shared_experts.down_proj.weight = torch.nn.Parameter(plain.shared_experts.down_proj.weight * 2)
        plain.shared_experts.down_proj.weight.mul_(2)
        x = torch.randn(1, m.H, device="cuda", dtype=DT)
        assert torch.equal(graphed(x), plain(x)) and len(graphed._graphs) == 1  # new address: recaptured
