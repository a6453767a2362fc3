"""A graph replay in one submission: the input and output copies are nodes of a graph around the captured one,
pointed at each call's tensors through the CUDA driver's C functions, without the dispatcher's host time.

At capture, :meth:`RawReplay.build` wraps PyTorch's captured graph (kept: ``CUDAGraph(keep_graph=True)``) as the
child of a graph of three nodes, and instantiates it::

    copy-in  (a node of the copy kernel: static_x <- x, static_logits <- logits)          (copy_ / _foreach_copy_)
      -> child (the captured graph)                                                       (graph.replay())
      -> copy-out (out <- static_out; no units with copy=False)                           (clone())

A replay points the two copy nodes at this call's tensors (``cuGraphExecKernelNodeSetParams``, only when their
values changed) and launches once (``cuGraphLaunch``) on the current stream of the graph's device, as the torch ops
would. The bytes copied are the same, so the output bits are the same (GPU tests compare both paths). A parameter
update changes the executable graph's next launches only: launches already enqueued keep the values they were
launched with. PyTorch's own executable of the captured graph is separate: instantiated on the first torch-op
replay (an input the raw replay declines), which replays it as before.

Why: on the H200 host (round 26, ``benchmarks/eager_profile.py``) torch's ``_foreach_copy_`` took 14-22 µs to
enqueue, ``clone`` 9-14.5 and ``replay`` 4-6; round 26's replay by runtime calls (one kernel launch for both input
copies, ``cudaGraphLaunch``, one launch for the output) 20-32 µs, of which each copy launch 6-9 µs. One submission
takes the two copy launches off the host.

Why the driver: the runtime's graph-node calls do not take a kernel loaded with the library API (round 26:
``cudaGraphKernelNodeGetParams`` answered error 98 for such nodes); the driver's take the kernel's ``CUfunction``.
The copy kernel (:data:`COPY_PTX`, 16 bytes per thread and step, grid-stride) is loaded once per process from PTX
(``cuLibraryLoadData``), its function per device at capture (``cuKernelGetFunction``).

A replay takes this path only when every input is the plain, contiguous, 16-byte aligned tensor the graph's static
input expects (same dtype, shape and device); otherwise :meth:`RawReplay.replay` returns None before changing anything
and the caller runs the torch ops (the same bits). When another device is current, the graph's context is pushed
around the driver calls (``cuCtxPushCurrent``). A
graph gets a :class:`RawReplay` only when the process can load the CUDA driver (``libcuda.so.1``) with the
library-loading API (CUDA >= 12), PyTorch keeps captured graphs for its caller (``keep_graph``, ``raw_cuda_graph``),
the graph has one or two inputs, every static tensor is a whole number of aligned 16-byte units, and its eager
warm-up drew nothing from the default CUDA generator (a graph that uses random numbers needs ``graph.replay()``'s
generator update). A driver refusal at capture (e.g. a captured graph the driver will not nest) keeps the torch ops
for that graph, with one warning per process.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from typing import Sequence

import torch

_Tensor = torch.Tensor
_THREADS = 256
_MAX_BLOCKS = 1024

#: ``moekit_copy2(dst0, src0, n0, dst1, src1, n1)``: copy ``n0`` 16-byte units from ``src0`` to ``dst0`` and ``n1``
#: from ``src1`` to ``dst1`` (grid-stride loops; pointers 16-byte aligned). JIT-compiled by the driver once
#: (:class:`CudaDriver`).
COPY_PTX = b"""
.version 7.0
.target sm_70
.address_size 64

.visible .entry moekit_copy2(
    .param .u64 p_d0, .param .u64 p_s0, .param .u64 p_n0,
    .param .u64 p_d1, .param .u64 p_s1, .param .u64 p_n1)
{
    .reg .pred %p<3>;
    .reg .b32 %r<9>;
    .reg .b64 %rd<14>;

    ld.param.u64 %rd1, [p_d0];
    ld.param.u64 %rd2, [p_s0];
    ld.param.u64 %rd3, [p_n0];
    ld.param.u64 %rd4, [p_d1];
    ld.param.u64 %rd5, [p_s1];
    ld.param.u64 %rd6, [p_n1];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd4, %rd4;
    cvta.to.global.u64 %rd5, %rd5;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd7, %r1, %r2;
    cvt.u64.u32 %rd8, %r3;
    add.u64 %rd7, %rd7, %rd8;
    mul.wide.u32 %rd9, %r4, %r2;
    mov.u64 %rd10, %rd7;
LOOP0:
    setp.ge.u64 %p1, %rd10, %rd3;
    @%p1 bra DONE0;
    shl.b64 %rd11, %rd10, 4;
    add.u64 %rd12, %rd2, %rd11;
    ld.global.v4.u32 {%r5, %r6, %r7, %r8}, [%rd12];
    add.u64 %rd13, %rd1, %rd11;
    st.global.v4.u32 [%rd13], {%r5, %r6, %r7, %r8};
    add.u64 %rd10, %rd10, %rd9;
    bra LOOP0;
DONE0:
    mov.u64 %rd10, %rd7;
LOOP1:
    setp.ge.u64 %p2, %rd10, %rd6;
    @%p2 bra DONE1;
    shl.b64 %rd11, %rd10, 4;
    add.u64 %rd12, %rd5, %rd11;
    ld.global.v4.u32 {%r5, %r6, %r7, %r8}, [%rd12];
    add.u64 %rd13, %rd4, %rd11;
    st.global.v4.u32 [%rd13], {%r5, %r6, %r7, %r8};
    add.u64 %rd10, %rd10, %rd9;
    bra LOOP1;
DONE1:
    ret;
}
"""


class KernelParams(ctypes.Structure):
    """``CUDA_KERNEL_NODE_PARAMS_v2`` (``func`` set: ``kern`` and ``ctx`` unused)."""
    _fields_ = [("func", ctypes.c_void_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint), ("kernelParams", ctypes.c_void_p),
                ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


def _grid(n0: int, n1: int) -> int:
    return min(max(1, -(-max(n0, n1) // _THREADS)), _MAX_BLOCKS)


class CopyNode:
    """One node (or launch) of ``moekit_copy2(dst0, src0, n0, dst1, src1, n1)``: its six arguments in the kernel's
    order (``vals``, which the driver reads through ``ptrs`` and ``params``), its handle once added to a graph, and the
    values the executable graph holds (``last``). ``n0`` / ``n1``: 16-byte units of the two copies (0: none)."""

    __slots__ = ("vals", "ptrs", "params", "handle", "last")

    def __init__(self, func: int, vals: Sequence[int]):
        self.vals = (ctypes.c_uint64 * 6)(*vals)
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * 6)(*(base + 8 * i for i in range(6)))
        self.params = KernelParams(func, _grid(vals[2], vals[5]), 1, 1, _THREADS, 1, 1, 0, ctypes.addressof(self.ptrs))
        self.handle = 0
        self.last = tuple(vals)

    def write(self, vals: tuple) -> None:
        """Put ``vals`` where the driver reads them (and the grid that covers them)."""
        self.vals[:] = vals
        self.params.gridDimX = _grid(vals[2], vals[5])


class CudaDriver:
    """The CUDA driver calls this path needs (``libcuda.so.1``, bound with ``ctypes``; calls release the GIL): the
    copy kernel loaded, a wrapper graph built and instantiated, its copy nodes set, launches; and PyTorch's
    current-stream and current-device queries."""

    def __init__(self, path: str = "libcuda.so.1"):
        lib = ctypes.CDLL(path)  # loaded by PyTorch already: dlopen finds that copy
        vp, u, fn = ctypes.c_void_p, ctypes.c_uint, self._fn
        load = fn(lib, "cuLibraryLoadData", [vp, ctypes.c_char_p, vp, vp, u, vp, vp, u])
        get = fn(lib, "cuLibraryGetKernel", [vp, vp, ctypes.c_char_p])
        self._function = fn(lib, "cuKernelGetFunction", [vp, vp])
        self._kernel_launch = fn(lib, "cuLaunchKernel", [vp, u, u, u, u, u, u, u, vp, vp, vp])
        self._create = fn(lib, "cuGraphCreate", [vp, u])
        self._add_kernel = fn(lib, "cuGraphAddKernelNode_v2", [vp, vp, vp, ctypes.c_size_t, vp])
        self._add_child = fn(lib, "cuGraphAddChildGraphNode", [vp, vp, vp, ctypes.c_size_t, vp])
        self._instantiate = fn(lib, "cuGraphInstantiateWithFlags", [vp, vp, ctypes.c_ulonglong])
        self._set = fn(lib, "cuGraphExecKernelNodeSetParams_v2", [vp, vp, vp])
        self._graph_launch = fn(lib, "cuGraphLaunch", [vp, vp])
        self._exec_destroy = fn(lib, "cuGraphExecDestroy", [vp])
        self._graph_destroy = fn(lib, "cuGraphDestroy", [vp])
        self._error = fn(lib, "cuGetErrorString", [ctypes.c_int, vp])
        self._ctx_get = fn(lib, "cuCtxGetCurrent", [vp])
        self._ctx_push = fn(lib, "cuCtxPushCurrent_v2", [vp])
        self._ctx_pop = fn(lib, "cuCtxPopCurrent_v2", [vp])
        self._ptx = COPY_PTX  # kept alive with the library
        library, kernel = vp(), vp()
        self._check("cuLibraryLoadData", load(ctypes.addressof(library), self._ptx, None, None, 0, None, None, 0))
        self._check("cuLibraryGetKernel", get(ctypes.addressof(kernel), library, b"moekit_copy2"))
        self._library, self._kernel = library, kernel
        self.path = path
        self.warned = False  # a wrapper refused once (one warning per process)
        self.stream = torch._C._cuda_getCurrentRawStream  # (device index) -> cudaStream_t (a CUstream)
        self.current_device = torch._C._cuda_getDevice

    @staticmethod
    def _fn(lib, name: str, argtypes: list):
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, ctypes.c_int
        return f

    def function(self) -> int:
        """The copy kernel's ``CUfunction`` in the current context (loads it there on first use). ``RuntimeError``
        when the thread has none (PyTorch makes its device's context current at the first CUDA op, not at
        ``torch.cuda.init()``; a graph's replay builds its wrapper after the capture, so it always has one)."""
        func = ctypes.c_void_p()
        rc = self._function(ctypes.addressof(func), self._kernel)
        if rc == 201 and not self.context():  # CUDA_ERROR_INVALID_CONTEXT, and indeed none is current
            raise RuntimeError("moekit's raw graph replay: no current CUDA context on this thread (run a CUDA op on "
                               "the device first)")
        self._check("cuKernelGetFunction", rc)
        return func.value

    def context(self) -> int:
        """The calling thread's current context (a graph's device's, at its capture)."""
        ctx = ctypes.c_void_p()
        self._check("cuCtxGetCurrent", self._ctx_get(ctypes.addressof(ctx)))
        return ctx.value

    def push(self, ctx: int) -> None:
        """Make ``ctx`` current until :meth:`pop` (a replay while another device is current)."""
        self._check("cuCtxPushCurrent", self._ctx_push(ctx))

    def pop(self) -> None:
        self._check("cuCtxPopCurrent", self._ctx_pop(None))

    def copy(self, node: CopyNode, stream: int) -> None:
        """Launch ``node``'s copy on ``stream`` (outside any graph: ``benchmarks/eager_profile.py``, the GPU tests)."""
        p = node.params
        self._check("cuLaunchKernel", self._kernel_launch(p.func, p.gridDimX, 1, 1, _THREADS, 1, 1, 0, stream,
                                                          p.kernelParams, None))

    def wrap(self, body: int, copy_in: CopyNode, copy_out: CopyNode) -> tuple[int, int]:
        """``(graph, executable)``: ``copy_in -> child(body) -> copy_out``, instantiated. The nodes get their
        handles; ``body`` (a ``CUgraph``) is cloned into the child node."""
        handle, graph_exec = ctypes.c_void_p(), ctypes.c_void_p()
        n_in, child, n_out = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        addr = ctypes.addressof
        self._check("cuGraphCreate", self._create(addr(handle), 0))
        graph = handle.value
        try:
            self._check("cuGraphAddKernelNode", self._add_kernel(addr(n_in), graph, None, 0, addr(copy_in.params)))
            self._check("cuGraphAddChildGraphNode", self._add_child(addr(child), graph, addr(n_in), 1, body))
            self._check("cuGraphAddKernelNode", self._add_kernel(addr(n_out), graph, addr(child), 1,
                                                                 addr(copy_out.params)))
            self._check("cuGraphInstantiate", self._instantiate(addr(graph_exec), graph, 0))
        except RuntimeError:
            self._graph_destroy(graph)
            raise
        copy_in.handle, copy_out.handle = n_in.value, n_out.value
        return graph, graph_exec.value

    def set(self, graph_exec: int, node: CopyNode, vals: tuple) -> None:
        """Point ``node`` of ``graph_exec`` at ``vals`` for its next launches (nothing when it holds them)."""
        if vals != node.last:
            node.write(vals)
            self._check("cuGraphExecKernelNodeSetParams", self._set(graph_exec, node.handle,
                                                                     ctypes.addressof(node.params)))
            node.last = vals

    def launch(self, graph_exec: int, stream: int) -> None:
        self._check("cuGraphLaunch", self._graph_launch(graph_exec, stream))

    def destroy(self, graph: int, graph_exec: int) -> None:
        """Free a wrapper (a launch in flight finishes first: the driver frees it then)."""
        self._exec_destroy(graph_exec)
        self._graph_destroy(graph)

    def _check(self, what: str, rc: int) -> None:
        if rc:
            msg = ctypes.c_char_p()
            self._error(rc, ctypes.addressof(msg))
            raise RuntimeError(f"{what} failed with CUDA error {rc}: {(msg.value or b'?').decode(errors='replace')}")


def cuda_driver() -> CudaDriver | None:
    """This process's CUDA driver with the copy kernel loaded (once per process: a library handle, not state), or
    None: CUDA not initialised yet (asked again later), no driver (a CPU build or machine), a driver without the
    library-loading API (CUDA < 12), or PyTorch without the raw-stream query."""
    if not hasattr(torch._C, "_cuda_getCurrentRawStream") or not torch.cuda.is_initialized():
        return None
    return _load_driver()


@functools.lru_cache(maxsize=None)
def _load_driver() -> CudaDriver | None:
    try:
        return CudaDriver()
    except (OSError, AttributeError, RuntimeError):
        return None


def _units(t) -> bool:
    """``t`` is a plain contiguous tensor of whole, aligned 16-byte units."""
    return type(t) is _Tensor and t.is_contiguous() and t.nbytes % 16 == 0 and t.data_ptr() % 16 == 0


def keeps_graph(static: Sequence[_Tensor], rng_used: bool) -> bool:
    """Whether a graph on ``static`` inputs may get a :class:`RawReplay` (capture it with ``keep_graph=True``, then
    :meth:`RawReplay.build`); see the module docstring."""
    if rng_used or not 1 <= len(static) <= 2 or not all(_units(s) for s in static):
        return False
    if any(s.device != static[0].device for s in static) or not hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph"):
        return False
    return cuda_driver() is not None


class RawReplay:
    """One captured graph's replay in one submission (see the module docstring).

    static: 1 or 2 [rows, *] tensors the graph reads (contiguous); out: the tensor it writes (contiguous)."""

    __slots__ = ("cu", "graph", "wrapper", "graph_exec", "device", "ctx", "specs", "out", "_in", "_out", "_in_vals",
                 "_out_vals")

    def __init__(self, cu, graph, static: Sequence[_Tensor], out: _Tensor):
        self.cu, self.graph = cu, graph  # PyTorch's graph: kept alive, its pool holds the child's memory
        self.wrapper = self.graph_exec = 0
        self.device = out.get_device()
        self.specs = tuple((s.dtype, s.shape) for s in static)
        self.out = out
        func, self.ctx = cu.function(), cu.context()  # (captured on its device: that device's context)
        dst = [(s.data_ptr(), s.nbytes // 16) for s in static] + [(0, 0)] * (2 - len(static))
        self._in_vals = (*dst[0], *dst[1])  # (static input, units) per copy; the sources come per call
        self._in = CopyNode(func, (dst[0][0], dst[0][0], dst[0][1], dst[1][0], dst[1][0], dst[1][1]))  # self-copies
        self._out_vals = (out.data_ptr(), out.nbytes // 16)  # (static output, units); the destination per call
        self._out = CopyNode(func, (out.data_ptr(), out.data_ptr(), out.nbytes // 16, 0, 0, 0))
        self.wrapper, self.graph_exec = cu.wrap(graph.raw_cuda_graph(), self._in, self._out)

    @classmethod
    def build(cls, graph, static: Sequence[_Tensor], out: _Tensor, cu=None) -> RawReplay | None:
        """The raw replay of the captured, kept ``graph`` (its inputs passed :func:`keeps_graph`), or None when the
        output is not whole 16-byte units or the driver refuses the wrapper: PyTorch's own executable is instantiated
        then, for the torch ops' replays. With a raw replay it is left to ``graph.replay()``'s first call (an input
        the raw replay declines): one executable per graph in the common case, not two. ``cu``: the driver (default
        :func:`cuda_driver`; tests pass a stand-in)."""
        cu = cuda_driver() if cu is None else cu
        raw = None
        if cu is not None and _units(out) and out.device == static[0].device:
            try:
                raw = cls(cu, graph, static, out)
            except RuntimeError as err:
                if not cu.warned:
                    cu.warned = True
                    warnings.warn(f"moekit: internal CUDA graphs replay through torch ops ({err})", stacklevel=2)
        if raw is None:
            graph.instantiate()
        return raw

    def replay(self, inputs: Sequence[_Tensor], copy: bool) -> _Tensor | None:
        """The output of a replay on ``inputs`` (a fresh tensor unless ``copy=False``: the static output), or None
        when an input is not exactly what the static input holds: nothing was changed then. When another device is
        current (a model spread over GPUs, as transformers' ``device_map`` runs it), the graph's context is pushed
        around the driver calls (the stream: the graph's device's current one, as the torch ops would use)."""
        cu, specs, device = self.cu, self.specs, self.device
        if len(inputs) != len(specs):
            return None
        src = [0, 0]
        for i, (x, (dtype, shape)) in enumerate(zip(inputs, specs)):
            if (type(x) is not _Tensor or x.dtype is not dtype or x.shape != shape or not x.is_contiguous()
                    or x.get_device() != device):
                return None
            src[i] = x.data_ptr()
            if src[i] % 16:
                return None
        static_out = self.out
        out = torch.empty_like(static_out) if copy else static_out  # (torch calls before any context is pushed)
        stream = cu.stream(device)
        other = cu.current_device() != device
        if other:
            cu.push(self.ctx)
        try:
            d0, n0, d1, n1 = self._in_vals
            cu.set(self.graph_exec, self._in, (d0, src[0], n0, d1, src[1], n1))
            p, units = self._out_vals
            cu.set(self.graph_exec, self._out, (out.data_ptr(), p, units if copy else 0, 0, 0, 0))  # copy=False: none
            cu.launch(self.graph_exec, stream)
        finally:
            if other:
                cu.pop()
        return out

    def __del__(self):
        if self.graph_exec:
            graph_exec, self.graph_exec = self.graph_exec, 0
            try:
                self.cu.destroy(self.wrapper, graph_exec)
            except Exception:  # at interpreter exit the ctypes bindings may be gone: the process frees it then
                pass


def rng_offset(device: torch.device) -> int | None:
    """The default CUDA generator's offset on ``device`` (None where it cannot be read): a change across an eager
    run means the run drew random numbers."""
    try:
        return torch.cuda.default_generators[device.index or 0].get_offset()
    except (AttributeError, IndexError, RuntimeError):
        return None
