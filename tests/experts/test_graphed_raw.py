"""Graph replays through the CUDA runtime's C functions (``experts/graphed_raw.py``), on CPU: a stand-in runtime
does the copy kernel's work with ``ctypes.memmove`` from the launch's arguments and launches the fake graph, so the
arguments, the launch order, the fresh output and every input the raw path must decline run without a GPU. (On a GPU: tests/experts/test_graphed_gpu.py
compares the raw replays with the torch ops bit for bit.)"""

import ctypes

import pytest
import torch

import moekit
from moekit.experts import graphed, graphed_raw
from moekit.experts.graphed_raw import RawReplay

H, E = 32, 8


class StandIn:
    """``CudaRuntime``'s calls on host memory, recorded: ``copy`` moves the bytes, ``launch`` replays the graph."""

    def __init__(self):
        self.calls, self.graphs, self.device = [], {}, -1

    def current_device(self):
        return self.device

    def stream(self, device):
        return 7

    def copy(self, args, stream):
        """``moekit_copy2``: ``n0`` 16-byte units ``src0 -> dst0``, ``n1`` units ``src1 -> dst1``."""
        d0, s0, n0, d1, s1, n1 = args.vals
        self.calls.append(("copy", (d0, s0, 16 * n0, d1, s1, 16 * n1), stream))
        for d, s, n in ((d0, s0, n0), (d1, s1, n1)):
            if n:
                ctypes.memmove(d, s, 16 * n)

    def launch(self, graph_exec, stream):
        self.calls.append(("launch", graph_exec, stream))
        self.graphs[graph_exec].replay()


@pytest.fixture
def raw_graphs(fake_graphs, monkeypatch):
    """fake_graphs, with every captured graph given a raw replay through a :class:`StandIn`."""
    rt = StandIn()

    def raw_exec(graph):
        rt.graphs[id(graph)] = graph
        return id(graph)

    monkeypatch.setattr(fake_graphs, "raw_cuda_graph_exec", raw_exec, raising=False)
    monkeypatch.setattr(graphed, "rng_offset", lambda device: 0)
    monkeypatch.setattr(graphed_raw, "cuda_runtime", lambda: rt)
    return rt


def _layers():
    torch.manual_seed(0)
    layers = [moekit.FusedMoE(E, 2, H, 16, params_dtype=torch.float32, device="cpu", backend="triton",
                              eager_graph_tokens=n).eval() for n in (8, 0)]
    w13, w2 = torch.randn(E, 32, H) * 0.1, torch.randn(E, H, 16) * 0.1
    for layer in layers:
        layer.load_expert_weights(w13, w2)
    return layers


@pytest.mark.parametrize("t", [1, 5])  # T = 1 (decode) and a prime T, both exact whole graphs
def test_raw_replay_copies_the_inputs_launches_and_returns_a_fresh_output(raw_graphs, t):
    layer, plain = _layers()
    x, lg = torch.randn(t, H), torch.randn(t, E)
    with torch.no_grad():
        first = layer(x, lg)  # checked call: capture (no raw calls)
        assert raw_graphs.calls == [] and torch.equal(first, plain(x, lg))
        (entry,) = layer._graphs._entries.values()
        assert entry.raw is not None
        outs = []
        for seed in range(3):  # new values in new tensors each call: the copies must carry them
            x, lg = torch.randn(t, H), torch.randn(t, E)
            outs.append((layer(x, lg), plain(x, lg)))
    sx, sl = entry.inputs
    kinds = [c[0] for c in raw_graphs.calls]
    assert kinds == ["copy", "launch", "copy"] * 3  # both inputs in one launch, the graph, the output: stream order
    cin, launch, cout = raw_graphs.calls[-3:]
    assert cin[1:] == ((sx.data_ptr(), x.data_ptr(), x.nbytes, sl.data_ptr(), lg.data_ptr(), lg.nbytes), 7)
    assert launch[1:] == (id(entry.graph), 7)
    assert cout[1][1:] == (entry.out.data_ptr(), entry.out.nbytes, 0, 0, 0) and cout[2] == 7
    for out, ref in outs:  # earlier outputs are fresh tensors the later replays did not overwrite
        assert torch.equal(out, ref)
        assert out.data_ptr() != entry.out.data_ptr()


def _entry_and_rt():
    rt = StandIn()
    static = [torch.zeros(3, H), torch.zeros(3, E)]
    out = torch.zeros(3, H)

    class G:
        def raw_cuda_graph_exec(self):
            return 11

        def replay(self):
            out.copy_(static[0] * 2)

    g = G()
    rt.graphs[11] = g
    return RawReplay.build(g, static, out, rng_used=False, rt=rt), rt, static


@pytest.mark.parametrize("case", [
    "count",          # one input where the graph reads two
    "dtype",          # bf16 rows into an fp32 static input: copy_ casts, bytes would not
    "rows",           # fewer rows than the graph's (a bucket's padding: index_select)
    "width",          # the same bytes in another shape
    "strided",        # a transposed view: copy_ follows the strides
    "subclass",       # a Parameter (a tensor subclass may override anything)
    "device",         # the current device is not the graph's
    "unaligned",      # rows 4 bytes past a 16-byte boundary (the copy kernel moves 16-byte units)
])
def test_raw_replay_declines_before_enqueuing_anything(case):
    raw, rt, static = _entry_and_rt()
    x, lg = torch.randn(3, H), torch.randn(3, E)
    if case == "count":
        inputs = (x,)
    elif case == "dtype":
        inputs = (x.bfloat16(), lg)
    elif case == "rows":
        inputs = (x[:2], lg[:2])
    elif case == "width":
        inputs = (torch.randn(3 * H // 2, 2), lg)
    elif case == "strided":
        inputs = (torch.randn(H, 3).t(), lg)
    elif case == "subclass":
        inputs = (torch.nn.Parameter(x, requires_grad=False), lg)
    elif case == "unaligned":
        inputs = (torch.randn(3 * H + 1)[1:].view(3, H), lg)
    else:
        inputs, rt.device = (x, lg), 0
    assert raw.replay(inputs, copy=True) is None
    assert rt.calls == []
    if case == "device":
        assert raw.replay((x, lg), copy=False) is None and rt.calls == []
    else:  # the exact inputs do take the path
        assert raw.replay((x, lg), copy=False) is raw.out
        assert torch.equal(static[0], x) and torch.equal(static[1], lg) and torch.equal(raw.out, 2 * x)


def test_raw_replay_not_built(monkeypatch):
    raw, rt, static = _entry_and_rt()
    g, out = raw.graph, raw.out
    assert RawReplay.build(g, static, out, rng_used=True, rt=rt) is None  # the graph draws random numbers
    assert RawReplay.build(object(), static, out, rng_used=False, rt=rt) is None  # torch without the executable
    monkeypatch.setattr(graphed_raw, "cuda_runtime", lambda: None)  # no libcudart mapped (static link, CPU build)
    assert RawReplay.build(g, static, out, rng_used=False) is None
    monkeypatch.setattr(graphed_raw, "cuda_runtime", lambda: rt)
    assert RawReplay.build(g, static, out, rng_used=False) is not None
    assert RawReplay.build(g, [torch.zeros(H, 3).t()], out, rng_used=False, rt=rt) is None  # strided static
    assert RawReplay.build(g, static, torch.zeros(H, 3).t(), rng_used=False, rt=rt) is None  # strided output
    assert RawReplay.build(g, [torch.zeros(3, 3)], out, rng_used=False, rt=rt) is None  # 36 bytes: not 16-byte units
    assert RawReplay.build(g, static * 2, out, rng_used=False, rt=rt) is None  # the copy kernel takes two inputs
    g.raw_cuda_graph_exec = lambda: 0  # not instantiated
    assert RawReplay.build(g, static, out, rng_used=False, rt=rt) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build has the runtime")
def test_no_runtime_on_a_cpu_build():
    assert graphed_raw.cuda_runtime() is None
