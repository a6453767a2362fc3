"""``benchmarks/compare.py`` on a synthetic ``moekit bench`` JSON; the committed vLLM reference file."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "benchmarks" / "baselines" / "vllm-h200.json"
spec = importlib.util.spec_from_file_location("moekit_compare", ROOT / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

T = compare.TOKENS
PEAK = 800.0


def _ref():
    rows = json.loads(BASELINE.read_text())["rows"]
    return {(r["model"], r["tokens"], r["impl"]): r["us"] for r in rows}


def synthetic_rows():
    """Designed verdicts: experts 0.7× GEMMs except Qwen3 T=1024 (1.1×); fp8 2× bf16 and 0.95× vLLM fp8; mxfp4 meets
    #10, int4 misses "within 15 % of bf16"; eager misses on DeepSeek-V3."""
    ref, rows = _ref(), []
    meta = dict(bf16_peak_TFLOPs=PEAK, fp8_peak_TFLOPs=1600.0, read_bw_TBps=4.5, copy_bw_TBps=4.0,
                quants=["bf16", "fp8", "mxfp4", "int4"])

    def row(model, t, impl, quant, us, pct=90.0, tflops=None):
        peak = 2 * PEAK if quant == "fp8" else PEAK
        rows.append(dict(model=model, tokens=t, impl=impl, quant=quant, us=us, pct_roofline=pct,
                         tflops=tflops if tflops is not None else 1.0, peak_tflops=peak, device="NVIDIA H200",
                         dtype="bfloat16", meta=meta))

    for model in compare.SHAPES:
        for t in T:
            bf = 100.0 * t ** 0.5 + 50
            gemms = ref.get((model, t, "vllm-gemms"))
            experts = (1.1 if (model, t) == ("qwen3-30b-a3b", 1024) else 0.7) * gemms if gemms else bf
            exp_model = "gpt-oss-120b-silu" if model == "gpt-oss-120b" else model
            row(model, t, "moekit", "bf16", bf, tflops=0.8 * PEAK)
            row(exp_model, t, "moekit-experts", "bf16", experts, tflops=0.8 * PEAK)
            if model == "gpt-oss-120b":
                row(model, t, "moekit-experts", "bf16", 2 * experts, tflops=0.8 * PEAK)
            f8 = bf / 2
            row(model, t, "moekit", "fp8", f8)
            vf8 = ref.get((model, t, "vllm-fp8"))
            row(model, t, "moekit-experts", "fp8", 0.95 * vf8 if vf8 else f8)
            four = bf / 3.5 if t <= 8 else (0.9 * f8 if t <= 256 else 1.1 * bf)
            row(model, t, "moekit", "mxfp4", four)
            row(model, t, "moekit", "int4", four if t < 1024 else 1.2 * bf)
    for model, host, gpu in (("qwen3-30b-a3b", 30.0, 48.0), ("deepseek-v3", 50.0, 198.0)):
        rows.append(dict(model=model, tokens=1, impl="eager-layer", quant="bf16", us=gpu, host_us=host,
                         pct_roofline=None))
    return rows


def _verdicts(rep):
    return {text.rsplit(": ", 1)[0]: ok for _, ok, text in rep.verdicts}


def test_baseline_file_holds_the_issue_numbers():
    data = json.loads(BASELINE.read_text())
    assert "issue #11 table" in data["source"] and "H200" in data["source"]
    ref = _ref()
    assert len(data["rows"]) == 4 * 7 * 2 + 3 * 7
    # spot checks against the issue texts (the whole table was checked when the file was written)
    assert (ref[("qwen3-30b-a3b", 1, "vllm-full")], ref[("qwen3-30b-a3b", 1, "vllm-gemms")]) == (51.0, 31.0)
    assert (ref[("deepseek-v3", 16384, "vllm-full")], ref[("deepseek-v3", 16384, "vllm-gemms")]) == (49036, 48813)
    assert (ref[("gpt-oss-120b", 4096, "vllm-full")], ref[("gpt-oss-120b", 4096, "vllm-gemms")]) == (4061, 4375)
    assert [ref[("mixtral-8x7b", t, "vllm-fp8")] for t in T] == [170, 351, 397, 585, 1528, 5476, 21742]
    assert not any(k[0] == "gpt-oss-120b" and k[2] == "vllm-fp8" for k in ref)
    assert all(r.get("activation") == "silu" for r in data["rows"] if r["model"] == "gpt-oss-120b")


def test_report_verdicts_on_synthetic_rows():
    text, rep = compare.report(synthetic_rows(), compare.load_baseline(BASELINE))
    v = _verdicts(rep)
    assert v["experts step ≤ vLLM GEMMs-only at every point"] is False
    assert "27/28 points" in text
    assert v["geometric mean × over vLLM align+GEMMs ≥ 1.25"] is True
    ref = _ref()
    want = math.exp(sum(math.log(ref[(m, t, "vllm-full")] / ((1.1 if (m, t) == ("qwen3-30b-a3b", 1024) else 0.7)
                                                             * ref[(m, t, "vllm-gemms")]))
                        for m in compare.PEER11 for t in T) / 28)
    assert f"geomean {want:.3f}" in text
    assert "gpt-oss-120b-silu" in text  # the peer's gpt-oss numbers ran silu
    assert v["experts step ≥ 75 % of the bf16 peak at T ≥ 4096 (DeepSeek-V3, gpt-oss, Mixtral)"] is True
    assert v["fp8 ≥ 1.8× bf16 (whole layer) at T ≤ 64"] is True
    assert v["fp8 ≥ 1.6× bf16 (whole layer) at T = 16384"] is True
    assert v["fp8 ≥ 85 % of the fp8 roofline at 8 ≤ T ≤ 1024 (Qwen3 ≥ 80 %)"] is True
    assert v["fp8 experts step faster than vLLM's fp8 path at every point"] is True
    assert v["mxfp4 ≥ 3× bf16 at T ≤ 8 (gpt-oss-120b, DeepSeek-V3)"] is True
    assert v["mxfp4 never slower than fp8 at 8 < T ≤ 256"] is True
    assert v["mxfp4 within 15 % of bf16 at T ≥ 1024"] is True
    assert v["int4 within 15 % of bf16 at T ≥ 1024"] is False
    assert v["eager layer host ≤ 40 µs at T ≤ 8 (Qwen3-30B-A3B: ≤ its GPU µs)"] is False
    assert "## Summary" in text and "| shape (moekit rows) | T |" in text


def test_missing_points_are_missed_and_counted():
    rows = [r for r in synthetic_rows() if not (r["model"] == "mixtral-8x7b" and r["quant"] == "fp8")]
    text, rep = compare.report(rows, compare.load_baseline(BASELINE))
    v = _verdicts(rep)
    assert v["fp8 experts step faster than vLLM's fp8 path at every point"] is False
    assert "14/21 points, 7 missing" in text
    _, rep = compare.report(synthetic_rows(), [])  # no baseline: the peer targets cannot be met
    assert _verdicts(rep)["geometric mean × over vLLM align+GEMMs ≥ 1.25"] is False


def test_old_rows_are_read_in_todays_naming():
    r = compare.normalise(dict(model="m", tokens=1, impl="moekit-fp8", quant="fp8", us=1.0))
    assert (r["impl"], r["quant"]) == ("moekit", "fp8")
    r = compare.normalise(dict(model="m", tokens=1, impl="moekit", quant=None, dtype="bfloat16", us=1.0))
    assert r["quant"] == "bf16"


def test_main_writes_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    res = tmp_path / "res.json"
    res.write_text(json.dumps(synthetic_rows()))
    md, png = tmp_path / "out.md", tmp_path / "speed.png"
    assert compare.main([str(res), "--md", str(md), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert md.read_text() == out.rstrip("\n") + "\n"  # the file holds the report that was printed
    assert png.stat().st_size > 10_000
