"""Layers on two GPUs in one process (round 69): a cuda:1 layer called while cuda:0 is current (transformers'
``device_map`` never changes the current device), the internal graphs of layers on both GPUs, one GraphPool over
both, and the benchmark's ceilings of the second GPU. Each probe runs in a child process (a kernel on the wrong
device can leave a sticky CUDA error) and passes when it prints ``RESULT OK``. (CPU: tests/test_device_guard.py,
tests/experts/test_graph_lock_devices.py.)"""

import pytest
import torch

from device_probes import check_child

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]


def _p2p() -> bool:
    return torch.cuda.can_device_access_peer(0, 1) and torch.cuda.can_device_access_peer(1, 0)


def test_a_cuda1_layer_with_cuda0_current():
    """Round 69: the runner set no device, and Triton launches on the current one: the cuda:1 layer's kernels went to
    cuda:0 with cuda:1 pointers (Triton's "Pointer argument cannot be accessed"). Eager (T = 64 above the graphs'
    limit) and graphed (T = 2, its capture and replays), ``forward`` and ``forward_with_scores``: the bits of the
    same calls with cuda:1 current, and the caller's current device as it was."""
    check_child(r'''
        torch.cuda.set_device(1)
        eager, graphed = build("cuda:1", 0), build("cuda:1", 8)
        sets = [inputs("cuda:1", t, t) for t in (64, 2)]
        with torch.no_grad():
            refs = [eager(x, lg) for x, lg in sets]
            ref_w = eager.forward_with_scores(*sets[0])[1]
        torch.cuda.synchronize(1)
        torch.cuda.set_device(0)
        with torch.no_grad():
            for layer in (eager, graphed):
                for call in range(3):  # (graphed: the capture, then replays)
                    for (x, lg), ref in zip(sets, refs):
                        try:
                            out = layer(x, lg)
                            torch.cuda.synchronize(1)
                        except Exception as err:
                            fail(f"raised {type(err).__name__}: {str(err)[:300]}")
                        if torch.cuda.current_device() != 0:
                            fail("the caller's current device changed")
                        if not torch.equal(out, ref):
                            fail(f"T = {x.shape[0]}, call {call}: relative error {rel_err(out, ref):.3g}")
            out, w = eager.forward_with_scores(*sets[0])
            if not (torch.equal(out, refs[0]) and torch.equal(w, ref_w)):
                fail("forward_with_scores differs")
        print("RESULT OK")
    ''')


def test_a_cuda1_layer_runs_on_cuda1s_stream():
    """Round 69 with peer access on (a device_map model moved hidden states between the GPUs): the kernels ran on
    cuda:0's stream, unordered with cuda:1's. The inputs are written on cuda:1's current stream after a long sleep
    there; a call on that stream reads them after the writes (it read the zero-filled buffers)."""
    if not _p2p():  # (asked here, not at collection: it initialises CUDA)
        pytest.skip("needs peer access between cuda:0 and cuda:1")
    check_child(r'''
        enable_p2p()
        layer = build("cuda:1", 0)
        x, lg = inputs("cuda:1", 64, 1)
        with torch.cuda.device(1), torch.no_grad():
            ref = layer(x, lg)
        torch.cuda.synchronize(1)
        xb, lb = torch.zeros_like(x), torch.zeros_like(lg)
        torch.cuda.set_device(0)
        with torch.no_grad():
            layer(xb, lb)  # warm-up with cuda:0 current
        torch.cuda.synchronize(0); torch.cuda.synchronize(1)
        with torch.cuda.device(1):
            torch.cuda._sleep(LONG_SLEEP)  # cuda:1's current stream is busy ...
        xb.copy_(x); lb.copy_(lg)  # ... and the inputs are written on it after that
        with torch.no_grad():
            out = layer(xb, lb)
        torch.cuda.synchronize(0); torch.cuda.synchronize(1)
        if not torch.equal(out, ref):
            fail(f"relative error {rel_err(out, ref):.3g}: the kernels did not run after the writes on cuda:1's stream")
        print("RESULT OK")
    ''')


def test_the_demo_on_the_second_gpu():
    """``moekit demo --device cuda:1`` (``run_demo(device="cuda:1")``) with cuda:0 current: eager Triton calls of
    both demo layers, and the router's own call."""
    check_child(r'''
        torch.cuda.set_device(0)
        from moekit.demo import run_demo
        try:
            ok = run_demo(device="cuda:1", repeats=1)
        except Exception as err:
            fail(f"run_demo(device='cuda:1') raised {type(err).__name__}: {str(err)[:300]}")
        if not ok:
            fail("run_demo(device='cuda:1') reported failed checks")
        print("RESULT OK")
    ''')


@pytest.mark.parametrize("p2p", [False, True], ids=["no_p2p", "p2p"])
def test_internal_graphs_of_layers_on_two_gpus(p2p):
    """Round 69: the captures used torch.cuda.graph's process-wide default capture stream, made on the device
    current at the process's first capture (here a cuda:0 layer's): a cuda:1 layer's capture then ran in a cuda:0
    stream. Now each device has its capture stream: a graphed cuda:1 layer after a cuda:0 one gives its plain twin's
    bits, with cuda:1 current and with cuda:0 current, and leaves torch's default capture stream alone."""
    if p2p and not _p2p():
        pytest.skip("needs peer access between cuda:0 and cuda:1")
    check_child(r'''
        if P2P:
            enable_p2p()
        torch.cuda.set_device(0)
        first = build("cuda:0", 8)
        with torch.no_grad():
            first(*inputs("cuda:0", 2, 0))  # the process's first internal capture (a layer on cuda:0)
        graphed, plain = build("cuda:1", 64, seed=1), build("cuda:1", 0, seed=1)
        bad = []
        with torch.no_grad():
            for current in (1, 0):
                torch.cuda.set_device(current)
                for seed in range(4):  # T = 2 (an exact graph) and 16 (a bucket): the capture, then replays
                    for t in (2, 16):
                        x, lg = inputs("cuda:1", t, 10 * t + seed)
                        try:
                            out = graphed(x, lg)
                            torch.cuda.synchronize(1)
                        except Exception as err:
                            fail(f"current {current}, T = {t}, call {seed} raised {type(err).__name__}: "
                                 f"{str(err)[:300]}")
                        ref = plain(x, lg)
                        if not torch.equal(out, ref):
                            bad.append((current, t, seed, round(rel_err(out, ref), 4)))
        if bad:
            fail(f"graphed cuda:1 layer differs from its plain twin at (current, T, call, rel err) {bad}")
        if torch.cuda.graph.default_capture_stream is not None:
            fail("an internal capture made torch's default capture stream")
        print("RESULT OK")
    '''.replace("P2P", repr(p2p)))


def test_one_pool_over_two_gpus_orders_each_devices_streams():
    """Round 69: GraphLock kept one last holder, so with one GraphPool over layers on two GPUs (what patch() and
    load_moe_layers give a device_map model) the sequence A (cuda:0, stream sa) -> B (cuda:1) -> C (cuda:0, stream sb)
    ordered sb after nothing: C's bucket replay overwrote the pool's static output while A still had to read it
    (after its shared experts' sleep). The same sequence without B is the control."""
    check_child(r'''
        from moekit.experts.graph_lock import GraphPool

        pool = GraphPool()
        a = build("cuda:0", 64, seed=2, shared_experts=SlowShared(), runner_args={"graph_pool": pool})
        plain_a = build("cuda:0", 0, seed=2, shared_experts=SlowShared())
        b = build("cuda:1", 64, seed=3, runner_args={"graph_pool": pool})
        xa, la = inputs("cuda:0", 16, 20)  # T = 16: a bucket graph, its output in the pool's buffer
        xc, lc = inputs("cuda:0", 16, 21)
        xb, lb = inputs("cuda:1", 16, 22)
        with torch.no_grad():
            ref_a, ref_c = plain_a(xa, la), plain_a(xc, lc)
            a(xa, la); a(xc, lc); b(xb, lb)  # captures (each with its device made current by the layer)
        torch.cuda.synchronize(0); torch.cuda.synchronize(1)
        sa, sb = torch.cuda.Stream(device=0), torch.cuda.Stream(device=0)
        a.shared_experts.cycles = LONG_SLEEP // 4

        def sequence(with_b):
            sa.wait_stream(torch.cuda.current_stream(0)); sb.wait_stream(torch.cuda.current_stream(0))
            with torch.no_grad():
                with torch.cuda.device(0), torch.cuda.stream(sa):
                    out_a = a(xa, la)
                if with_b:
                    with torch.cuda.device(1):
                        b(xb, lb)
                with torch.cuda.device(0), torch.cuda.stream(sb):
                    out_c = a(xc, lc)
            torch.cuda.synchronize(0); torch.cuda.synchronize(1)
            return rel_err(out_a, ref_a), rel_err(out_c, ref_c)

        control = sequence(False)
        if max(control) > 0:
            fail(f"the single-device control is wrong: {control}")
        crossed = sequence(True)
        if max(crossed) > 0:
            fail(f"a cuda:1 holder between two cuda:0 streams broke their order: relative errors {crossed}")
        print("RESULT OK")
    ''')


def test_bench_ceilings_of_the_second_gpu():
    """Round 69: ``measure_ceilings(device)`` (``run_bench(device="cuda:1")``) captured and timed on the current
    device (time_graph's stream, graph and events) with tensors on ``device``: off by orders of magnitude."""
    check_child(r'''
        from moekit.benchmarking.bench import measure_ceilings
        torch.cuda.set_device(1)
        right = measure_ceilings("cuda:1")
        torch.cuda.set_device(0)
        try:
            other = measure_ceilings("cuda:1")
        except Exception as err:
            fail(f"measure_ceilings('cuda:1') with cuda:0 current raised {type(err).__name__}: {str(err)[:300]}")
        if torch.cuda.current_device() != 0:
            fail("the caller's current device changed")
        ratios = [w / r for w, r in zip(other, right)]
        if not all(0.7 < q < 1.4 for q in ratios):
            fail(f"(copy, read, matmul) ceilings of cuda:1 with cuda:0 current / with cuda:1 current: {ratios}")
        print("RESULT OK")
    ''')
