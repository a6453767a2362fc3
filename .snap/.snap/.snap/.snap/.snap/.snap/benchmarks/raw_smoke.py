"""A layer's internal graphs with the raw replays (``experts/graphed_raw.py``) on a GPU, in one minute: whether the
CUDA driver serves them, one wrapper built directly around ``out = 2 * x`` (its errors printed, not turned into the
torch ops), whether each captured graph got its one-submission replay, and the bits of raw replays, torch-op replays
and the plain call at T = 1, 3, 8 (DeepSeek-V3 shape with 32 experts); with two GPUs, the host µs of a layer on cuda:1
with either device current. Exit status 1 on any mismatch.

    PYTHONPATH=src python benchmarks/raw_smoke.py
"""

import traceback

import torch

import moekit
from moekit.benchmarking import MODELS
from moekit.benchmarking.eager import time_host
from moekit.experts.graphed import tensor_key
from moekit.experts.graphed_raw import RawReplay, cuda_driver


def main() -> int:
    torch.cuda.init()
    cu = cuda_driver()
    print("driver:", cu and cu.path)
    static = torch.randn(4, 64, device="cuda")
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        out = static * 2
    try:
        raw = RawReplay(cu, g, [static], out)
        x = torch.randn_like(static)
        y, z = raw.replay((x,), True), raw.replay((2 * x,), True)
        torch.cuda.synchronize()
        print("direct wrapper: equal", torch.equal(y, 2 * x), torch.equal(z, 4 * x))
    except Exception:
        traceback.print_exc()
    m = MODELS["deepseek-v3"].replace(E=32)
    torch.manual_seed(0)
    bias = torch.rand(m.E, device="cuda") * 0.1  # one selection bias for both layers
    layers = [moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=torch.bfloat16, device="cuda", backend="triton",
                              e_score_correction_bias=bias, eager_graph_tokens=n, **m.layer_kwargs()) for n in (8, 0)]
    w13 = torch.randn(m.E, 2 * m.I, m.H, device="cuda", dtype=torch.bfloat16) * m.H**-0.5
    w2 = torch.randn(m.E, m.H, m.I, device="cuda", dtype=torch.bfloat16) * m.I**-0.5
    for layer in layers:
        layer.load_expert_weights(w13, w2)
    graphed, plain = layers
    bad = 0
    with torch.no_grad():
        for t in (1, 3, 8):
            for seed in range(3):
                x = torch.randn(t, m.H, device="cuda", dtype=torch.bfloat16)
                lg = torch.randn(t, m.E, device="cuda")
                out = graphed(x, lg)
                entry = graphed._graphs.lookup((tensor_key(x), tensor_key(lg)))
                ref = plain(x, lg)
                ok = torch.equal(out, ref)
                bad += not ok
                print(f"T={t} call {seed}: raw={entry is not None and entry.raw is not None} equal={ok}")
    torch.cuda.synchronize()
    print("mismatches:", bad)
    if torch.cuda.device_count() > 1:
        other_device(m)
    return 1 if bad else 0


def other_device(m) -> None:
    """Host µs per call (``time_host``) of a layer on cuda:1 at T = 1, with cuda:1 current, then cuda:0 (the graph's
    context pushed: what a model spread over GPUs pays), and with cuda:0 current through the torch ops."""
    dev = torch.device("cuda", 1)
    layer = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=torch.bfloat16, device=dev, backend="triton",
                            eager_graph_tokens=8, **m.layer_kwargs())
    sets = [(torch.randn(1, m.H, device=dev, dtype=torch.bfloat16), torch.randn(1, m.E, device=dev))
            for _ in range(4)]
    with torch.no_grad():
        for current in (1, 0, 1, 0):
            torch.cuda.set_device(current)
            print(f"layer on cuda:1, cuda:{current} current: host {time_host(layer, sets):.1f} us per call")
        for entry in layer._graphs._entries.values():
            entry.raw = None  # round 26's behaviour with another device current: the torch ops
        print(f"layer on cuda:1, cuda:0 current, torch ops: host {time_host(layer, sets):.1f} us per call")
    torch.cuda.set_device(0)


if __name__ == "__main__":
    raise SystemExit(main())
