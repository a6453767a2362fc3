"""``moekit bench`` on the CPU with a fake timer: every format side by side, whole layer and experts step.

The timer calls each timed function on every input set (so what the GPU run times is run here) and
records the outputs; the CUDA-graph timing itself needs a GPU.
"""

import json

import pytest
import torch

from moekit.benchmarking import MODELS
from moekit.benchmarking import bench as bench_mod
from moekit.benchmarking.bench import Ceilings, Plan, bench_model, check_quants, run_bench, summarize

TINY = {  # registry shapes shrunk; H, I multiples of 32 (mxfp4 / int4 groups), fp8 blocks partial
    "deepseek-v3": dict(E=16, K=4, H=128, I=64, groups=4, topk_group=2),
    "gpt-oss-120b": dict(E=8, K=2, H=96, I=64),
    "longcat-flash": dict(E=8, Z=4, K=3, H=64, I=64),
}
QUANTS = ("bf16", "fp8", "mxfp4", "int4")


class RecordingTimer:
    def __init__(self):
        self.outputs = []  # (inputs, outputs) per timed call, in order

    def __call__(self, fn, inputs, target_ms=25.0, replays=7, warm_ms=0.0, settle_ms=0.0, clocks=None):
        self.settle_ms = settle_ms
        if clocks is not None:  # SM clocks read after each timed replay (one unreadable): the row keeps their median
            clocks.extend([1400, None, 1600, 1500])
        outs = [fn(*inp) for inp in inputs]
        for inp, out in zip(inputs, outs):
            assert out.shape == inp[0].shape and out.dtype == inp[0].dtype
        self.outputs.append(outs)
        return 10.0 + len(self.outputs)


def _run(name, backend="torch", tokens=(1, 5), quants=QUANTS, rotations=2, **shrink):
    timer = RecordingTimer()
    m = MODELS[name].replace(**(shrink or TINY[name]))
    plan = Plan(quants=quants, rotations=rotations, backend=backend, timer=timer, baseline=backend == "torch")
    rows = bench_model(m, list(tokens), torch.bfloat16, "cpu", Ceilings(1e12, 1e15, 2e15), plan, lambda s: None)
    return m, rows, timer


@pytest.mark.parametrize("name", list(TINY))
def test_every_format_whole_layer_and_experts_step(name):
    m, rows, timer = _run(name)
    assert len(rows) == len(timer.outputs)
    keys = [(r["model"], r["tokens"], r["impl"], r["quant"]) for r in rows]
    for t in (1, 5):
        want = [(name, t, "moekit", "bf16"), (name, t, "moekit-experts", "bf16"), (name, t, "baseline", "bf16")]
        for q in QUANTS[1:]:
            want += [(name, t, "moekit", q), (name, t, "moekit-experts", q)]
        if name == "gpt-oss-120b":  # the peer's variant: silu, no biases, same weights
            want.append(("gpt-oss-120b-silu", t, "moekit-experts", "bf16"))
        assert [k for k in keys if k[1] == t] == want
    for r in rows:  # the JSON schema
        for k in ("model", "tokens", "impl", "quant", "us", "pct_roofline", "tflops", "peak_tflops", "bytes",
                  "flops", "floor_us", "device", "dtype"):
            assert k in r, k
        assert r["peak_tflops"] == (2000.0 if r["quant"] == "fp8" else 1000.0)
        assert r["sm_mhz"] == 1500  # the median of the readable clocks after the timed replays
    assert timer.settle_ms == 1000.0  # compute-heavy rows settle at the power-cap clocks first (bench.SETTLE_MS)
    by = {k: (r, out) for k, r, out in zip(keys, rows, timer.outputs)}
    for t in (1, 5):
        for q in QUANTS:
            layer_r, layer_out = by[(name, t, "moekit", q)]
            exp_r, exp_out = by[(name, t, "moekit-experts", q)]
            # the experts step reads routing instead of logits; the same weights and slots
            assert exp_r["flops"] == layer_r["flops"]
            assert layer_r["bytes"] - exp_r["bytes"] == t * (m.E + m.Z) * 4 - t * m.K * 8
            if m.Z == 0:  # without zero experts the layer is its experts step on the same routing
                for a, b in zip(layer_out, exp_out):
                    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
            if q == "bf16":
                continue
            bf = by[(name, t, "moekit", "bf16")][1]
            for a, b in zip(layer_out, bf):  # a quantised layer is the bf16 layer up to quantisation error
                err = (a.float() - b.float()).norm() / b.float().norm()
                assert err < (0.1 if q == "fp8" else 0.3), (q, err)
            assert by[(name, t, "moekit", q)][0]["bytes"] < by[(name, t, "moekit", "bf16")][0]["bytes"]
    lines = summarize(rows)
    assert any("fp8" in ln and "vs bf16" in ln for ln in lines) and any("baseline" in ln for ln in lines)


def test_the_triton_path_runs_in_the_interpreter():
    # the calls the GPU run makes (FusedMoE on Triton, fused_experts_quant_triton), under TRITON_INTERPRET
    if torch.cuda.is_available():
        pytest.skip("the interpreter dry run is for CPU machines")
    _, rows, _ = _run("gpt-oss-120b", backend="triton", tokens=(2,), rotations=1, E=4, K=2, H=64, I=32)
    assert {(r["impl"], r["quant"]) for r in rows} >= {("moekit-experts", q) for q in QUANTS}


def test_check_quants_is_a_comma_list_led_by_the_dtype():
    assert check_quants(None, torch.bfloat16) == ["bf16"]
    assert check_quants("fp8", torch.bfloat16) == ["bf16", "fp8"]
    assert check_quants("int4,bf16,fp8,int4", torch.bfloat16) == ["bf16", "int4", "fp8"]
    assert check_quants(["mxfp4"], torch.float16) == ["fp16", "mxfp4"]
    with pytest.raises(ValueError, match="not implemented yet"):
        check_quants("bf16,nvfp4", torch.bfloat16)
    with pytest.raises(ValueError, match="empty"):
        check_quants("bf16,,fp8", torch.bfloat16)


def test_run_bench_writes_rows_meta_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mod, "measure_ceilings", lambda device: (2e12, 3e12, 7e14))
    monkeypatch.setattr(bench_mod, "measure_fp8_peak", lambda device: 1.4e15)
    shapes = [MODELS[n].replace(**TINY[n]) for n in ("deepseek-v3", "longcat-flash")]
    log = []
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"rows": [dict(model="deepseek-v3", tokens=2, impl="vllm-full", quant="bf16", us=9.0)]}))
    rows = run_bench(shapes, [2], quant="bf16,fp8,mxfp4,int4", out=tmp_path, log=log.append, fast=True,
                     routing=False, device="cpu", backend="torch", timer=RecordingTimer(), reference=ref)
    stem = next(p.stem for p in tmp_path.glob("cpu-*.json"))
    assert {p.name for p in tmp_path.iterdir()} == {stem + s for s in (".json", ".png", "-speed.png")} | {"ref.json"}
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    meta = saved[0]["meta"]
    assert meta["quants"] == ["bf16", "fp8", "mxfp4", "int4"] and meta["fp8_peak_TFLOPs"] == 1400.0
    assert meta["timing"] == {"target_ms": 10.0, "replays": 5, "warm_ms": 200.0, "settle_ms": 1000.0, "rotations": 4}
    assert not any(r["impl"] == "baseline" or r["model"] == "longcat-flash-nozero" for r in rows)  # --fast
    assert any(s.startswith("deepseek-v3: ") and " s (elapsed " in s for s in log)



def test_a_run_cut_short_keeps_every_finished_shape(tmp_path, monkeypatch):
    """The JSON is written after each shape (``meta.partial``), so a run stopped by a time limit (a device
    call's) keeps what it measured; the finished run rewrites it whole."""
    monkeypatch.setattr(bench_mod, "measure_ceilings", lambda device: (2e12, 3e12, 7e14))
    shapes = [MODELS[n].replace(**TINY[n]) for n in ("deepseek-v3", "longcat-flash")]
    real = bench_mod.bench_model

    def stop_at_longcat(m, *args, **kwargs):
        if m.name == "longcat-flash":
            raise KeyboardInterrupt("the call's time limit")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(bench_mod, "bench_model", stop_at_longcat)
    with pytest.raises(KeyboardInterrupt):
        run_bench(shapes, [2], out=tmp_path, log=lambda s: None, fast=True, routing=False, device="cpu",
                  backend="torch", timer=RecordingTimer())
    saved = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert saved and {r["model"] for r in saved} == {"deepseek-v3"}
    assert all(r["meta"]["partial"] is True for r in saved)
    monkeypatch.setattr(bench_mod, "bench_model", real)
    rows = run_bench(shapes, [2], out=tmp_path, log=lambda s: None, fast=True, routing=False, device="cpu",
                     backend="torch", timer=RecordingTimer())
    saved = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert saved == rows and {r["model"] for r in saved} == {"deepseek-v3", "longcat-flash"}
    assert all(r["meta"]["partial"] is False for r in saved)


@pytest.mark.parametrize("quant", ["fp8", "int4"])
def test_the_quantised_whole_layer_row_runs_the_runners_math(quant):
    # LongCat-Flash's quantised rows: routing, the quantised experts, then the runner's (routed + zero) combination
    # rounded once: the same output as a FusedMoE(quant_config=...) holding the same quantised weights
    import moekit
    from moekit.benchmarking.bench import build_layer
    from moekit.benchmarking.bench_quant import QUANT_FORMATS, layer_fn, quantized_weights

    m = MODELS["longcat-flash"].replace(**TINY["longcat-flash"])
    torch.manual_seed(0)
    layer = build_layer(m, torch.bfloat16, torch.device("cpu"), backend="torch")
    q = quantized_weights(layer, quant, {})
    fn = layer_fn(layer, m, quant, q, backend="torch")
    ql = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=torch.bfloat16, quant_config=QUANT_FORMATS[quant],
                         e_score_correction_bias=layer.router.e_score_correction_bias, backend="torch",
                         **m.layer_kwargs()).eval()
    ql.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
    x, logits = torch.randn(7, m.H).bfloat16(), torch.randn(7, m.E + m.Z)
    with torch.no_grad():
        out = fn(x, logits)
        assert torch.equal(out, ql(x, logits))
    assert layer.router.route(x, logits).zero_scale.abs().sum() > 0  # zero experts were chosen
