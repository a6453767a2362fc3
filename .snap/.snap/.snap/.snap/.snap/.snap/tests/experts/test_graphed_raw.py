"""Graph replays in one submission (``experts/graphed_raw.py``), on CPU: :class:`FakeDriver` is the real
``CudaDriver`` with its C functions replaced by Python ones on host memory. They read what the driver reads (node
parameters and the kernel's arguments through their pointers, copied at add / set time); a launch runs the wrapper's
nodes in dependency order: the copies with ``ctypes.memmove``, the child by replaying the fake graph. So the
wrapper's shape, the values each launch copies, fresh outputs, skipped updates and every input the path must decline
run without a GPU. (On a GPU: tests/experts/test_graphed_gpu.py compares the raw replays with the torch ops bit for
bit.)"""

import ctypes
import os

import pytest
import torch

import moekit
from moekit.experts import graphed, graphed_raw
from moekit.experts.graphed_raw import CopyNode, KernelParams, RawReplay, keeps_graph

H, E = 32, 8
FUNC = 99


def _out(addr: int, value: int) -> None:
    ctypes.c_void_p.from_address(addr).value = value


def _read(params_addr: int) -> tuple:
    """(func, grid, block, the six argument values) of the parameters at ``params_addr``."""
    p = KernelParams.from_address(params_addr)
    args = ctypes.cast(p.kernelParams, ctypes.POINTER(ctypes.c_void_p))
    vals = tuple(ctypes.c_uint64.from_address(args[i]).value for i in range(6))
    return p.func, p.gridDimX, p.blockDimX, vals


def _run(node: tuple) -> None:
    """``moekit_copy2``: ``n0`` 16-byte units ``src0 -> dst0``, ``n1`` units ``src1 -> dst1``; the grid covers them."""
    func, grid, block, (d0, s0, n0, d1, s1, n1) = node
    assert func == FUNC and block == 256 and 1 <= grid <= 1024 and (grid == 1024 or grid * 256 >= max(n0, n1))
    for d, s, n in ((d0, s0, n0), (d1, s1, n1)):
        if n:
            ctypes.memmove(d, s, 16 * n)


class FakeDriver(graphed_raw.CudaDriver):
    """See the module docstring. ``calls``: (name, ...) per C call; ``fail``: the C function that returns error 700."""

    def __init__(self):
        self.calls, self.bodies, self.graphs, self.execs = [], {}, {}, {}
        self.device, self.warned, self.path, self.fail, self._kernel = -1, False, "fake", None, 42
        self.stream = lambda device: 7
        self.current_device = lambda: self.device
        self.ctx = [1]  # the context stack (the graph's device's context: 1)
        for name in ("function", "kernel_launch", "create", "add_kernel", "add_child", "instantiate", "set",
                     "graph_launch", "exec_destroy", "graph_destroy", "error", "ctx_get", "ctx_push", "ctx_pop"):
            setattr(self, "_" + name, self._recorded(name, getattr(self, "c_" + name)))

    def _recorded(self, name, fn):
        def call(*args):
            self.calls.append((name, *args))
            return 700 if self.fail == name else fn(*args)
        return call

    def body(self, graph) -> int:
        """``raw_cuda_graph()`` of a fake graph: a handle the wrapper's child node refers to."""
        self.bodies[id(graph)] = graph
        return id(graph)

    def c_function(self, addr, kernel):
        _out(addr, FUNC)
        return 0

    def c_kernel_launch(self, func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        p = KernelParams(func, gx, 1, 1, bx, 1, 1, 0, params)
        _run(_read(ctypes.addressof(p)))
        return 0

    def c_create(self, addr, flags):
        handle = 1000 + len(self.graphs)
        self.graphs[handle] = {}
        _out(addr, handle)
        return 0

    def _node(self, addr, graph, deps, n, what):
        handle = 5000 + len(self.graphs[graph])
        dep = ctypes.c_void_p.from_address(deps).value if n else None
        assert n == (1 if dep else 0)
        self.graphs[graph][handle] = (dep, what)
        _out(addr, handle)
        return 0

    def c_add_kernel(self, addr, graph, deps, n, params):
        return self._node(addr, graph, deps, n, _read(params))

    def c_add_child(self, addr, graph, deps, n, body):
        return self._node(addr, graph, deps, n, self.bodies[body])

    def c_instantiate(self, addr, graph, flags):
        handle = 9000 + len(self.execs)
        self.execs[handle] = dict(self.graphs[graph])  # values copied: later writes reach it only by set
        _out(addr, handle)
        return 0

    def c_set(self, graph_exec, node, params):
        dep, _ = self.execs[graph_exec][node]
        self.execs[graph_exec][node] = (dep, _read(params))
        return 0

    def c_graph_launch(self, graph_exec, stream):
        assert self.ctx[-1] == 1, "launched while another device's context is current"
        nodes, done = self.execs[graph_exec], None
        for _ in nodes:  # dependency order: the chain from the root
            node = next(h for h, (dep, _) in nodes.items() if dep == done)
            what = nodes[node][1]
            what.replay() if hasattr(what, "replay") else _run(what)
            done = node
        return 0

    def c_exec_destroy(self, graph_exec):
        del self.execs[graph_exec]
        return 0

    def c_graph_destroy(self, graph):
        del self.graphs[graph]
        return 0

    def c_ctx_get(self, addr):
        _out(addr, self.ctx[-1])
        return 0

    def c_ctx_push(self, ctx):
        self.ctx.append(ctx)
        return 0

    def c_ctx_pop(self, addr):
        assert addr is None and len(self.ctx) > 1
        self.ctx.pop()
        return 0

    def c_error(self, rc, addr):
        ctypes.c_char_p.from_address(addr).value = b"stand-in error"
        return 0

    def names(self) -> list:
        return [c[0] for c in self.calls]


@pytest.fixture
def raw_graphs(fake_graphs, monkeypatch):
    """fake_graphs, with every captured graph given a raw replay through a :class:`FakeDriver`."""
    cu = FakeDriver()
    monkeypatch.setattr(fake_graphs, "raw_cuda_graph", lambda graph: cu.body(graph), raising=False)
    monkeypatch.setattr(graphed, "rng_offset", lambda device: 0)
    monkeypatch.setattr(graphed_raw, "cuda_driver", lambda: cu)
    return cu


def _layers():
    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine (tests/conftest.py): CPU layers on the Triton
        pytest.skip("CPU layers on the Triton backend need the interpreter")  # backend need the interpreter
    torch.manual_seed(0)
    layers = [moekit.FusedMoE(E, 2, H, 16, params_dtype=torch.float32, device="cpu", backend="triton",
                              eager_graph_tokens=n).eval() for n in (8, 0)]
    w13, w2 = torch.randn(E, 32, H) * 0.1, torch.randn(E, H, 16) * 0.1
    for layer in layers:
        layer.load_expert_weights(w13, w2)
    return layers


@pytest.mark.parametrize("t", [1, 5])  # T = 1 (decode) and a prime T, both exact whole graphs
def test_one_launch_copies_the_inputs_and_returns_a_fresh_output(raw_graphs, t):
    layer, plain = _layers()
    x, lg = torch.randn(t, H), torch.randn(t, E)
    with torch.no_grad():
        first = layer(x, lg)  # checked call: capture and wrap
        assert torch.equal(first, plain(x, lg))
        (entry,) = layer._graphs._entries.values()
        assert entry.raw is not None and not entry.graph.instantiated  # torch's own: at a torch-op replay only
        assert raw_graphs.names() == ["function", "ctx_get", "create", "add_kernel", "add_child", "add_kernel",
                                      "instantiate"]
        sx, sl = entry.inputs
        (n_in, (_, (*_, vals_in))), (_, (_, child)), (n_out, (_, (*_, vals_out))) = \
            raw_graphs.graphs[entry.raw.wrapper].items()
        assert child is entry.graph  # copy-in -> the captured graph -> copy-out, as added
        assert vals_in == (sx.data_ptr(), sx.data_ptr(), sx.nbytes // 16, sl.data_ptr(), sl.data_ptr(),
                           sl.nbytes // 16)  # self-copies until set
        raw_graphs.calls.clear()
        kept = []  # inputs kept alive: new addresses each call, so each call sets the copy-in node
        for seed in range(3):
            x, lg = torch.randn(t, H), torch.randn(t, E)
            kept.append((x, lg, layer(x, lg), plain(x, lg)))
    assert raw_graphs.names() == ["set", "set", "graph_launch"] * 3  # one submission per call, after the updates
    nodes = raw_graphs.execs[entry.raw.graph_exec]
    x, lg, out, _ = kept[-1]
    assert nodes[n_in][1][3] == (sx.data_ptr(), x.data_ptr(), x.nbytes // 16, sl.data_ptr(), lg.data_ptr(),
                                 lg.nbytes // 16)
    assert nodes[n_out][1][3] == (out.data_ptr(), entry.out.data_ptr(), out.nbytes // 16, 0, 0, 0)
    for x, lg, out, ref in kept:  # earlier outputs are fresh tensors the later replays did not overwrite
        assert torch.equal(out, ref)
        assert out.data_ptr() != entry.out.data_ptr()


def _raw(cu=None, static_shapes=((3, H), (3, E))):
    cu = FakeDriver() if cu is None else cu
    static = [torch.zeros(s) for s in static_shapes]
    out = torch.zeros(3, H)

    class G:
        instantiated = False

        def raw_cuda_graph(self):
            return cu.body(self)

        def instantiate(self):
            self.instantiated = True

        def replay(self):
            out.copy_(static[0] * 2)

    g = G()
    return RawReplay.build(g, static, out, cu=cu), cu, static, g


def test_unchanged_nodes_are_not_set_again_and_copy_false_returns_the_static_output():
    raw, cu, static, g = _raw()
    x, lg = torch.randn(3, H), torch.randn(3, E)
    cu.calls.clear()
    assert raw.replay((x, lg), copy=False) is raw.out and torch.equal(raw.out, 2 * x)
    assert cu.names() == ["set", "set", "graph_launch"]  # the copy-out node: no units
    (_, (_, copy_out)) = list(cu.execs[raw.graph_exec].items())[2]
    assert copy_out[3][2] == 0 and copy_out[1] == 1  # nothing to copy: one block
    x.mul_(3)
    cu.calls.clear()
    assert raw.replay((x, lg), copy=False) is raw.out and torch.equal(raw.out, 2 * x)  # the same tensors, new values
    assert cu.names() == ["graph_launch"]
    out = raw.replay((x, lg), copy=True)
    assert torch.equal(out, 2 * x) and out.data_ptr() != raw.out.data_ptr()
    assert cu.names() == ["graph_launch", "set", "graph_launch"]  # only the copy-out node changed


@pytest.mark.parametrize("case", [
    "count",          # one input where the graph reads two
    "dtype",          # bf16 rows into an fp32 static input: copy_ casts, bytes would not
    "rows",           # fewer rows than the graph's (a bucket's padding: index_select)
    "width",          # the same bytes in another shape
    "strided",        # a transposed view: copy_ follows the strides
    "subclass",       # a Parameter (a tensor subclass may override anything)
    "unaligned",      # rows 4 bytes past a 16-byte boundary (the copy kernel moves 16-byte units)
])
def test_raw_replay_declines_before_changing_anything(case):
    raw, cu, static, _ = _raw()
    cu.calls.clear()
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
    else:
        inputs = (torch.randn(3 * H + 1)[1:].view(3, H), lg)
    assert raw.replay(inputs, copy=True) is None
    assert cu.calls == []
    assert raw.replay((x, lg), copy=False) is raw.out  # the exact inputs do take the path
    assert torch.equal(static[0], x) and torch.equal(static[1], lg) and torch.equal(raw.out, 2 * x)


def test_another_device_current_pushes_the_graphs_context():
    raw, cu, static, _ = _raw()
    cu.device, cu.ctx = 0, [1, 0]  # device 0 (context 0) current; the graph is the CPU's stand-in device -1
    cu.calls.clear()
    x, lg = torch.randn(3, H), torch.randn(3, E)
    out = raw.replay((x, lg), copy=True)
    assert torch.equal(out, 2 * x)
    assert cu.names() == ["ctx_push", "set", "set", "graph_launch", "ctx_pop"] and cu.ctx == [1, 0]
    assert cu.calls[0] == ("ctx_push", 1)
    cu.fail = "graph_launch"
    with pytest.raises(RuntimeError, match="cuGraphLaunch failed"):
        raw.replay((x, lg), copy=True)
    assert cu.names()[-1] == "ctx_pop" and cu.ctx == [1, 0]  # popped after a failure too


def test_one_input():
    raw, cu, static, _ = _raw(static_shapes=((3, H),))
    x = torch.randn(3, H)
    out = raw.replay((x,), copy=True)
    assert torch.equal(out, 2 * x) and torch.equal(static[0], x)
    assert list(cu.execs[raw.graph_exec].values())[0][1][3][3:] == (0, 0, 0)


def test_graphs_that_keep_the_torch_ops(monkeypatch):
    cu = FakeDriver()
    monkeypatch.setattr(graphed_raw, "cuda_driver", lambda: cu)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "raw_cuda_graph", lambda self: 0, raising=False)
    static = [torch.zeros(3, H), torch.zeros(3, E)]
    assert keeps_graph(static, rng_used=False)
    assert not keeps_graph(static, rng_used=True)  # the graph draws random numbers
    assert not keeps_graph(static * 2, rng_used=False)  # the copy kernel takes two inputs
    assert not keeps_graph([torch.zeros(H, 3).t()], rng_used=False)  # strided static
    assert not keeps_graph([torch.zeros(3, 3)], rng_used=False)  # 36 bytes: not 16-byte units
    monkeypatch.setattr(graphed_raw, "cuda_driver", lambda: None)  # no driver (CPU build), CUDA not initialised
    assert not keeps_graph(static, rng_used=False)
    # a PyTorch that does not keep graphs; a class without the method (deleting the Python override is not enough on a
    # CUDA build, whose C++ base torch._C._CUDAGraph has raw_cuda_graph too)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("CUDAGraph", (), {}))
    monkeypatch.setattr(graphed_raw, "cuda_driver", lambda: cu)
    assert not keeps_graph(static, rng_used=False)


def test_build_declines_and_driver_refusals():
    raw, cu, static, g = _raw()
    assert not g.instantiated  # a raw replay: torch's own executable left to its first replay
    assert RawReplay.build(g, static, torch.zeros(H, 3).t(), cu=cu) is None  # strided output
    assert g.instantiated  # no raw replay: torch's own executable now, as for any graph
    cu.fail = "add_child"  # e.g. a captured graph the driver will not nest
    with pytest.warns(UserWarning, match="cuGraphAddChildGraphNode failed with CUDA error 700: stand-in error"):
        assert RawReplay.build(g, static, raw.out, cu=cu) is None
    assert cu.names()[-2:] == ["error", "graph_destroy"]  # the half-built wrapper freed
    cu.fail = "instantiate"
    assert RawReplay.build(g, static, raw.out, cu=cu) is None  # warned once per process: no second warning
    cu.fail = "set"
    with pytest.raises(RuntimeError, match="cuGraphExecKernelNodeSetParams failed with CUDA error 700"):
        raw.replay((torch.randn(3, H), torch.randn(3, E)), copy=True)  # a failure at a replay is raised


def test_the_wrapper_is_freed_with_its_replay():
    raw, cu, _, _ = _raw()
    wrapper, graph_exec = raw.wrapper, raw.graph_exec
    del raw
    assert ("exec_destroy", graph_exec) in cu.calls and ("graph_destroy", wrapper) in cu.calls
    assert cu.execs == {} and cu.graphs == {}


def test_copy_launch_reads_its_arguments():
    cu = FakeDriver()
    src = [torch.arange(4 * n, dtype=torch.float32) for n in (300, 5)]
    dst = [torch.zeros_like(s) for s in src]
    node = CopyNode(FUNC, (dst[0].data_ptr(), src[0].data_ptr(), 300, dst[1].data_ptr(), src[1].data_ptr(), 5))
    assert node.params.gridDimX == 2
    cu.copy(node, 7)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build has the driver")
def test_no_driver_on_a_cpu_build():
    assert graphed_raw.cuda_driver() is None


def test_copy_function_without_a_current_context():
    # cuKernelGetFunction with no context current on the thread (PyTorch makes one current at its first CUDA op, not
    # at torch.cuda.init()): a RuntimeError saying so, not the driver's bare error 201; with a context, 201 stays
    # the driver's error
    cu = FakeDriver()
    cu.c_function = lambda addr, kernel: 201
    cu._function = cu._recorded("function", cu.c_function)
    cu.ctx = [0]
    with pytest.raises(RuntimeError, match="no current CUDA context on this thread"):
        cu.function()
    cu.ctx = [1]
    with pytest.raises(RuntimeError, match="cuKernelGetFunction failed with CUDA error 201"):
        cu.function()
