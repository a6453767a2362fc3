"""Round 53's CLI audit: the `moekit` command and the scripts of ``benchmarks/`` on a CPU-only machine (and what
they would do on a GPU, with the CUDA parts replaced): bad values are one line and exit 2 before any work, a
failure of files or GPU memory in a run is one line and exit 1, never a traceback."""

import io
import json

import pytest
import torch

from bench_scripts import bench_script
from moekit.cli import build_parser, main

GPU = torch.cuda.is_available()


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--tokens", "1,,2"], "--tokens"),  # edge: an empty item inside a token list
    (["bench", "--tokens", "8,"], "--tokens"),  # edge: a trailing comma
    (["bench", "--eager", "--eager-tokens", "1,,8"], "--eager-tokens"),  # edge: the same in --eager-tokens
    (["bench", "--models", "qwen3-30b-a3b,,mixtral-8x7b"], "--models"),  # edge: an empty model name
    (["tune", "--points", "qwen3-30b-a3b:1,,mixtral-8x7b:8"], "--points"),  # edge: an empty point
    (["bench", "--tokens", "99999999999999999999"], "--tokens"),  # edge: a token count past int64 (overflowed)
    (["bench", "--settle-ms", "inf"], "--settle-ms"),  # edge: an infinite warm-up (the GPU run never ended)
    (["tune", "--models", "all", "--budget-s", "inf"], "--budget-s"),  # edge: an infinite budget per shape
])
def test_malformed_values_are_usage_errors(argv, needle, capsys):
    assert main(argv) == 2
    _one_line(capsys, needle)


def test_points_all_means_every_benchmark_shape():
    # edge: `--points all:1` tuned DeepSeek-V3 alone (the first shape of 'all'), silently
    from moekit.benchmarking import MODELS

    args = build_parser().parse_args(["tune", "--points", "all:1,qwen3-30b-a3b:8"])
    assert [(m.name, t) for m, t in args.points] == [(n, [1, 8] if n == "qwen3-30b-a3b" else [1]) for n in MODELS]


@pytest.mark.parametrize("text", ["", "{\"foo\": 1}", "[1, 2]"])
def test_a_bad_reference_file_is_refused_before_the_run(tmp_path, text, capsys):
    # edge: --reference that exists but is empty / not a baseline: read only for the plot at the end of a long run
    ref = tmp_path / "ref.json"
    ref.write_text(text)
    assert main(["bench", "--reference", str(ref)]) == 2
    _one_line(capsys, "--reference", "ref.json")


@pytest.mark.parametrize("argv", [["bench"], ["tune", "--models", "qwen3-30b-a3b"]])
def test_out_that_is_a_file_is_refused_before_the_run(tmp_path, argv, capsys):
    # edge: --out naming a file (the bench failed on mkdir after its ceilings, the tune after its first bucket)
    f = tmp_path / "file"
    f.write_text("x")
    assert main(argv + ["--out", str(f)]) == 2
    _one_line(capsys, "--out", "not a folder")
    assert main(argv + ["--out", str(f / "sub")]) == 2  # edge: a file where a parent folder would be made
    _one_line(capsys, "--out")


def test_config_dir_env_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    # edge: $MOEKIT_CONFIG_DIR (tune's default --out) naming a file
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(f))
    assert main(["tune", "--models", "qwen3-30b-a3b"]) == 2
    _one_line(capsys, "--out", "MOEKIT_CONFIG_DIR")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--eager-tokens", "1,8"], "--eager-tokens"),  # edge: --eager-tokens without --eager was ignored
    (["tune", "--models", "qwen3-30b-a3b", "--activation", "gelu"], "--activation"),  # edge: ignored with --models
    (["tune", "--points", "qwen3-30b-a3b:1", "--has-bias"], "--has-bias"),  # edge: ignored with --points
    (["tune", "-E", "8", "-H", "64", "-I", "64", "-K", "9"], "--top-k"),  # edge: top-k above the experts
    (["tune", "-E", "8", "-H", "100", "-I", "64", "-K", "2", "--quant", "mxfp4"], "multiple of 32"),  # edge: H % 32
])
def test_options_that_cannot_apply_are_usage_errors(argv, needle, capsys):
    assert main(argv) == 2
    _one_line(capsys, needle)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The CLI past its CUDA check, the tuner on a named H200 (nothing runs on a device in these tests)."""
    import moekit.benchmarking.tune as tune
    import moekit.cli as cli

    monkeypatch.setattr(cli, "_needs_cuda", lambda name: True)
    monkeypatch.setattr(tune, "_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(tune, "_device_traits", lambda: (132, (9, 0)))


@pytest.mark.parametrize("text", ["", "[1]"])
def test_a_broken_config_file_in_the_tune_folder_is_one_line(tmp_path, fake_gpu, text, capsys):
    # edge: <out>/<gpu>.json empty (JSONDecodeError) or a list (AttributeError): tracebacks on the GPU
    (tmp_path / "NVIDIA_H200.json").write_text(text)
    assert main(["tune", "--models", "qwen3-30b-a3b", "--out", str(tmp_path)]) == 1
    _one_line(capsys, "NVIDIA_H200.json", "moekit tune")


def test_out_of_gpu_memory_in_bench_is_one_line(fake_gpu, monkeypatch, capsys):
    # edge: a token count too large for the GPU: the OOM ended the bench with a traceback
    import moekit.benchmarking.bench as bench

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text")

    monkeypatch.setattr(bench, "run_bench", oom)
    assert main(["bench", "--models", "qwen3-30b-a3b", "--tokens", "1048576"]) == 1
    _one_line(capsys, "moekit bench: error:", "out of memory")


def test_a_closed_stdout_is_not_a_traceback(monkeypatch):
    # edge: `moekit demo | head -1`: the reader gone, BrokenPipeError escaped main as a traceback
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["demo", "--device", "cpu", "--repeats", "1"]) == 141


def test_bench_says_when_it_replaces_a_run_of_today(tmp_path, monkeypatch):
    # edge: --out reused on the same day: <gpu>-<date>.json was replaced without a word
    import datetime

    import moekit.benchmarking.bench as bench
    from moekit.benchmarking import MODELS

    monkeypatch.setattr(bench, "measure_ceilings", lambda device: (2e12, 3e12, 7e14))
    monkeypatch.setattr(bench, "write_plots", lambda *a, **k: [])
    earlier = tmp_path / f"cpu-{datetime.date.today().isoformat()}.json"
    earlier.write_text("[]")
    log = []
    m = MODELS["qwen3-30b-a3b"].replace(E=4, K=2, H=32, I=32)
    bench.run_bench([m], [1], out=tmp_path, log=log.append, fast=True, routing=False, experts=False, device="cpu",
                    backend="torch", timer=lambda fn, inputs, **kw: [fn(*i) for i in inputs] and 1.0)
    assert any("exists" in s and "replaces" in s for s in log), log


# -- benchmarks/*.py ------------------------------------------------------------------------------
def _bench_json(path, rows=None):
    path.write_text(json.dumps(rows if rows is not None else
                               [dict(model="qwen3-30b-a3b", tokens=1, impl="moekit", quant="bf16", us=30.0)]))
    return str(path)


@pytest.mark.parametrize("make", [
    lambda d: str(d / "missing.json"),  # edge: a results file that does not exist
    lambda d: _bench_json(d / "empty.json", []),  # edge: an empty list (was "0 of 15 targets met", exit 0)
    lambda d: (d / "bad.json").write_text("") or str(d / "bad.json"),  # edge: an empty file
    lambda d: _bench_json(d / "probe.json", {"device": "x", "rows": [{"piece": "a"}]}),  # edge: another script's JSON
])
def test_compare_refuses_what_is_not_a_bench_json(tmp_path, make, capsys):
    with bench_script("compare") as compare:
        with pytest.raises(SystemExit) as stop:
            compare.main([make(tmp_path), "--baseline", "none"])
    assert stop.value.code == 2
    _one_line(capsys, "compare.py: error:")


def test_compare_checks_its_output_paths_first(tmp_path, capsys):
    # edge: --md in a folder that does not exist: the report printed, then a traceback
    with bench_script("compare") as compare:
        with pytest.raises(SystemExit) as stop:
            compare.main([_bench_json(tmp_path / "r.json"), "--baseline", "none", "--md", str(tmp_path / "no" / "x")])
    assert stop.value.code == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("extra", [["--labels", ","], []])
def test_triton_ab_refuses_empty_labels_and_other_json(tmp_path, extra, capsys):
    # edge: empty column names; a JSON of another script (KeyError 'impl')
    good = _bench_json(tmp_path / "a.json")
    other = good if extra else _bench_json(tmp_path / "b.json", {"rows": [{"piece": "x"}]})
    with bench_script("triton_ab") as ab:
        with pytest.raises(SystemExit) as stop:
            ab.main([good, other, *extra])
    assert stop.value.code == 2
    _one_line(capsys, "triton_ab.py: error:")


@pytest.mark.parametrize("argv, needle", [
    (["--shapes", "nosuch"], "--shapes"),  # edge: an unknown shape (KeyError)
    (["--formats", "fp4"], "--formats"),  # edge: an unknown format (KeyError after the weights were made)
    (["--tokens", "1,,2"], "--tokens"),  # edge: an empty token item (ValueError mid-run)
    (["--rounds", "0"], "--rounds"),  # edge: no rounds (min() of nothing at the first point)
    (["--out", "/nonexistent-dir/x.json"], "--out"),  # edge: an output file written only at the end
])
def test_heuristic_ab_checks_its_arguments_first(argv, needle, capsys):
    with bench_script("heuristic_ab") as ab:
        with pytest.raises(SystemExit) as stop:
            ab.main(argv)
    assert stop.value.code == 2
    _one_line(capsys, needle)


@pytest.mark.skipif(GPU, reason="the CPU-only message")
@pytest.mark.parametrize("name", ["heuristic_ab", "eager_profile"])
def test_gpu_scripts_without_a_gpu_exit_1(tmp_path, name, capsys):
    # edge: no CUDA: heuristic_ab raised AssertionError, eager_profile exited 2 (the status of a usage error)
    with bench_script(name) as mod:
        assert mod.main(["--out", str(tmp_path / "x.json")]) == 1
    _one_line(capsys, "needs a CUDA GPU")


@pytest.mark.parametrize("argv, needle", [
    (["--models", "nosuch"], "--models"),  # edge: an unknown model (KeyError inside the GPU run)
    (["--tokens", "1,,8"], "--tokens"),  # edge: an empty token item
])
def test_eager_profile_checks_its_arguments_first(tmp_path, argv, needle, capsys):
    with bench_script("eager_profile") as ep:
        with pytest.raises(SystemExit) as stop:
            ep.main(["--out", str(tmp_path / "x.json"), *argv])
    assert stop.value.code == 2
    _one_line(capsys, needle)


@pytest.fixture
def bench_transformers(monkeypatch):
    pytest.importorskip("transformers")
    with bench_script("bench_transformers") as bt:
        calls = []
        monkeypatch.setattr(bt, "run_model", lambda key, *a: calls.append(key) or {"variants": {}})
        bt.calls = calls
        yield bt


@pytest.mark.parametrize("argv, needle", [
    (["--tiny", "--models", "nosuch"], "--models"),  # edge: an unknown model was a "FAILED" entry and exit 0
    (["--tiny", "--graph-tokens", "-1"], "--graph-tokens"),  # edge: a negative graph limit
])
def test_bench_transformers_checks_its_arguments_first(bench_transformers, tmp_path, argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_transformers.main([*argv, "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and bench_transformers.calls == []
    _one_line(capsys, needle)


def test_bench_transformers_exit_status(bench_transformers, tmp_path, monkeypatch, capsys):
    # edge: a model that failed left the exit status 0
    def fail(key, *a):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench_transformers, "run_model", fail)
    assert bench_transformers.main(["--tiny", "--models", "gpt_oss_120b", "--out", str(tmp_path / "x.json")]) == 1
    assert "boom" in json.loads((tmp_path / "x.json").read_text())["models"]["gpt_oss_120b"]["error"]


@pytest.mark.skipif(GPU, reason="the CPU-only refusal")
def test_bench_transformers_real_widths_need_a_gpu(bench_transformers, tmp_path, capsys):
    # edge: without --tiny on a CPU it built DeepSeek-V3's 22.5 GB layer on the host
    assert bench_transformers.main(["--out", str(tmp_path / "x.json")]) == 1
    assert bench_transformers.calls == []
    _one_line(capsys, "needs a CUDA GPU", "--tiny")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, fake_gpu, capsys):
    # edge (round 53's second review): a UTF-16 <gpu>.json raised UnicodeDecodeError (a ValueError, not a
    # JSONDecodeError) through the tuner: a traceback once the CLI caught only its own config error
    (tmp_path / "NVIDIA_H200.json").write_text('{"entries": {}}', encoding="utf-16")
    assert main(["tune", "--models", "qwen3-30b-a3b", "--out", str(tmp_path)]) == 1
    _one_line(capsys, "NVIDIA_H200.json", "not valid JSON")
