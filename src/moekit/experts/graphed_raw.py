"""A graph replay through the CUDA runtime's C functions: what ``GraphCache.replay``'s torch ops do, on the same
stream, in the same order, without the dispatcher's host time.

    copy2(static_x <- x, static_logits <- logits)      one launch of a copy kernel          (copy_ / _foreach_copy_)
    cudaGraphLaunch(graph_exec, stream)                                                     (graph.replay())
    out = torch.empty_like(static_out)                 copy=True only                       (clone())
    copy2(out <- static_out)                           one launch of the copy kernel

``stream`` is the current stream of the graph's device, as for the torch ops, and the bytes copied are the same, so
the output bits are the same (GPU tests compare both paths). The copies are a kernel (:data:`COPY_PTX`, 16 bytes per
thread and step, grid-stride), not ``cudaMemcpyAsync``: on the H200 host one device-to-device ``cudaMemcpyAsync``
took 6.5-10 µs to enqueue (torch's ``copy_`` 7.9-11.7), a ``cudaGraphLaunch`` 2.5-4.7 (round 26, ``eager_profile``).

A replay takes this path only when every input is the plain, contiguous, 16-byte aligned tensor the graph's static
input expects (same dtype, shape and device) and the graph's device is the current one; otherwise
:meth:`RawReplay.replay` returns None before enqueuing anything and the caller runs the torch ops (the same bits).
A graph gets a :class:`RawReplay` only when the process has the CUDA runtime library mapped (PyTorch's CUDA wheels
load ``libcudart`` dynamically; a static link keeps the torch ops) with the library-loading API (CUDA >= 12),
PyTorch exposes the graph's executable (``CUDAGraph.raw_cuda_graph_exec``), it has at most two inputs and every
static tensor is a whole number of 16-byte units, and its eager warm-up drew nothing from the default CUDA generator
(a graph that uses random numbers needs ``graph.replay()``'s generator update).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Sequence

import torch

_Tensor = torch.Tensor
_THREADS = 256
_MAX_BLOCKS = 1024

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


class CopyArgs:
    """The six arguments of one ``moekit_copy2`` launch, in the kernel's order, in place (``vals``, which a replay
    updates; ``ptrs``: what ``cudaLaunchKernel`` reads them through), and its grid. ``n0`` / ``n1``: 16-byte units of
    the two copies (0: none)."""

    __slots__ = ("vals", "ptrs", "grid")

    def __init__(self, dst0: int, src0: int, n0: int, dst1: int = 0, src1: int = 0, n1: int = 0):
        self.vals = (ctypes.c_uint64 * 6)(dst0, src0, n0, dst1, src1, n1)
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * 6)(*(base + 8 * i for i in range(6)))
        self.grid = Dim3(min(max(1, -(-max(n0, n1) // _THREADS)), _MAX_BLOCKS), 1, 1)


class CudaRuntime:
    """The runtime calls a replay needs (``cudaLaunchKernel`` of the copy kernel, ``cudaGraphLaunch``) from the
    ``libcudart`` this process has loaded, and PyTorch's current-stream and current-device queries."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)  # already mapped: dlopen finds the loaded copy; calls release the GIL
        fn = self._fn
        load = fn(lib, "cudaLibraryLoadData", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint])
        get = fn(lib, "cudaLibraryGetKernel", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p])
        self._kernel_launch = fn(lib, "cudaLaunchKernel", [ctypes.c_void_p, Dim3, Dim3, ctypes.c_void_p,
                                                           ctypes.c_size_t, ctypes.c_void_p])
        self._graph_launch = fn(lib, "cudaGraphLaunch", [ctypes.c_void_p, ctypes.c_void_p])
        self._clear = fn(lib, "cudaGetLastError", [])  # a failed call leaves its error for torch's next check
        self._error = lib.cudaGetErrorString
        self._error.argtypes, self._error.restype = [ctypes.c_int], ctypes.c_char_p
        self._ptx = COPY_PTX  # kept alive with the library
        library, kernel = ctypes.c_void_p(), ctypes.c_void_p()
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
        """Launch ``moekit_copy2`` with ``args`` on ``stream``."""
        self._check("cudaLaunchKernel", self._kernel_launch(self._kernel, args.grid, self._block, args.ptrs, 0, stream))

    def launch(self, graph_exec: int, stream: int) -> None:
        self._check("cudaGraphLaunch", self._graph_launch(graph_exec, stream))

    def _check(self, what: str, rc: int) -> None:
        if rc:
            self._clear()  # ours, reported here: not torch's to raise at its next check
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


class RawReplay:
    """One captured graph's replay by :class:`CudaRuntime` calls (see the module docstring).

    static: 1 or 2 [rows, *] tensors the graph reads (contiguous); out: the tensor it writes (contiguous)."""

    __slots__ = ("rt", "graph", "graph_exec", "device", "specs", "out", "_in", "_out")

    def __init__(self, rt, graph, graph_exec: int, static: Sequence[_Tensor], out: _Tensor):
        self.rt, self.graph, self.graph_exec = rt, graph, graph_exec  # the graph: kept alive with its executable
        self.device = out.get_device()
        self.specs = tuple((s.dtype, s.shape) for s in static)
        self.out = out
        # (dst, src, units) per copy: the static buffers and sizes fixed, the inputs' sources and the output's
        # destination set per replay
        self._in = CopyArgs(*(v for s in static for v in (s.data_ptr(), 0, s.nbytes // 16)))
        self._out = CopyArgs(0, out.data_ptr(), out.nbytes // 16)

    @classmethod
    def build(cls, graph, static: Sequence[_Tensor], out: _Tensor, rng_used: bool, rt=None) -> RawReplay | None:
        """The raw replay of ``graph`` or None where it cannot be used (see the module docstring); ``rt``: the
        runtime (default :func:`cuda_runtime`; tests pass a stand-in)."""
        raw_exec = getattr(graph, "raw_cuda_graph_exec", None)
        if raw_exec is None or rng_used or not 1 <= len(static) <= 2:
            return None
        for t in (*static, out):
            if type(t) is not _Tensor or not t.is_contiguous() or t.device != out.device or t.nbytes % 16 \
                    or t.data_ptr() % 16:
                return None
        rt = cuda_runtime() if rt is None else rt
        graph_exec = raw_exec() if rt is not None else 0
        return cls(rt, graph, graph_exec, static, out) if graph_exec else None

    def replay(self, inputs: Sequence[_Tensor], copy: bool) -> _Tensor | None:
        """The output of a replay on ``inputs`` (a fresh tensor unless ``copy=False``: the static output), or None
        when an input is not exactly what the static input holds, or the graph's device is not the current one:
        nothing was enqueued then."""
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
        vals = self._in.vals
        vals[1] = ptrs[0]
        if len(ptrs) > 1:
            vals[4] = ptrs[1]
        stream = rt.stream(self.device)
        rt.copy(self._in, stream)
        rt.launch(self.graph_exec, stream)
        if not copy:
            return self.out
        out = torch.empty_like(self.out)
        self._out.vals[0] = out.data_ptr()
        rt.copy(self._out, stream)
        return out


def rng_offset(device: torch.device) -> int | None:
    """The default CUDA generator's offset on ``device`` (None where it cannot be read): a change across an eager
    run means the run drew random numbers."""
    try:
        return torch.cuda.default_generators[device.index or 0].get_offset()
    except (AttributeError, IndexError, RuntimeError):
        return None
