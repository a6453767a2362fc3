"""A graph replay through the CUDA runtime's C functions: what ``GraphCache.replay``'s torch ops do, without the
dispatcher's host time, and with the copies inside the graph.

A graph captured for this path begins and ends with a node of a copy kernel (:data:`COPY_PTX`: 16 bytes per thread
and step, grid-stride), captured as self-copies of the static buffers (harmless: the torch-op replay runs them as
such). A replay points them at this call's tensors and launches once::

    cudaGraphExecKernelNodeSetParams(copy-in node: static_x <- x, static_logits <- logits)     (copy_ / _foreach_copy_)
    out = torch.empty_like(static_out)                                   copy=True only          (clone())
    cudaGraphExecKernelNodeSetParams(copy-out node: out <- static_out)
    cudaGraphLaunch(graph_exec, stream)                                                          (graph.replay())

on the current stream of the graph's device, as the torch ops. The bytes copied are the same, so the output bits are
the same (GPU tests compare both paths). Why: on the H200 host (round 26, ``benchmarks/eager_profile.py``) one
device-to-device ``cudaMemcpyAsync`` took 6.5-10 µs to enqueue (torch's ``copy_`` 7.9-11.7, ``clone`` 9-14.5) and a
``cudaLaunchKernel`` of the copy kernel 6.2-9.0, against 2.6-4.7 for a ``cudaGraphLaunch``. A parameter update only
changes the executable graph's next launches ("already enqueued or running launches are not affected").

A replay takes this path only when every input is the plain, contiguous, 16-byte aligned tensor the graph's static
input expects (same dtype, shape and device) and the graph's device is the current one; otherwise
:meth:`RawReplay.replay` returns None before changing anything, and the caller calls :meth:`RawReplay.neutral` (the
copy nodes back to self-copies) and runs the torch ops: the same bits. Anything else that replays such a graph must
call :meth:`RawReplay.neutral` first. A graph is captured this way only when the process has the CUDA runtime library
mapped (PyTorch's CUDA wheels load ``libcudart`` dynamically; a static link keeps the torch ops) with the
library-loading API (CUDA >= 12), PyTorch keeps the graph for its caller (``CUDAGraph(keep_graph=True)``,
``raw_cuda_graph``, ``raw_cuda_graph_exec``), it has one or two inputs, every static tensor is a whole number of
aligned 16-byte units, and its eager warm-up drew nothing from the default CUDA generator (a graph that uses random
numbers needs ``graph.replay()``'s generator update). Without a suitable output, the graph gets the copy-in node
only and the output is cloned.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Sequence

import torch

_Tensor = torch.Tensor
_THREADS = 256
_MAX_BLOCKS = 1024
_KERNEL_NODE = 0  # cudaGraphNodeTypeKernel

#: ``moekit_copy2(dst0, src0, n0, dst1, src1, n1)``: copy ``n0`` 16-byte units from ``src0`` to ``dst0`` and ``n1``
#: from ``src1`` to ``dst1`` (grid-stride loops; pointers 16-byte aligned). JIT-compiled by the driver once.
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


class Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class KernelNodeParams(ctypes.Structure):
    """``cudaKernelNodeParams``."""
    _fields_ = [("func", ctypes.c_void_p), ("gridDim", Dim3), ("blockDim", Dim3), ("sharedMemBytes", ctypes.c_uint),
                ("kernelParams", ctypes.c_void_p), ("extra", ctypes.c_void_p)]


class CopyArgs:
    """The six arguments of one ``moekit_copy2`` launch or node, in place (``vals``; ``ptrs``: what the runtime reads
    them through), its grid, and once its node is found the node's parameters (``params``, at ``params_addr``)."""

    __slots__ = ("vals", "ptrs", "grid", "params", "params_addr")

    def __init__(self, dst0: int, n0: int, dst1: int = 0, n1: int = 0):
        self.vals = (ctypes.c_uint64 * 6)(dst0, dst0, n0, dst1, dst1, n1)  # self-copies until set
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * 6)(*(base + 8 * i for i in range(6)))
        self.grid = Dim3(min(max(1, -(-max(n0, n1) // _THREADS)), _MAX_BLOCKS), 1, 1)
        self.params, self.params_addr = None, 0

    def key(self) -> tuple:
        return tuple(self.vals)

    def bind(self, func: int) -> None:
        """Node parameters for ``cudaGraphExecKernelNodeSetParams``: the node's function, these arguments."""
        self.params = KernelNodeParams(func, self.grid, Dim3(_THREADS, 1, 1), 0, ctypes.addressof(self.ptrs), None)
        self.params_addr = ctypes.addressof(self.params)


class CudaRuntime:
    """The runtime calls this path needs, from the ``libcudart`` this process has loaded (the copy kernel's launch,
    graph nodes and their parameters, ``cudaGraphLaunch``), and PyTorch's current-stream and current-device queries."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)  # already mapped: dlopen finds the loaded copy; calls release the GIL
        vp, fn = ctypes.c_void_p, self._fn
        load = fn(lib, "cudaLibraryLoadData", [vp, ctypes.c_char_p, vp, vp, ctypes.c_uint, vp, vp, ctypes.c_uint])
        get = fn(lib, "cudaLibraryGetKernel", [vp, vp, ctypes.c_char_p])
        self._kernel_launch = fn(lib, "cudaLaunchKernel", [vp, Dim3, Dim3, vp, ctypes.c_size_t, vp])
        self._graph_launch = fn(lib, "cudaGraphLaunch", [vp, vp])
        self._set = fn(lib, "cudaGraphExecKernelNodeSetParams", [vp, vp, vp])
        self._nodes = fn(lib, "cudaGraphGetNodes", [vp, vp, vp])
        self._type = fn(lib, "cudaGraphNodeGetType", [vp, vp])
        self._get = fn(lib, "cudaGraphKernelNodeGetParams", [vp, vp])
        self._roots = fn(lib, "cudaGraphGetRootNodes", [vp, vp, vp])
        self._clear = fn(lib, "cudaGetLastError", [])  # a failed call leaves its error for torch's next check
        self._error = lib.cudaGetErrorString
        self._error.argtypes, self._error.restype = [ctypes.c_int], ctypes.c_char_p
        self._ptx = COPY_PTX  # kept alive with the library
        library, kernel = vp(), vp()
        self._check("cudaLibraryLoadData", load(ctypes.byref(library), self._ptx, None, None, 0, None, None, 0))
        self._check("cudaLibraryGetKernel", get(ctypes.byref(kernel), library, b"moekit_copy2"))
        self._library, self._kernel = library, kernel
        self._block = Dim3(_THREADS, 1, 1)
        self.path = path
        self.stream = torch._C._cuda_getCurrentRawStream  # (device index) -> cudaStream_t
        self.current_device = torch._C._cuda_getDevice

    @staticmethod
    def _fn(lib, name: str, argtypes: list):
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, ctypes.c_int
        return f

    def copy(self, args: CopyArgs, stream: int) -> None:
        """Launch ``moekit_copy2`` with ``args`` on ``stream`` (during a capture: a node of the graph)."""
        self._check("cudaLaunchKernel", self._kernel_launch(self._kernel, args.grid, self._block, args.ptrs, 0, stream))

    def copy_nodes(self, graph: int, first: CopyArgs) -> dict[tuple, tuple[int, int]]:
        """The copy kernel's nodes in the (kept, not yet destroyed) ``graph`` whose first captured launch was
        ``first``, by their arguments: ``{(d0, s0, n0, d1, s1, n1): (node, function)}``. The graph's one root node is
        that launch (a kernel node of its grid and block: else nothing is found); it tells the kernel's function as
        nodes report it, and the nodes of that function are the copy nodes (the launch has no dependency: a second
        root would mean another node, and nothing is found)."""
        ok, by = self._ok, ctypes.byref
        root, n = (ctypes.c_void_p * 1)(), ctypes.c_size_t(0)
        p, kind = KernelNodeParams(), ctypes.c_int(-1)
        if not (ok(self._roots(graph, None, by(n))) and n.value == 1 and ok(self._roots(graph, root, by(n)))
                and ok(self._type(root[0], by(kind))) and kind.value == _KERNEL_NODE and ok(self._get(root[0], by(p)))
                and p.kernelParams and (p.gridDim.x, p.blockDim.x, p.sharedMemBytes) == (first.grid.x, _THREADS, 0)):
            return {}
        func = p.func
        self._check("cudaGraphGetNodes", self._nodes(graph, None, by(n)))
        nodes = (ctypes.c_void_p * n.value)()
        self._check("cudaGraphGetNodes", self._nodes(graph, nodes, by(n)))
        found = {}
        for node in nodes:
            if ok(self._type(node, by(kind))) and kind.value == _KERNEL_NODE and ok(self._get(node, by(p))) \
                    and p.func == func and p.kernelParams:
                args = ctypes.cast(p.kernelParams, ctypes.POINTER(ctypes.c_void_p))  # the node's own argument copies
                found[tuple(ctypes.c_uint64.from_address(args[i]).value for i in range(6))] = (node, func)
        return found

    def set_params(self, graph_exec: int, node: int, args: CopyArgs) -> None:
        self._check("cudaGraphExecKernelNodeSetParams", self._set(graph_exec, node, args.params_addr))

    def launch(self, graph_exec: int, stream: int) -> None:
        self._check("cudaGraphLaunch", self._graph_launch(graph_exec, stream))

    def _ok(self, rc: int) -> bool:
        """``rc`` is success; a failure's error is taken off the thread (it is ours, not torch's to report)."""
        if rc:
            self._clear()
        return not rc

    def _check(self, what: str, rc: int) -> None:
        if not self._ok(rc):
            raise RuntimeError(f"{what} failed with CUDA error {rc}: {self._error(rc).decode(errors='replace')}")


@functools.lru_cache(maxsize=None)
def cuda_runtime() -> CudaRuntime | None:
    """This process's CUDA runtime library with the copy kernel loaded (once per process: a library handle, not
    state), or None: no ``libcudart`` mapped (a CPU build, a static link, not Linux), a runtime without the
    library-loading API (CUDA < 12), or PyTorch without the raw-stream query."""
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "/libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return CudaRuntime(path)
        except (OSError, AttributeError, RuntimeError):
            continue
    return None


def _units(t) -> bool:
    """``t`` is a plain contiguous tensor of whole, aligned 16-byte units."""
    return type(t) is _Tensor and t.is_contiguous() and t.nbytes % 16 == 0 and t.data_ptr() % 16 == 0


class RawCapture:
    """The copy nodes of one graph while it is captured: :meth:`begin` before the capture (None: not this path),
    :meth:`copy_in` first and :meth:`copy_out` last inside it, :meth:`finish` after it."""

    def __init__(self, rt, static: Sequence[_Tensor]):
        self.rt, self.static = rt, tuple(static)
        dst = [(s.data_ptr(), s.nbytes // 16) for s in static]
        self.in_args = CopyArgs(*dst[0], *(dst[1] if len(dst) > 1 else (0, 0)))
        self.out_args, self.out = None, None

    @classmethod
    def begin(cls, static: Sequence[_Tensor], rng_used: bool, rt=None) -> RawCapture | None:
        """``rt``: the runtime (default :func:`cuda_runtime`; tests pass a stand-in)."""
        if rng_used or not 1 <= len(static) <= 2 or not all(_units(s) for s in static):
            return None
        if any(s.device != static[0].device for s in static) or not hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph"):
            return None
        rt = cuda_runtime() if rt is None else rt
        if rt is None:
            return None
        try:  # an empty launch outside the capture: the kernel is loaded into this device's context before it
            rt.copy(CopyArgs(0, 0), torch.cuda.current_stream().cuda_stream)
        except RuntimeError:
            return None
        return cls(rt, static)

    def copy_in(self) -> None:
        self.rt.copy(self.in_args, torch.cuda.current_stream().cuda_stream)

    def copy_out(self, out: _Tensor) -> None:
        """The last node, when the output allows it (else replays clone it)."""
        if _units(out) and out.device == self.static[0].device:
            self.out_args, self.out = CopyArgs(out.data_ptr(), out.nbytes // 16), out
            self.rt.copy(self.out_args, torch.cuda.current_stream().cuda_stream)

    def finish(self, graph, out: _Tensor) -> RawReplay | None:
        """Instantiate the (kept) ``graph``; its :class:`RawReplay`, or None when a copy node is not found (they stay
        self-copies: the torch ops replay it as before)."""
        nodes = self.rt.copy_nodes(graph.raw_cuda_graph(), self.in_args)
        graph.instantiate()
        node_in = nodes.get(self.in_args.key())
        node_out = nodes.get(self.out_args.key()) if self.out_args is not None else None
        if node_in is None or (self.out_args is not None and node_out is None):
            return None
        self.in_args.bind(node_in[1])
        if node_out is not None:
            self.out_args.bind(node_out[1])
        graph_exec = graph.raw_cuda_graph_exec()
        if not graph_exec:
            return None
        return RawReplay(self.rt, graph, graph_exec, self.static, out, self.in_args, node_in[0], self.out_args,
                         node_out[0] if node_out is not None else None)


class RawReplay:
    """One captured graph's replay by :class:`CudaRuntime` calls (see the module docstring)."""

    __slots__ = ("rt", "graph", "graph_exec", "device", "specs", "out", "_in", "_node_in", "_out", "_node_out",
                 "_in_set", "_out_set")

    def __init__(self, rt, graph, graph_exec: int, static: Sequence[_Tensor], out: _Tensor, in_args: CopyArgs,
                 node_in: int, out_args: CopyArgs | None, node_out: int | None):
        self.rt, self.graph, self.graph_exec = rt, graph, graph_exec  # the graph: kept alive with its executable
        self.device = out.get_device()
        self.specs = tuple((s.dtype, s.shape) for s in static)
        self.out = out
        self._in, self._node_in, self._out, self._node_out = in_args, node_in, out_args, node_out
        self._in_set = self._out_set = False  # a node points at a caller's tensor (not a self-copy)

    def replay(self, inputs: Sequence[_Tensor], copy: bool) -> _Tensor | None:
        """The output of a replay on ``inputs`` (a fresh tensor unless ``copy=False``: the static output), or None
        when an input is not exactly what the static input holds, or the graph's device is not the current one:
        nothing was changed then."""
        rt, specs = self.rt, self.specs
        if len(inputs) != len(specs) or rt.current_device() != self.device:
            return None
        ptrs = []
        for x, (dtype, shape) in zip(inputs, specs):
            if (type(x) is not _Tensor or x.dtype is not dtype or x.shape != shape or not x.is_contiguous()
                    or x.get_device() != self.device):
                return None
            p = x.data_ptr()
            if p % 16:
                return None
            ptrs.append(p)
        graph_exec, vals = self.graph_exec, self._in.vals
        vals[1] = ptrs[0]
        if len(ptrs) > 1:
            vals[4] = ptrs[1]
        rt.set_params(graph_exec, self._node_in, self._in)
        self._in_set = True
        out = self.out
        if self._node_out is not None and (copy or self._out_set):
            if copy:
                out = torch.empty_like(self.out)
            self._out.vals[0] = out.data_ptr()
            rt.set_params(graph_exec, self._node_out, self._out)
            self._out_set = copy
        rt.launch(graph_exec, rt.stream(self.device))
        if copy and self._node_out is None:
            return out.clone()
        return out

    def neutral(self) -> None:
        """The copy nodes back to self-copies (before a replay that does not set them: the torch ops)."""
        if self._in_set:
            vals = self._in.vals
            vals[1], vals[4] = vals[0], vals[3]
            self.rt.set_params(self.graph_exec, self._node_in, self._in)
            self._in_set = False
        if self._out_set:
            self._out.vals[0] = self._out.vals[1]
            self.rt.set_params(self.graph_exec, self._node_out, self._out)
            self._out_set = False


def rng_offset(device: torch.device) -> int | None:
    """The default CUDA generator's offset on ``device`` (None where it cannot be read): a change across an eager
    run means the run drew random numbers."""
    try:
        return torch.cuda.default_generators[device.index or 0].get_offset()
    except (AttributeError, IndexError, RuntimeError):
        return None
