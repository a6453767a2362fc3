"""A call on a CUDA tensor of another device than the current one runs with that device made current (round 69,
``moekit.ops.device_guard``; Triton launches on the current device), on CPU with a fake current device: the
decision, the layer's forwards, the public ops' dispatch, a router's direct calls, the benchmark timer; and the CPU
path never asks ``torch.cuda``. (On GPUs: tests/experts/test_multi_device_gpu.py.)"""

import contextlib

import pytest
import torch
from cuda_fakes import on as cuda_on  # noqa: E402

import moekit
from moekit.benchmarking import timer
from moekit.benchmarking.timer import on_device, runs_on_device, time_graph
from moekit.experts.executor import LocalExecutor
from moekit.ops import api
from moekit.ops.device_guard import call_on_device, other_device
from moekit.parallel.agree import agreed_forward

E, K, H, I = 8, 2, 16, 8


def on(dev: int) -> torch.Tensor:
    return cuda_on(dev, 2, H)


@pytest.fixture
def cuda(monkeypatch):
    """A fake current CUDA device: ``current`` (0 at first), ``entered``: the devices ``torch.cuda.device`` made
    current, in order."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device(d):
        index = d if isinstance(d, int) else torch.device(d).index
        state["entered"].append(index)
        was, state["current"] = state["current"], index
        try:
            yield
        finally:
            state["current"] = was

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


@pytest.fixture
def no_cuda(monkeypatch):
    """Asking the current device or changing it fails: the CPU path must do neither."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path asked torch.cuda")

    for name in ("current_device", "device", "set_device", "Stream", "Event", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_the_decision(cuda):
    assert other_device(on(1)) and not other_device(on(0))
    assert not other_device(torch.zeros(2)) and not other_device(None) and not other_device("x")
    cuda["current"] = 1
    assert other_device(on(0)) and not other_device(on(1))


def test_call_on_device(cuda):
    seen = []

    def fn(a, x=None):  # (a keyword named like call_on_device's own parameter reaches fn)
        seen.append((torch.cuda.current_device(), a, x))
        return "out"

    assert call_on_device(on(1), fn, "a", x="x") == "out" and cuda["current"] == 0
    assert call_on_device(on(0), fn, "b") == "out" and call_on_device(torch.zeros(1), fn, "c") == "out"
    assert seen == [(1, "a", "x"), (0, "b", None), (0, "c", None)] and cuda["entered"] == [1]

    def boom():
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        call_on_device(on(1), boom)
    assert cuda["current"] == 0  # the caller's device again after an exception


def test_the_layer_forward_wrapper(cuda):
    class Layer:
        expert_executor = LocalExecutor(None)

        @agreed_forward
        def forward(self, hidden_states, router_logits=None, *, input_ids=None):
            return torch.cuda.current_device(), hidden_states

    layer = Layer()
    x1 = on(1)
    assert layer.forward(x1) == (1, x1) and cuda["current"] == 0 and cuda["entered"] == [1]
    assert layer.forward(hidden_states=x1, router_logits=None)[0] == 1 and cuda["entered"] == [1, 1]
    assert layer.forward(on(0))[0] == 0 and cuda["entered"] == [1, 1]  # the common case: one compare, nothing entered
    assert layer.forward("not a tensor") == (0, "not a tensor")  # (the forward's own checks name it)
    with pytest.raises(TypeError):
        layer.forward()
    assert Layer.forward.__name__ == "forward" and Layer.forward.__wrapped__ is not None


def _layer(**kw):
    gate = torch.nn.Linear(H, E, bias=False)
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", gate=gate, **kw)
    layer.load_expert_weights(torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5)
    return layer


def test_the_cpu_path_never_asks_torch_cuda(no_cuda):
    layer = _layer()
    x, lg = torch.randn(3, H), torch.randn(3, E)
    with torch.no_grad():
        out = layer(x, lg)
        assert torch.equal(layer(hidden_states=x, router_logits=lg), out)
        assert torch.equal(layer.forward_with_scores(x, lg)[0], out)
        logits = layer.compute_router_logits(x)
        w, ids = layer.router.select_experts(x, logits)
        assert torch.equal(layer.router(x, logits).topk_ids, ids)
        moekit.fused_experts(x, layer.routed_experts.w13_weight, layer.routed_experts.w2_weight, w, ids)
        moekit.fused_topk(x, lg, K, True)
        moekit.grouped_topk(x, lg, K, True, num_expert_group=2, topk_group=1)
        moekit.fused_topk_bias(x, lg, torch.zeros(E), K, True)


def test_the_entry_points_go_through_the_guard(monkeypatch):
    """The public ops' table calls, a router's direct calls and compute_router_logits run through call_on_device with
    the input tensor (the layer's forwards: agreed_forward, test_the_layer_forward_wrapper)."""
    import moekit.routing.base as router_base
    import moekit.runner_checks as runner_checks

    seen = []

    def spy(x, fn, /, *args, **kwargs):
        seen.append(x)
        return call_on_device(x, fn, *args, **kwargs)

    for module in (api, router_base, runner_checks):
        monkeypatch.setattr(module, "call_on_device", spy)
    layer = _layer()
    x, lg = torch.randn(3, H), torch.randn(3, E)
    with torch.no_grad():
        layer.compute_router_logits(x)
        w, ids = layer.router.select_experts(x, lg)
        layer.router(x, lg)
        assert [t is x for t in seen] == [True] * 3
        seen.clear()
        moekit.fused_experts(x, layer.routed_experts.w13_weight, layer.routed_experts.w2_weight, w, ids)
        assert seen == [x]
        seen.clear()
        moekit.fused_topk(x, lg, K, True)
        moekit.grouped_topk(None, lg, K, True, num_expert_group=2, topk_group=1)
        moekit.fused_topk_bias(None, lg, torch.zeros(E), K, True)
        table = torch.randint(0, E, (11, K), dtype=torch.int32)
        moekit.fused_topk_bias(None, lg, None, K, True, input_tokens=torch.tensor([1, 2, 3]), hash_indices_table=table)
        moekit.ops.route(lg, moekit.TopKSpec(top_k=K))
        assert len(seen) == 5 and all(t is lg for t in seen)


# ---- the benchmark timer ---------------------------------------------------------------------------------------------
def test_on_device_contexts(cuda, no_cuda):
    assert isinstance(on_device(None), contextlib.nullcontext)
    assert isinstance(on_device(None, [(torch.zeros(1), 3)]), contextlib.nullcontext)  # CPU tensors: torch.cuda unasked
    assert isinstance(on_device("cuda"), contextlib.nullcontext)  # (the current device)
    assert isinstance(on_device("cpu"), contextlib.nullcontext)


def test_on_device_finds_the_inputs_device(cuda):
    with on_device(None, [(1, (torch.zeros(1), [on(1)]))]):  # nested, as the tuner's problem tuples
        assert torch.cuda.current_device() == 1
    with on_device("cuda:1"):
        assert torch.cuda.current_device() == 1
    with on_device(torch.device("cuda", 1), [(on(0),)]):  # an explicit device wins
        assert torch.cuda.current_device() == 1
    assert cuda["current"] == 0


def test_runs_on_device(cuda):
    @runs_on_device
    def helper(m, device="cuda:1", *, log=None):
        return torch.cuda.current_device()

    assert helper(0) == 1 and helper(0, "cuda:0") == 0 and helper(0, device=torch.device("cuda", 1)) == 1
    assert helper(0, device="cpu") == 0 and helper.__name__ == "helper" and cuda["current"] == 0


def test_time_graph_on_the_inputs_device(cuda, monkeypatch):
    # round 69: time_graph / capture_graph / eager_estimate_ms made their stream, events and graph on the current
    # device (run_bench(device="cuda:1") / measure_ceilings("cuda:1") with cuda:0 current: off by orders of magnitude)
    seen = []

    def here(what):
        seen.append((what, cuda["current"]))

    class Event:
        def __init__(self, enable_timing=False):
            here("event")

        def record(self, stream=None):
            here("record")

        def elapsed_time(self, other):
            return 0.5

    class Stream:
        def __init__(self, device=None):
            here("stream")

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            here("replay")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **k: (here("capture"), contextlib.nullcontext())[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: here("sync"))
    monkeypatch.setattr(timer, "sm_clock_mhz", lambda device=None: here("clock"))
    us = time_graph(lambda t: here("call"), [(on(1),), (on(1),)], target_ms=2.0, replays=3, clocks=[])
    assert us == pytest.approx(0.5 * 1000.0 / 8)  # 0.25 ms a call (0.5 over 2 sets): 8 calls in a 2 ms replay
    assert {d for _, d in seen} == {1} and {w for w, _ in seen} >= {"event", "stream", "capture", "replay", "call"}
    assert cuda["current"] == 0
    seen.clear()
    time_graph(lambda: here("call"), [()], target_ms=1.0, replays=1, device="cuda:1")  # a closure: device= says
    assert seen and {d for _, d in seen} == {1} and cuda["current"] == 0
