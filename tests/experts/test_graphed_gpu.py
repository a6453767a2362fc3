"""The layer's internal CUDA graphs (eager calls of T <= eager_graph_tokens) on a GPU: bit-identical to
the plain eager call (exact T <= 8, and the padded token buckets above, bf16 and quantised), invalidated
when weights move, off under torch.compile and inside a user's capture, memory returned when the layer
goes, one pool shared by layers. (Host time is measured by ``moekit bench --eager``.)"""

import gc

import pytest
import torch

import moekit
from moekit.benchmarking import MODELS
from moekit.experts.graphed import GraphPool

pytestmark = pytest.mark.gpu
DT = torch.bfloat16
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
MXFP4 = {"quant_method": "mxfp4"}
INT4 = moekit.Int4GroupFormat(32)


class Shared(torch.nn.Module):
    """A stand-in shared expert (the runner then consumes the graph's static output itself)."""

    def __init__(self, h):
        super().__init__()
        self.lin = torch.nn.Linear(h, h, bias=False, device="cuda", dtype=DT)

    def forward(self, x):
        return self.lin(x)


#: exact graphs, then padded buckets (16, 24, 40, 64) with repeats inside a bucket
TOKENS = (*range(1, 9), 9, 13, 16, 23, 40, 57, 64)


def _pair(name: str, experts: int | None = None, shared: bool = False, quant=None, **kw):
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
                              quant_config=quant, **m.layer_kwargs(), **kw) for n in (64, 0)]
    rows = 2 * m.I if m.gated else m.I
    w13 = torch.randn(m.E, rows, m.H, device="cuda", dtype=DT) * m.H**-0.5
    w2 = torch.randn(m.E, m.H, m.I, device="cuda", dtype=DT) * m.I**-0.5
    b13 = (torch.rand(m.E, rows, device="cuda", dtype=DT) - 0.5) * 0.1 if m.has_bias else None
    b2 = (torch.rand(m.E, m.H, device="cuda", dtype=DT) - 0.5) * 0.1 if m.has_bias else None
    for layer in layers:  # quantised layers quantise the same weights the same way
        layer.load_expert_weights(w13, w2, b13, b2)
    return layers[0], layers[1], m  # (both layers hold the same shared-experts module)


def _inputs(m, t, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(t, m.H, device="cuda", dtype=DT, generator=g),
            torch.randn(t, m.E + m.Z, device="cuda", generator=g))


@pytest.mark.parametrize("name, experts, shared, quant", [
    ("qwen3-30b-a3b", None, False, None), ("deepseek-v3", 32, True, None), ("gpt-oss-120b", 16, False, None),
    ("longcat-flash", 64, False, None), ("deepseek-v3", 32, False, FP8), ("qwen3-30b-a3b", None, True, FP8),
    ("gpt-oss-120b", 16, False, MXFP4), ("deepseek-v3", 32, False, INT4)])
def test_bit_identical_to_plain_eager(name, experts, shared, quant):
    """Every exact T and padded bucket: the graphed call has the plain eager call's bits (SPEC §9 makes the
    padding rows invisible); earlier outputs survive later replays; above the limit: eager, no graph."""
    graphed, plain, m = _pair(name, experts, shared, quant)
    kept = []
    for t in TOKENS:
        for seed in range(3):  # capture call, then two replays on new inputs
            x, lg = _inputs(m, t, 100 * t + seed)
            out = graphed(x, lg)
            assert torch.equal(out, plain(x, lg)), (t, seed)
            kept.append((out, plain(x, lg)))
    assert len(graphed._graphs) == 12  # T = 1..8, buckets 16, 24, 40, 64
    assert all(torch.equal(a, b) for a, b in kept)  # earlier outputs were not overwritten by later replays
    x, lg = _inputs(m, 65, 7)  # above the limit: eager, no new graph
    assert torch.equal(graphed(x, lg), plain(x, lg)) and len(graphed._graphs) == 12


@pytest.mark.parametrize("name, experts, quant", [("qwen3-30b-a3b", None, None), ("qwen3-30b-a3b", None, FP8),
                                                  ("gpt-oss-120b", 16, MXFP4), ("mixtral-8x7b", None, None)])
def test_large_buckets_bit_identical(name, experts, quant):
    """Buckets above 64 rows (the padding rows keep earlier inputs): the plain call's bits; two calls per
    bucket with different T, so the second one runs over the first one's rows."""
    graphed, plain, m = _pair(name, experts, quant=quant)
    graphed.eager_graph_tokens = 1024
    for t in (100, 65, 300, 290, 1000, 700, 1024):  # buckets 128, 96, 320, 320, 1024, 768, 1024
        for seed in range(2):
            x, lg = _inputs(m, t, 10 * t + seed)
            assert torch.equal(graphed(x, lg), plain(x, lg)), (t, seed)
    assert len(graphed._graphs) == 5


@pytest.mark.parametrize("routing", ["llama4", "expert_scale", "pnorm"])
def test_graph_safe_routing_functions(routing):
    """moekit's named routings (Llama 4, Gemma 4, DBRX) in exact-T graphs: the plain call's bits at T <= 8;
    above, eager (no bucket: torch routing is not promised batch invariant)."""
    import functools

    from moekit.loading.routings import ExpertScaleRouting, llama4_routing, pnorm_routing

    if routing == "expert_scale":
        fn = ExpertScaleRouting(32, device="cuda")
        with torch.no_grad():
            fn.per_expert_scale.uniform_(0.5, 1.5)
        fn.requires_grad_(False)  # (round 64: a trainable routing parameter takes the plain path while grad is on)
    else:
        fn = llama4_routing if routing == "llama4" else functools.partial(pnorm_routing, p=1.0)
    graphed, plain, m = _pair("qwen3-30b-a3b", 32, custom_routing_function=fn)
    assert graphed.eager_graph_tokens == 8
    for t in (*range(1, 9), 13):
        for seed in range(3):
            x, lg = _inputs(m, t, 100 * t + seed)
            assert torch.equal(graphed(x, lg), plain(x, lg)), (t, seed)
    assert len(graphed._graphs) == 8


def test_layers_share_one_pool():
    """Two layers on one GraphPool, calls interleaved over buckets: each output is its own layer's."""
    pool = GraphPool()
    pairs = [_pair("qwen3-30b-a3b", 32, shared, runner_args=dict(graph_pool=pool)) for shared in (False, True)]
    for t in (3, 13, 64, 3, 40, 13):
        for graphed, plain, m in pairs:
            x, lg = _inputs(m, t, t)
            assert torch.equal(graphed(x, lg), plain(x, lg)), t
    assert pool._handle is not None and all(g._graphs._pool() is pool._handle for g, _, _ in pairs)


def test_invalidation_after_loading_and_adopting():
    graphed, plain, m = _pair("qwen3-30b-a3b", 16)
    x, lg = _inputs(m, 4, 1)
    graphed(x, lg)
    graphed(x, lg)
    re = plain.routed_experts
    w13, w2 = torch.randn_like(re.w13_weight) * 0.02, torch.randn_like(re.w2_weight) * 0.03
    for layer in (graphed, plain):
        layer.load_expert_weights(w13, w2)  # in place: the graphs read the new weights by address
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


@pytest.mark.parametrize("gate_backend", ["torch", "triton"])
def test_whole_graph_with_moekit_gate_and_shared_experts(gate_backend):
    """DeepSeek-V3-like layer with moekit's own gate (fp32 RouterLinear), SharedMLP and a sigmoid shared
    gate: one whole graph per T <= 8 (calls without logits); above, the shared experts run eagerly around the
    bucket's route -> experts graph, and the gate too on the torch backend (on the Triton one, batch invariant,
    it is inside: gate -> route -> experts); bit-identical to the plain eager call."""
    from moekit.loading.modules import RouterLinear, SharedMLP

    m = MODELS["deepseek-v3"].replace(E=32)
    torch.manual_seed(0)
    bias = torch.rand(m.E, device="cuda") * 0.1
    mods = [dict(gate=RouterLinear(m.H, m.E, fp32=True, backend=gate_backend, device="cuda", dtype=DT),
                 shared_experts=SharedMLP(m.H, 256, device="cuda", dtype=DT),
                 shared_expert_gate=torch.nn.Linear(m.H, 1, bias=False, device="cuda", dtype=DT)) for _ in range(2)]
    layers = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, device="cuda", backend="triton",
                              e_score_correction_bias=bias, eager_graph_tokens=n, **m.layer_kwargs(), **kw)
              for n, kw in zip((64, 0), mods)]
    graphed, plain = layers
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.02)
        plain.load_expert_weights(plain.routed_experts.w13_weight, plain.routed_experts.w2_weight)  # now loaded
        for layer in layers:
            layer.load_state_dict(plain.state_dict())
        assert graphed._make_graph_plan().whole_gate
        for t in (1, 3, 8, 13, 40):
            for seed in range(3):
                shape = (2, t // 2, m.H) if t % 2 == 0 else (t, m.H)  # [B, S, H] inputs too
                x = torch.randn(*shape, device="cuda", dtype=DT)
                assert torch.equal(graphed(x), plain(x)), (t, seed)
        assert len(graphed._graphs) == 5  # whole: T = 1, 3, 8; route -> experts: buckets 16, 40
        # the later calls of input keys 13 and [2, 20] went straight to their bucket graphs (gate inside)
        assert len(graphed._graphs._direct) == (2 if gate_backend == "triton" else 0)
        keys = list(graphed._graphs._entries)[3:]
        assert all((k[2] is None) == (gate_backend == "triton") for k in keys)  # the gate inside, or logits in
        graphed.shared_experts.down_proj.weight = torch.nn.Parameter(plain.shared_experts.down_proj.weight * 2)
        plain.shared_experts.down_proj.weight.mul_(2)
        x = torch.randn(1, m.H, device="cuda", dtype=DT)
        assert torch.equal(graphed(x), plain(x)) and len(graphed._graphs) == 1  # new address: recaptured


def _gated_pair(m, tokens: int, seed: int, bias: bool = False, backend: str = "triton", **kw):
    """(graphed layer, plain layer) of shape ``m`` with moekit's gate (``backend``, with a bias if asked), random
    weights shared by both (written in place, then loaded as the experts' weights: round 55, a state dict of experts
    never loaded loads as not loaded)."""
    from moekit.loading.modules import RouterLinear

    torch.manual_seed(seed)
    graphed, plain = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, device="cuda", backend="triton",
                                      gate=RouterLinear(m.H, m.E, bias=bias, backend=backend, device="cuda", dtype=DT),
                                      eager_graph_tokens=n, **m.layer_kwargs(), **kw) for n in (tokens, 0)]
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.02)
        re = plain.routed_experts  # now loaded (biases too, where the layer has them)
        plain.load_expert_weights(re.w13_weight, re.w2_weight, getattr(re, "w13_bias", None),
                                  getattr(re, "w2_bias", None))
        graphed.load_state_dict(plain.state_dict())
    return graphed, plain


def test_direct_bucket_replays_return_fresh_bits():
    """Qwen3-like layer, Triton gate, no shared experts: repeated input keys above T = 8 (with and without
    logits) replay their bucket graph directly (no checks) and return fresh tensors with the plain call's bits,
    never overwritten later."""
    m = MODELS["qwen3-30b-a3b"].replace(E=32)
    graphed, plain = _gated_pair(m, 2048, seed=1)
    with torch.no_grad():
        kept = []
        for t in (13, 13, 13, 100, 100, 1500, 1500):
            x = torch.randn(t, m.H, device="cuda", dtype=DT)
            out = graphed(x)
            assert torch.equal(out, plain(x)), t
            kept.append((out, plain(x)))
        for t in (13, 13, 13):  # logits passed (gpt-oss's adapter): keyed by both inputs
            x, lg = torch.randn(t, m.H, device="cuda", dtype=DT), torch.randn(t, m.E, device="cuda")
            out = graphed(x, lg)
            assert torch.equal(out, plain(x, lg)), t
            kept.append((out, plain(x, lg)))
        assert all(torch.equal(a, b) for a, b in kept)
        assert len(graphed._graphs._direct) == 4 and len(graphed._graphs) == 4


@pytest.mark.parametrize("gate_backend", ["triton", "torch"])
def test_forward_with_scores_bit_identical(gate_backend):
    """gpt-oss-like layer (biases, swigluoai), moekit's gate: ``forward_with_scores`` replays its own graphs (the
    gate inside on the Triton backend, eager on the torch one) and returns the plain forward's bits and the plain
    ``select_experts`` weights' bits, at exact T and in padded buckets, by the checked path and by direct replays;
    earlier results are not overwritten."""
    m = MODELS["gpt-oss-120b"].replace(E=16)
    graphed, plain = _gated_pair(m, 64, seed=2, bias=True, backend=gate_backend, swiglu_limit=7.0)
    with torch.no_grad():
        kept = []
        for t in (1, 1, 5, 5, 13, 13, 40):
            x = torch.randn(t, m.H, device="cuda", dtype=DT)
            out, w = graphed.forward_with_scores(x)
            ref, wref = plain(x), plain.router.select_experts(x, plain.gate(x))[0]
            assert torch.equal(out, ref) and torch.equal(w, wref), t
            kept.append((out, w, ref, wref))
        assert all(torch.equal(a, c) and torch.equal(b, d) for a, b, c, d in kept)
        assert [k[0] for k in graphed._graphs._entries if k[-1] == "scores"] == [1, 5, 16, 40]
        # the second call of each input key replayed directly (gate inside: no logits to key by)
        assert len(graphed._graphs._direct) == (4 if gate_backend == "triton" else 0)


@pytest.mark.parametrize("own_streams", [False, True])
def test_threads_share_a_layer_and_a_pool(own_streams):
    # round 49's audit (H100): two threads calling one layer (whole graph at T = 4, bucket at T = 16) or two layers of
    # one GraphPool got other calls' outputs in 14-175 of 300 calls; each call must equal its serial result
    import sys
    import threading

    def layer(pool=None, graph_tokens=64):
        torch.manual_seed(0)
        m = moekit.FusedMoE(8, 2, 64, 32, params_dtype=DT, device="cuda", eager_graph_tokens=graph_tokens,
                            runner_args=dict(graph_pool=pool) if pool else None).eval()
        m.load_expert_weights(torch.randn(8, 64, 64, device="cuda", dtype=DT) * 0.1,
                              torch.randn(8, 64, 32, device="cuda", dtype=DT) * 0.1)
        return m

    pool = GraphPool()
    one, pa, pb = layer(), layer(pool), layer(pool)
    for layers, t in (([one, one], 4), ([one, one], 16), ([pa, pb], 16)):
        g = torch.Generator("cuda").manual_seed(1)
        args = [(torch.randn(t, 64, device="cuda", generator=g, dtype=DT),
                 torch.randn(t, 8, device="cuda", generator=g)) for _ in layers]
        with torch.no_grad():
            refs = [m(*a).clone() for m, a in zip(layers, args)]
        torch.cuda.synchronize()
        bad, errors = [0, 0], []

        def work(i):
            try:
                s = torch.cuda.Stream() if own_streams else torch.cuda.current_stream()
                with torch.cuda.stream(s), torch.no_grad():
                    for _ in range(200):
                        o = layers[i](*args[i])
                        s.synchronize()
                        bad[i] += not torch.equal(o, refs[i])
            except Exception as err:  # noqa: BLE001 (reported below)
                errors.append(repr(err))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # threads switch often (the audit's setting)
        try:
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            sys.setswitchinterval(switch)
        assert not errors and bad == [0, 0], (t, bad, errors)
