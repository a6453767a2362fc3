"""Why round 26's copy nodes inside the graph found no node on the H200 (diagnostics for the next attempt).

Loads the tried module (``git show d9d764c:src/moekit/experts/graphed_raw.py``, given as the first argument), captures
``out = 2 * x`` between its copy-in and copy-out launches in a kept graph, and prints each step the node search
takes: the empty launch, the root nodes, every node's type, function, grid, block, parameters, and what
``copy_nodes`` found. Round 26 found the runtime's ``cudaGraphKernelNodeGetParams`` failing (error 98) on the copy
kernel's nodes, so it then reads every node through the driver (``cuGraphKernelNodeGetParams_v2``: ``func`` or
``kern`` + ``ctx``) and, where a node is the copy kernel's, points the instantiated graph's copy-in node at another
tensor (``cuGraphExecKernelNodeSetParams_v2``) and checks that a replay reads it.

    PYTHONPATH=src python benchmarks/graph_nodes_probe.py .ab/nodes/graphed_raw_nodes.py
"""

import ctypes
import importlib.util
import sys
import traceback

import torch


class DriverKernelParams(ctypes.Structure):
    """``CUDA_KERNEL_NODE_PARAMS_v2``."""
    _fields_ = [("func", ctypes.c_void_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint), ("kernelParams", ctypes.c_void_p),
                ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


def driver_nodes(nodes, kernel: int, grid: int) -> list:
    """[(node, params, argument values or None)] of every node, read through the driver."""
    cu = ctypes.CDLL("libcuda.so.1")
    get = cu.cuGraphKernelNodeGetParams_v2
    get.argtypes, get.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    out = []
    for node in nodes:
        p = DriverKernelParams()
        rc = get(node, ctypes.byref(p))
        vals = None
        if rc == 0 and p.kern == kernel and p.kernelParams and p.gridDimX == grid:
            args = ctypes.cast(p.kernelParams, ctypes.POINTER(ctypes.c_void_p))
            vals = [ctypes.c_uint64.from_address(args[i]).value for i in range(6)]
        print(f"driver node {node}: rc {rc} func {p.func} kern {p.kern} ctx {p.ctx} grid {p.gridDimX} block "
              f"{p.blockDimX} kernelParams {p.kernelParams} vals {vals}")
        out.append((node, p, vals))
    return out


def driver_set(graph_exec: int, node: int, params: DriverKernelParams, vals: list) -> int:
    """Point ``node`` of ``graph_exec`` at ``vals`` (``cuGraphExecKernelNodeSetParams_v2``); the driver's status."""
    cu = ctypes.CDLL("libcuda.so.1")
    set_ = cu.cuGraphExecKernelNodeSetParams_v2
    set_.argtypes, set_.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    arr = (ctypes.c_uint64 * 6)(*vals)
    ptrs = (ctypes.c_void_p * 6)(*(ctypes.addressof(arr) + 8 * i for i in range(6)))
    q = DriverKernelParams.from_buffer_copy(params)
    q.kernelParams = ctypes.addressof(ptrs)
    return set_(graph_exec, node, ctypes.byref(q))


def main() -> int:
    spec = importlib.util.spec_from_file_location("graphed_raw_nodes", sys.argv[1])
    gr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gr)
    rt = gr.cuda_runtime()
    print("runtime:", rt and rt.path, "kernel handle:", rt and rt._kernel.value)
    if rt is None:
        return 1
    by = ctypes.byref
    static = torch.randn(4, 64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    try:
        rt.copy(gr.CopyArgs(0, 0), stream)
        torch.cuda.synchronize()
        print("empty launch: ok")
    except Exception:
        traceback.print_exc()
    cap = gr.RawCapture.begin([static], rng_used=False)
    print("begin:", cap)
    if cap is None:
        cap = gr.RawCapture(rt, [static])
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    try:
        with torch.cuda.graph(graph):
            cap.copy_in()
            out = static * 2
            cap.copy_out(out)
    except Exception:
        traceback.print_exc()
        return 1
    g = graph.raw_cuda_graph()
    print("graph:", g, "in args:", list(cap.in_args.vals), "grid", cap.in_args.grid.x)
    n = ctypes.c_size_t(0)
    print("roots rc:", rt._roots(g, None, by(n)), "count:", n.value)
    roots = (ctypes.c_void_p * max(n.value, 1))()
    rt._roots(g, roots, by(n))
    m = ctypes.c_size_t(0)
    print("nodes rc:", rt._nodes(g, None, by(m)), "count:", m.value)
    nodes = (ctypes.c_void_p * max(m.value, 1))()
    rt._nodes(g, nodes, by(m))
    for label, node in [("root", r) for r in roots[: n.value]] + [("node", x) for x in nodes[: m.value]]:
        kind, p = ctypes.c_int(-1), gr.KernelNodeParams()
        rc_t = rt._type(node, by(kind))
        rc_p = rt._get(node, by(p)) if kind.value == 0 else None
        if rc_p:
            rt._clear()
        vals = None
        if rc_p == 0 and p.kernelParams and p.gridDim.x == cap.in_args.grid.x and p.blockDim.x == 256:
            args = ctypes.cast(p.kernelParams, ctypes.POINTER(ctypes.c_void_p))
            vals = [ctypes.c_uint64.from_address(args[i]).value for i in range(6)]
        print(f"{label} {node}: type rc {rc_t} kind {kind.value} params rc {rc_p} func {p.func} grid {p.gridDim.x} "
              f"block {p.blockDim.x} smem {p.sharedMemBytes} kernelParams {p.kernelParams} extra {p.extra} vals {vals}")
    print("copy_nodes:", rt.copy_nodes(g, cap.in_args))
    found = [(node, p, vals) for node, p, vals in driver_nodes(nodes[: m.value], rt._kernel.value, cap.in_args.grid.x)
             if vals is not None and vals[:3] == list(cap.in_args.vals)[:3]]
    graph.instantiate()
    graph.replay()
    torch.cuda.synchronize()
    print("replayed: equal", torch.equal(out, static * 2))
    if found:
        node, p, vals = found[0]
        other = torch.randn_like(static)
        rc = driver_set(graph.raw_cuda_graph_exec(), node, p, [vals[0], other.data_ptr(), *vals[2:]])
        graph.replay()
        torch.cuda.synchronize()
        print(f"driver set params rc {rc}: the replay read the other tensor {torch.equal(out, other * 2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
