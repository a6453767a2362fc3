"""Graph replays through the CUDA runtime's C functions (``experts/graphed_raw.py``), on CPU. A stand-in runtime
keeps the copy kernel's nodes (captured as self-copies), takes their parameter updates through the real
``cudaKernelNodeParams`` structures, and on a launch runs the copy-in node, the fake graph and the copy-out node with
``ctypes.memmove``; a torch-op replay of the fake graph runs the nodes too, as a real graph would. So the arguments,
the one launch per call, the fresh output, the nodes set back to self-copies before a torch-op replay and every input
the raw path must decline run without a GPU. (On a GPU: tests/experts/test_graphed_gpu.py compares the raw replays
with the torch ops bit for bit.)"""

import ctypes
import types

import pytest
import torch

import moekit
from moekit.experts import graphed, graphed_raw
from moekit.experts.graphed_raw import KernelNodeParams, RawCapture

H, E = 32, 8
FUNC = 99  # what the stand-in's nodes report as their function


class StandIn:
    """``CudaRuntime`` on host memory, recorded in ``calls``."""

    def __init__(self):
        self.calls, self.nodes, self.pending, self.graph_nodes, self.graphs = [], {}, [], {}, {}
        self.device, self.found, self.warm = -1, True, 0

    def current_device(self):
        return self.device

    def stream(self, device):
        return 7

    def copy(self, args, stream):  # inside a capture: a node with these argument values
        if not args.vals[2] and not args.vals[5]:  # the empty launch before a capture (loads the kernel)
            self.warm += 1
            return
        node = 1000 + len(self.nodes)
        self.nodes[node] = list(args.vals)
        self.pending.append(node)

    def copy_nodes(self, graph, first):
        ids, self.pending = self.pending, []
        assert self.nodes[ids[0]] == list(first.vals)  # the root: the first launch of the capture
        self.graph_nodes[graph] = ids
        return {tuple(self.nodes[n]): (n, FUNC) for n in ids} if self.found else {}

    def set_params(self, graph_exec, node, args):
        p = KernelNodeParams.from_address(args.params_addr)
        assert p.func == FUNC and (p.gridDim.x, p.blockDim.x) == (args.grid.x, 256)
        ptrs = ctypes.cast(p.kernelParams, ctypes.POINTER(ctypes.c_void_p))
        self.nodes[node] = [ctypes.c_uint64.from_address(ptrs[i]).value for i in range(6)]
        self.calls.append(("set", node, tuple(self.nodes[node])))

    def launch(self, graph_exec, stream):
        self.calls.append(("launch", graph_exec, stream))
        self.graphs[graph_exec].replay()

    def run(self, node):
        d0, s0, n0, d1, s1, n1 = self.nodes[node]
        for d, s, n in ((d0, s0, n0), (d1, s1, n1)):
            if n:
                ctypes.memmove(d, s, 16 * n)


@pytest.fixture
def raw_graphs(fake_graphs, monkeypatch):
    """fake_graphs whose captures take the raw path through a :class:`StandIn` (returned)."""
    rt = StandIn()
    plain_replay = fake_graphs.replay

    def replay(graph):  # a real graph runs its copy nodes too
        nodes = rt.graph_nodes.get(id(graph), [])
        if nodes:
            rt.run(nodes[0])
        plain_replay(graph)
        for n in nodes[1:]:
            rt.run(n)

    def raw_graph(graph):
        rt.graphs[id(graph)] = graph
        return id(graph)

    monkeypatch.setattr(fake_graphs, "replay", replay)
    monkeypatch.setattr(fake_graphs, "raw_cuda_graph", raw_graph, raising=False)
    monkeypatch.setattr(fake_graphs, "raw_cuda_graph_exec", raw_graph, raising=False)
    monkeypatch.setattr(fake_graphs, "instantiate", lambda graph: None, raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=7))
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
def test_raw_replay_sets_the_copy_nodes_and_launches_once(raw_graphs, t):
    layer, plain = _layers()
    x, lg = torch.randn(t, H), torch.randn(t, E)
    with torch.no_grad():
        first = layer(x, lg)  # checked call: capture (an empty launch, two self-copy nodes, no graph launch)
        assert raw_graphs.calls == [] and raw_graphs.warm == 1 and torch.equal(first, plain(x, lg))
        (entry,) = layer._graphs._entries.values()
        sx, sl = entry.inputs
        n_in, n_out = raw_graphs.graph_nodes[id(entry.graph)]
        assert raw_graphs.nodes[n_in] == [sx.data_ptr(), sx.data_ptr(), x.nbytes // 16,
                                          sl.data_ptr(), sl.data_ptr(), lg.nbytes // 16]
        assert raw_graphs.nodes[n_out] == [entry.out.data_ptr(), entry.out.data_ptr(), entry.out.nbytes // 16, 0, 0, 0]
        outs = []
        for seed in range(3):  # new values in new tensors each call: the copy-in node must carry them
            x, lg = torch.randn(t, H), torch.randn(t, E)
            outs.append((layer(x, lg), plain(x, lg)))
            (set_in, set_out, launch) = raw_graphs.calls[-3:]
            assert set_in == ("set", n_in, (sx.data_ptr(), x.data_ptr(), x.nbytes // 16,
                                            sl.data_ptr(), lg.data_ptr(), lg.nbytes // 16))
            assert set_out == ("set", n_out, (outs[-1][0].data_ptr(), entry.out.data_ptr(), entry.out.nbytes // 16,
                                              0, 0, 0))
            assert launch == ("launch", id(entry.graph), 7)
    assert len(raw_graphs.calls) == 9  # per call: two parameter updates and one launch, nothing else
    for out, ref in outs:  # earlier outputs are fresh tensors the later replays did not overwrite
        assert torch.equal(out, ref) and out.data_ptr() != entry.out.data_ptr()


def test_declined_call_sets_the_nodes_back_before_the_torch_ops(raw_graphs):
    """A strided input after raw replays: the copy nodes become self-copies again, then the torch ops replay (a stale
    copy-in node would overwrite the rows copy_ wrote with the last raw call's input, still alive here)."""
    layer, plain = _layers()
    with torch.no_grad():
        kept = [torch.randn(3, H) for _ in range(3)]
        lg = torch.randn(3, E)
        for x in kept:
            layer(x, lg)
        (entry,) = layer._graphs._entries.values()
        n_in, n_out = raw_graphs.graph_nodes[id(entry.graph)]
        strided = torch.randn(H, 3).t()
        before = len(raw_graphs.calls)
        out = layer(strided, lg)
        assert torch.equal(out, plain(strided, lg))
        sx, sl = entry.inputs
        assert raw_graphs.calls[before:] == [
            ("set", n_in, (sx.data_ptr(), sx.data_ptr(), sx.nbytes // 16, sl.data_ptr(), sl.data_ptr(), lg.nbytes // 16)),
            ("set", n_out, (entry.out.data_ptr(), entry.out.data_ptr(), entry.out.nbytes // 16, 0, 0, 0))]
        before = len(raw_graphs.calls)
        assert torch.equal(layer(strided, lg), plain(strided, lg)) and len(raw_graphs.calls) == before  # still neutral
        assert torch.equal(layer(kept[0], lg), plain(kept[0], lg))  # and raw again


def _capture(rt, static, out_like, found=True):
    """A RawReplay of a fake graph (output = 2 x the first input), through RawCapture as GraphCache.capture does."""
    out = torch.zeros_like(out_like)

    class G:
        def raw_cuda_graph(self):
            rt.graphs[11] = self
            return 11

        raw_cuda_graph_exec = raw_cuda_graph

        def instantiate(self):
            pass

        def replay(self):
            nodes = rt.graph_nodes[11]
            rt.run(nodes[0])
            out.copy_(static[0][:, : out.shape[1]] * 2)
            for n in nodes[1:]:
                rt.run(n)

    rt.found = found
    cap = RawCapture.begin(static, rng_used=False, rt=rt)
    cap.copy_in()
    cap.copy_out(out)
    return cap.finish(G(), out), out


@pytest.fixture
def stream7(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "raw_cuda_graph", None, raising=False)


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
def test_raw_replay_declines_before_changing_anything(stream7, case):
    rt = StandIn()
    static = [torch.zeros(3, H), torch.zeros(3, E)]
    raw, out = _capture(rt, static, static[0])
    x, lg = torch.randn(3, H), torch.randn(3, E)
    inputs = {"count": (x,), "dtype": (x.bfloat16(), lg), "rows": (x[:2], lg[:2]), "width": (torch.randn(48, 2), lg),
              "strided": (torch.randn(H, 3).t(), lg), "subclass": (torch.nn.Parameter(x, requires_grad=False), lg),
              "device": (x, lg), "unaligned": (torch.randn(3 * H + 1)[1:].view(3, H), lg)}[case]
    rt.device = 0 if case == "device" else -1
    assert raw.replay(inputs, copy=True) is None and rt.calls == []
    if case != "device":  # the exact inputs do take the path
        got = raw.replay((x, lg), copy=True)
        assert torch.equal(got, 2 * x) and got.data_ptr() != out.data_ptr()
        assert torch.equal(static[0], x) and torch.equal(static[1], lg)
        assert raw.replay((x, lg), copy=False) is out and torch.equal(out, 2 * x)
        assert [c[0] for c in rt.calls] == ["set", "set", "launch", "set", "set", "launch"]  # out node reset once
        raw.replay((x, lg), copy=False)
        assert [c[0] for c in rt.calls[6:]] == ["set", "launch"]  # still a self-copy: not set again


def test_without_an_output_node_the_output_is_cloned(stream7):
    rt = StandIn()
    static = [torch.zeros(3, H)]
    raw, out = _capture(rt, static, torch.zeros(3, 3))  # 36 bytes: no output node
    x = torch.randn(3, H)
    got = raw.replay((x,), copy=True)
    assert torch.equal(got, 2 * x[:, :3]) and got.data_ptr() != out.data_ptr()
    assert [c[0] for c in rt.calls] == ["set", "launch"] and len(rt.graph_nodes[11]) == 1


def test_raw_replay_not_built(stream7, monkeypatch):
    rt = StandIn()
    static = [torch.zeros(3, H), torch.zeros(3, E)]
    assert RawCapture.begin(static, rng_used=True, rt=rt) is None  # the graph draws random numbers
    assert RawCapture.begin(static * 2, rng_used=False, rt=rt) is None  # the copy kernel takes two inputs
    assert RawCapture.begin([torch.zeros(3, 3)], rng_used=False, rt=rt) is None  # 36 bytes: not 16-byte units
    assert RawCapture.begin([torch.zeros(H, 3).t()], rng_used=False, rt=rt) is None  # strided
    assert RawCapture.begin([torch.zeros(4 * H + 1)[1:].view(4, H)], rng_used=False, rt=rt) is None  # unaligned
    monkeypatch.setattr(graphed_raw, "cuda_runtime", lambda: None)  # no libcudart mapped (static link, CPU build)
    assert RawCapture.begin(static, rng_used=False) is None
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "CUDAGraph", type("OldGraph", (), {}))  # torch without the kept graph
        assert RawCapture.begin(static, rng_used=False, rt=rt) is None
    assert _capture(rt, static, static[0], found=False)[0] is None  # nodes not found: the torch ops (self-copies)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build has the runtime")
def test_no_runtime_on_a_cpu_build():
    assert graphed_raw.cuda_runtime() is None
