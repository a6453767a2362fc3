"""Why round 26's copy nodes inside the graph found no node on the H200 (diagnostics for the next attempt).

Loads the tried module (``git show d9d764c:src/moekit/experts/graphed_raw.py``, given as the first argument), captures
``out = 2 * x`` between its copy-in and copy-out launches in a kept graph, and prints each step the node search
takes: the empty launch, the root nodes, every node's type, function, grid, block, parameters, and what
``copy_nodes`` found.

    PYTHONPATH=src python benchmarks/graph_nodes_probe.py .ab/nodes/graphed_raw_nodes.py
"""

import ctypes
import importlib.util
import sys
import traceback

import torch


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
    graph.instantiate()
    graph.replay()
    torch.cuda.synchronize()
    print("replayed: equal", torch.equal(out, static * 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
