"""The internal graphs' replays in one submission through the CUDA driver (``experts/graphed_raw.py``) on a GPU:
the torch-op replays' bits, the copy kernel byte for byte, a layer on a second device. (CPU: test_graphed_raw.py.)"""

import pytest
import torch

import moekit
from moekit.benchmarking import MODELS
from test_graphed_gpu import DT, _gated_pair, _inputs, _pair

pytestmark = pytest.mark.gpu


def _captured(graphed, m, t: int):
    """Capture the graph of ``t`` tokens (one call) and return its entry, which must replay through the driver."""
    from moekit.experts.graphed import tensor_key

    x, lg = _inputs(m, t, t)
    graphed(x, lg)
    entry = graphed._graphs.lookup((tensor_key(x), tensor_key(lg)))
    assert entry is not None and entry.raw is not None, t
    return entry


def test_raw_replays_have_the_torch_ops_bits():
    """Whole graphs replay in one submission through the CUDA driver (``graphed_raw``): the same bits as the same
    replay by torch ops and as the plain call, on the default and on a side stream; fresh outputs; a strided input
    (declined by the raw path) takes the torch ops; the direct bucket replays of a gate inside (``copy=False``) too."""
    from moekit.experts.graphed_raw import cuda_driver

    torch.cuda.init()
    assert cuda_driver() is not None  # the H200's torch 2.11 + CUDA 13 driver: this path must engage
    graphed, plain, m = _pair("deepseek-v3", 32)  # whole graphs (selection bias, grouped top-k)
    side = torch.cuda.Stream()
    with torch.no_grad():
        kept = []
        for t in (1, 2, 7, 8):
            entry = _captured(graphed, m, t)
            for seed in range(3):
                x, lg = _inputs(m, t, 10 * t + seed)
                ref = plain(x, lg)
                out = graphed(x, lg)
                raw, entry.raw = entry.raw, None
                by_torch = graphed(x, lg)
                entry.raw = raw
                assert torch.equal(out, ref) and torch.equal(by_torch, ref), (t, seed)
                kept.append((out, ref))
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = graphed(x, lg)
            torch.cuda.current_stream().wait_stream(side)
            assert torch.equal(out, ref), t
            wide = torch.zeros(t, 2 * m.H, device="cuda", dtype=DT)
            wide[:, ::2] = x
            strided = wide[:, ::2]  # every other element: strided for any t
            assert not strided.is_contiguous() and torch.equal(graphed(strided, lg), ref), t
        assert all(torch.equal(a, b) for a, b in kept)
    m = MODELS["qwen3-30b-a3b"].replace(E=32)
    graphed, plain = _gated_pair(m, 64, seed=3)
    with torch.no_grad():
        for t in (3, 3, 3, 16, 16, 16):
            x = torch.randn(t, m.H, device="cuda", dtype=DT)
            assert torch.equal(graphed(x), plain(x)), t
        assert all(e.raw is not None for e in graphed._graphs._entries.values())


@pytest.mark.parametrize("dec13", [0, 1], ids=["triton_w13", "gluon_dec_w13"])
def test_raw_replays_nest_programmatic_dependent_launches(monkeypatch, dec13):
    """An fp8 decode config with ``"pdl"`` (w13, the w2-input quantiser and the Gluon decode w2 launched as
    programmatic dependents, as the H200 fp8 table ships at Qwen3 / gpt-oss T = 1, round 30; round 32: the Gluon
    decode w13, after an input quantiser that lets it begin at once): the captured graph nests in the raw replay's
    wrapper (no fallback to torch ops) and replays the plain call's bits."""
    from moekit.ops import triton_experts_quant as tq
    from test_graphed_gpu import FP8

    cfg = {"BLOCK_M": 16, "fp8_acc": 128, "tma": True, "pdl": True, "sum_pass": False,
           "w13": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 4, "num_warps": 4, "gluon_dec": dec13},
           "w2": {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 4, "num_warps": 4, "gluon_dec": 1}}
    monkeypatch.setattr(tq, "get_config", lambda *a, **kw: cfg)
    from moekit.ops import gluon_experts
    from small_experts import count_calls

    calls = count_calls(monkeypatch, gluon_experts, "launch_fp8_w13_dec")
    torch.cuda.init()
    graphed, plain, m = _pair("qwen3-30b-a3b", 32, quant=FP8)
    with torch.no_grad():
        for t in (1, 2):  # 8 and 16 slots: the inline layout
            _captured(graphed, m, t)
            for seed in range(2):
                x, lg = _inputs(m, t, 10 * t + seed)
                assert torch.equal(graphed(x, lg), plain(x, lg)), (t, seed)
    assert bool(calls) == bool(dec13)


def test_copy_kernel_moves_every_byte():
    """``moekit_copy2`` (the raw replays' copies): both buffers, every 16-byte unit, none past the end, at unit
    counts around the block (256 threads) and past the grid's 1024 blocks (the grid-stride loop), or none."""
    from moekit.experts.graphed_raw import CopyNode, cuda_driver

    torch.cuda.init()
    cu = cuda_driver()
    if not cu.context():  # alone in its process (round 31: an xdist worker's first test): no context yet
        with pytest.raises(RuntimeError, match="no current CUDA context on this thread"):
            cu.function()
    g = torch.Generator(device="cuda").manual_seed(0)  # (a CUDA op: the device's context is current from here)
    torch.zeros(1, device="cuda")
    func = cu.function()
    for n0, n1 in ((1, 0), (0, 5), (255, 257), (256, 1), (1024 * 256 + 3, 17)):
        src = [torch.randint(0, 256, (16 * n,), dtype=torch.uint8, device="cuda", generator=g) for n in (n0, n1)]
        dst = [torch.full((16 * n + 32,), 0xAB, dtype=torch.uint8, device="cuda") for n in (n0, n1)]
        node = CopyNode(func, (dst[0].data_ptr(), src[0].data_ptr(), n0, dst[1].data_ptr(), src[1].data_ptr(), n1))
        cu.copy(node, cu.stream(torch.cuda.current_device()))
        torch.cuda.synchronize()
        for s, d in zip(src, dst):
            n = s.numel()
            assert torch.equal(d[:n], s) and bool((d[n:] == 0xAB).all()), (n0, n1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_raw_replays_on_another_device(monkeypatch):
    """A layer on cuda:1 (as transformers' ``device_map`` spreads a model) replays in one submission whichever device
    is current (the graph's context pushed around the driver calls): the plain call's bits, every replay through the
    driver, and the caller's current device and context as they were (a cuda:0 op right after works)."""
    from moekit.experts.graphed_raw import cuda_driver

    torch.cuda.init()
    dev = torch.device("cuda", 1)
    m = MODELS["qwen3-30b-a3b"].replace(E=32)
    torch.manual_seed(0)
    layers = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, device=dev, backend="triton",
                              eager_graph_tokens=n, **m.layer_kwargs()) for n in (8, 0)]
    w13 = torch.randn(m.E, 2 * m.I, m.H, device=dev, dtype=DT) * m.H**-0.5
    w2 = torch.randn(m.E, m.H, m.I, device=dev, dtype=DT) * m.I**-0.5
    for layer in layers:
        layer.load_expert_weights(w13, w2)
    graphed, plain = layers
    cu = cuda_driver()
    launches = []
    launch = cu.launch
    monkeypatch.setattr(cu, "launch", lambda graph_exec, stream: (launches.append(graph_exec),
                                                                  launch(graph_exec, stream)))
    calls = 0
    try:
        with torch.no_grad():
            for current in (0, 1, 0):
                torch.cuda.set_device(current)
                for t in (1, 3):
                    for seed in range(2):
                        g = torch.Generator(device=dev).manual_seed(100 * t + seed)
                        x = torch.randn(t, m.H, device=dev, dtype=DT, generator=g)
                        lg = torch.randn(t, m.E, device=dev, generator=g)
                        out = graphed(x, lg)
                        calls += 1
                        assert torch.equal(out, plain(x, lg)), (current, t, seed)
                        assert torch.cuda.current_device() == current
                        assert torch.ones(4, device="cuda:0").sum().item() == 4.0
    finally:
        torch.cuda.set_device(0)
    assert all(e.raw is not None for e in graphed._graphs._entries.values())
    assert len(launches) == calls - 2  # every call but the two captures


def test_pushed_context_path_on_one_gpu(monkeypatch):
    """The replay's other-device path (context pushed around the driver calls, popped after) on one GPU: the current
    device made to read as another one, so a replay pushes the graph's own context; the plain call's bits, and the
    runtime's state intact after (a torch op, a capture)."""
    from moekit.experts.graphed import tensor_key
    from moekit.experts.graphed_raw import cuda_driver

    torch.cuda.init()
    cu = cuda_driver()
    graphed, plain, m = _pair("deepseek-v3", 32)
    pushes = []
    push = cu.push
    monkeypatch.setattr(cu, "push", lambda ctx: (pushes.append(ctx), push(ctx)))
    with torch.no_grad():
        x, lg = _inputs(m, 2, 0)
        graphed(x, lg)  # capture
        entry = graphed._graphs.lookup((tensor_key(x), tensor_key(lg)))
        monkeypatch.setattr(cu, "current_device", lambda: entry.raw.device + 1)
        for seed in range(3):
            x, lg = _inputs(m, 2, seed + 1)
            assert torch.equal(graphed(x, lg), plain(x, lg)), seed
        monkeypatch.undo()
        assert pushes == [entry.raw.ctx] * 3 and cu.context() == entry.raw.ctx  # popped: the same context current
        assert torch.ones(4, device="cuda").sum().item() == 4.0
        x, lg = _inputs(m, 5, 9)
        assert torch.equal(graphed(x, lg), plain(x, lg))  # a new capture and its replay
        assert torch.equal(graphed(x, lg), plain(x, lg))
