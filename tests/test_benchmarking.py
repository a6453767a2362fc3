"""moekit.benchmarking on the CPU: the shape registry, the timer, bench's baseline and roofline, quant rows.

The CUDA-graph timings themselves need a GPU; what they time is checked here on tiny shapes.
"""

import dataclasses

import pytest
import torch

from moekit.benchmarking import EXTRA_MODELS, MODELS, ModelShape, get_shape, time_events
from moekit.benchmarking.bench import baseline_forward, build_layer, check_quant, quant_name, roofline
from moekit.benchmarking.tune import make_problem
from moekit.benchmarking.tune_space import Space, _cfg, search


def test_registry_has_the_five_models_and_is_read_only():
    assert list(MODELS) == ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-120b", "longcat-flash"]
    with pytest.raises(TypeError):
        MODELS["new"] = MODELS["mixtral-8x7b"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["longcat-flash"].Z = 0  # type: ignore[misc]
    variant = MODELS["longcat-flash"].replace(name="longcat-flash-nozero", Z=0)
    assert variant.Z == 0 and MODELS["longcat-flash"].Z == 256 and "longcat-flash-nozero" not in MODELS


def test_extra_shapes_are_named_but_not_in_the_sweep():
    # the extra tuned shapes: found by name (get_shape, the CLI's --models), left out of 'all' (the benchmark sweep)
    from moekit.cli import model_list

    assert list(EXTRA_MODELS) == ["gpt-oss-20b", "qwen3-next-80b-a3b", "deepseek-v2-lite"]
    assert not set(EXTRA_MODELS) & set(MODELS)
    assert get_shape("gpt-oss-20b") is EXTRA_MODELS["gpt-oss-20b"] and get_shape("gpt-oss-20b").has_bias
    assert [m.name for m in model_list("all")] == list(MODELS)
    assert [m.name for m in model_list("qwen3-next-80b-a3b,mixtral-8x7b")] == ["qwen3-next-80b-a3b", "mixtral-8x7b"]
    with pytest.raises(KeyError, match="deepseek-v2-lite"):  # the error lists every name
        get_shape("nope")


def test_every_shipped_table_is_a_registered_shape():
    # the GPU invariance tests (tests/ops/test_batch_invariance_gpu.py) run the shipped tables of the registered
    # shapes: a table of another shape would ship untested
    import json

    from moekit.ops import triton_configs as tc

    known = {tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated) for m in [*MODELS.values(),
                                                                                 *EXTRA_MODELS.values()]}
    for path in sorted(tc.CONFIG_DIR.glob("*.json")):
        for key in json.loads(path.read_text())["entries"]:
            assert key.split(",quant=")[0] in known, (path.name, key)


def test_registry_shapes_match_the_models():
    ds = get_shape("deepseek-v3")
    assert (ds.E, ds.K, ds.H, ds.I, ds.groups, ds.topk_group, ds.scale, ds.scoring) == (
        256, 8, 7168, 2048, 8, 4, 2.5, "sigmoid")
    assert get_shape("gpt-oss-120b").act == "swigluoai" and get_shape("gpt-oss-120b").has_bias
    with pytest.raises(KeyError, match="choose from"):
        get_shape("gpt-5")


def test_time_events_on_cpu_is_a_median_in_ms():
    calls = []
    before = []
    ms = time_events(lambda: calls.append(1), iters=5, warmup=2, device="cpu", before=lambda: before.append(1))
    assert len(calls) == 7 and before == [1] and 0 <= ms < 100
    with pytest.raises(ValueError, match="iters"):
        time_events(lambda: None, iters=0, device="cpu")


TINY = {  # registry shapes shrunk so that torch._grouped_mm runs on the CPU (16-byte aligned strides)
    "deepseek-v3": dict(E=16, K=4, H=32, I=16, groups=4, topk_group=2),
    "gpt-oss-120b": dict(E=8, K=2, H=32, I=16),
    "longcat-flash": dict(E=8, Z=4, K=3, H=32, I=16),
}


@pytest.mark.parametrize("name", list(TINY))
def test_baseline_computes_the_layer(name):
    # the torch._grouped_mm baseline that bench times is the same MoE as the moekit layer
    m = MODELS[name].replace(**TINY[name])
    layer = build_layer(m, torch.float32, torch.device("cpu"), backend="torch")
    x, logits = torch.randn(12, m.H), torch.randn(12, m.E + m.Z)
    with torch.no_grad():
        want = layer(x, logits)
        got = baseline_forward(layer, m, x, logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_roofline_counts_bytes_and_flops():
    m = ModelShape("t", E=4, K=2, H=8, I=4)
    ids = [torch.tensor([[0, 1], [1, 2]]), torch.tensor([[3, 3], [3, 3]])]
    rf = roofline(m, 2, ids, m.E, bw=1e12, peak=1e15)
    per_expert = (2 * 4 * 8 + 8 * 4) * 2
    assert rf["unique_experts"] == 2 and rf["real_slots"] == 4
    assert rf["bytes"] == 2 * per_expert + 2 * 2 * 8 * 2 + 2 * 4 * 4
    assert rf["flops"] == 2 * 4 * 8 * 3 * 4


def test_quant_is_the_dtype_or_a_kernel_format():
    assert quant_name(torch.bfloat16) == "bf16" and quant_name(torch.float16) == "fp16"
    assert check_quant(None, torch.float16) == "fp16" and check_quant("bf16", torch.bfloat16) == "bf16"
    assert [check_quant(q, torch.bfloat16) for q in ("fp8", "mxfp4", "int4")] == ["fp8", "mxfp4", "int4"]
    with pytest.raises(ValueError, match="not implemented yet"):
        check_quant("nvfp4", torch.bfloat16)
    with pytest.raises(ValueError, match="'bf16'"):
        check_quant("fp16", torch.bfloat16)


def test_quant_roofline_bytes():
    """fp8 rows count 1 byte per weight plus the block scales (the format's bytes_per_expert)."""
    from moekit.benchmarking.bench_quant import QUANT_FORMATS

    m = MODELS["deepseek-v3"]
    pe = QUANT_FORMATS["fp8"].bytes_per_expert(m.I, m.H, m.gated)
    assert pe == 3 * m.I * m.H + 4 * (2 * (m.I // 128) * (m.H // 128) + (m.H // 128) * (m.I // 128))
    ids = [torch.zeros(1, m.K, dtype=torch.int64)]
    rf = roofline(m, 1, ids, m.E, 1e12, 1e15, per_expert=pe)
    assert rf["bytes"] == pe + 2 * m.H * 2 + (m.E + m.Z) * 4


def test_tune_search_finds_the_fast_config_in_two_stages():
    base = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    seen = []

    def score(cfg):  # a pretend timing: wide w2 tiles and TMA save time
        seen.append(cfg)
        return 4.0 - cfg["w2"]["BN"] / 128 - 0.5 * bool(cfg.get("tma"))

    space = Space((128, 2048, 768, 8, True), torch.bfloat16)
    best, times = search(base, rows=8, space=space, score=score)
    assert best["w2"]["BN"] == 256 and best.get("tma")  # two greedy rounds after the priors
    assert not any(c.get("pdl") for c in seen) and len(times) == len(seen) < 40
    seen.clear()
    search(base, rows=8, space=Space((128, 2048, 768, 8, True), torch.bfloat16), score=score, pdl=True)
    assert any(c.get("pdl") for c in seen)


def test_tune_problem_shapes():
    x, w1, w2, w, ids, b1, b2 = make_problem(5, 4, 8, 6, 2, torch.float32, "silu", True, "cpu")
    assert x.shape == (5, 8) and w1.shape == (4, 12, 8) and w2.shape == (4, 8, 6)
    assert ids.dtype == torch.int32 and torch.allclose(w.sum(-1), torch.ones(5))
    assert b1.shape == (4, 12) and b2.shape == (4, 8)


def test_time_host_is_a_median_of_blocks(monkeypatch):
    """``time_host`` runs warm-up calls, then ``repeats`` blocks of ``calls`` calls, and returns the median
    per-call time of the blocks (synchronising only between blocks)."""
    from moekit.benchmarking import eager

    syncs, seen = [], []
    monkeypatch.setattr(eager.torch.cuda, "synchronize", lambda: syncs.append(1))
    # block k's calls are enqueued in (k + 1) * 100 µs per 10 calls: per-call 10, 20, 30, 40, 50 µs -> median 30
    # (each block reads the clock before, after the calls and after its synchronisation: back_to_back)
    times = iter([v for k in range(5) for v in (float(k), k + (k + 1) * 1e-4, k + 0.5)])
    monkeypatch.setattr(eager.time, "perf_counter", lambda: next(times))
    got = eager.time_host(lambda a: seen.append(a), [(1,), (2,)], calls=10, warmup=3, repeats=5)
    assert abs(got - 30.0) < 1e-6
    assert len(seen) == 3 + 5 * 10 and seen[:5] == [1, 2, 1, 1, 2]  # warm-up 3, then blocks from input 0
    assert len(syncs) == 1 + 5


def test_back_to_back_host_and_wall(monkeypatch):
    """``back_to_back``: host µs per call up to the last enqueue, wall µs per call up to the synchronisation
    after it (skipped when ``cuda`` is False); the garbage collector is back on afterwards."""
    import gc

    from moekit.benchmarking import eager

    syncs = []
    monkeypatch.setattr(eager.torch.cuda, "synchronize", lambda: syncs.append(1))
    times = iter([0.0, 4e-4, 1e-3])  # 4 calls: enqueued in 400 µs, finished after 1000 µs
    monkeypatch.setattr(eager.time, "perf_counter", lambda: next(times))
    host, wall = eager.back_to_back(lambda: None, [()], 4)
    assert (round(host, 6), round(wall, 6), syncs) == (100.0, 250.0, [1]) and gc.isenabled()
    times = iter([0.0, 4e-4, 4e-4])
    monkeypatch.setattr(eager.time, "perf_counter", lambda: next(times))
    assert eager.back_to_back(lambda: None, [()], 4, cuda=False) == (100.0, 100.0) and syncs == [1]  # no sync


def test_the_baseline_runs_the_real_slots_only(monkeypatch):
    # round 63: LongCat's zero slots went through expert 0's grouped GEMMs (~1.5x the real rows): the baseline did
    # work moekit's align step drops, which inflated the "x over the baseline" ratios
    m = MODELS["longcat-flash"].replace(**TINY["longcat-flash"])
    layer = build_layer(m, torch.float32, torch.device("cpu"), backend="torch")
    x, logits = torch.randn(64, m.H), torch.randn(64, m.E + m.Z)
    rows, gmm = [], torch._grouped_mm

    def counting(a, b, offs=None, **kw):
        rows.append(int(offs[-1]))
        return gmm(a, b, offs=offs, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    with torch.no_grad():
        got = baseline_forward(layer, m, x, logits)
        want = layer(x, logits)
    assert len(rows) == 2 and rows[0] == rows[1] < 64 * m.K  # both GEMMs over the real slots only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
