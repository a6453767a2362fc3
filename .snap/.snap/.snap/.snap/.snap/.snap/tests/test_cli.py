"""The `moekit` command line: subcommands, help, exit codes, one-line errors; the README's quick start."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
from moekit.cli import build_parser, main
from moekit.demo import histogram

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_demo_runs_and_checks(capsys):
    # the main job: both layers agree with their float64 reference on the CPU
    assert main(["demo", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert "ZeroExpertRouter" in out and "GroupedTopKRouter" in out
    assert "time per call" in out and "expert load" in out


def test_bare_command_prints_help_and_exits_2(capsys):
    # no command is a mistake: the help goes to stderr, nothing runs, exit status 2
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: moekit" in captured.err and "demo" in captured.err and "inspect" in captured.err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["demo", "--repeats", "0"], ["--repeats", "'0'", ">= 1"]),
        (["demo", "--repeats", "x"], ["--repeats", "'x'", ">= 1"]),
        (["demo", "--device", "foo"], ["--device", "'foo'", "cpu, cuda or cuda:N"]),
        (["demo", "--dtype", "int8"], ["--dtype", "'int8'"]),
        (["demo", "surplus"], ["unrecognized", "surplus"]),
        (["bench", "--quant", "nvfp4"], ["--quant", "nvfp4", "not implemented yet"]),
        (["bench", "--quant", "fp16"], ["--quant", "fp16", "'bf16'"]),
        (["bench", "--models", "gpt-5"], ["--models", "'gpt-5'", "deepseek-v3"]),
        (["bench", "--tokens", "1,0"], ["--tokens", "'1,0'", ">= 1"]),
        (["tune"], ["--models", "--points", "--experts"]),
        (["tune", "--points", "qwen3-30b-a3b"], ["--points", "MODEL:TOKENS"]),
        (["tune", "--models", "mixtral-8x7b", "-E", "8"], ["one of"]),
        (["tune", "--min-gain", "2", "--models", "all"], ["--min-gain", "'2'"]),
        (["tune", "--models", "all", "--quant", "nvfp4"], ["--quant", "'nvfp4'", "fp8"]),
        (["tune", "--models", "all", "--quant", "fp8", "--dtype", "float32"], ["--quant", "16-bit"]),
        (["tune", "--models", "all", "--budget-s", "0"], ["--budget-s", "'0'"]),
        (["tune", "--models", "all", "--quant", "fp8", "--block-k", "128"], ["--block-k", "unquantised"]),  # (r51)
        (["tune", "--models", "all", "--block-k", "96"], ["--block-k", "96", "32, 64, 128"]),
        (["tune", "--models", "all", "--block-k", "abc"], ["--block-k", "expected 32, 64, 128 or 'auto'", "'abc'"]),
        (["--bogus"], ["--bogus"]),
        (["nosuch"], ["nosuch"]),
    ],
)
def test_usage_errors_are_one_line_on_stderr(argv, needles, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("argv", [["demo", "--device", "cuda"], ["demo", "--device", "cuda:0"]])
def test_cuda_device_without_gpu_is_a_usage_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--device" in err and "CUDA" in err and "cpu" in err and "\n" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("argv", [["bench"], ["tune", "--models", "qwen3-30b-a3b"]])
def test_gpu_subcommands_fail_cleanly_without_gpu(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and "\n" not in err


@pytest.mark.parametrize("name", ["demo", "bench", "tune"])
def test_every_option_has_help(name):
    parser = build_parser()
    sub = parser.subcommands[name]
    for action in sub._actions:
        assert action.help, f"moekit {name} {action.option_strings} has no help text"


def test_tune_help_names_where_it_writes(capsys):
    assert main(["tune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "$MOEKIT_CONFIG_DIR" in text and "~/.cache/moekit/configs" in text


def test_tune_and_bench_default_folders(tmp_path, monkeypatch):
    from moekit.benchmarking import bench, tune

    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(tmp_path / "cfg"))
    assert tune.default_out() == tmp_path / "cfg"
    monkeypatch.delenv("MOEKIT_CONFIG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tune.default_out() == tmp_path / ".cache" / "moekit" / "configs"
    monkeypatch.chdir(tmp_path)
    assert bench.default_out() == Path(".")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert bench.default_out() == Path("benchmarks") / "results"


def test_tune_points_group_by_model():
    args = build_parser().parse_args(["tune", "--points", "qwen3-30b-a3b:1,gpt-oss-120b:1024,qwen3-30b-a3b:256"])
    assert [(m.name, t) for m, t in args.points] == [("qwen3-30b-a3b", [1, 256]), ("gpt-oss-120b", [1024])]


def test_inspect_arguments_are_forwarded_untouched(monkeypatch):
    import moekit.loading.inspect as inspect_module

    seen = []
    monkeypatch.setattr(inspect_module, "inspect_main", lambda argv: seen.append(argv) or 0)
    assert main(["inspect", "--help", "x"]) == 0
    assert main(["inspect", "some/dir"]) == 0
    assert seen == [["--help", "x"], ["some/dir"]]


def test_python_dash_m_moekit():
    # `python -m moekit` is the same command (a subprocess: the package as a user runs it)
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "moekit", "--version"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"moekit {moekit.__version__}"
    run = subprocess.run([sys.executable, "-m", "moekit"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "usage: moekit" in run.stderr


def test_histogram_counts_every_expert():
    # every expert lands in exactly one bucket, including the extremes
    counts = [0, 1, 5, 5, 9, 100]
    rows = histogram(counts, bins=4)
    assert sum(int(r.split()[-2]) for r in rows) == len(counts)


def test_quickstart_block_has_two_commands():
    block = re.search(r"```bash quickstart\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "moekit demo" in lines[0] and "pytest" in lines[1]


def test_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_tune_quick_and_quant_reach_run_tune(monkeypatch):
    import moekit.benchmarking.tune as tune_module
    import moekit.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_needs_cuda", lambda name: True)
    monkeypatch.setattr(tune_module, "run_tune", lambda targets, dtype, **kw: seen.update(kw, targets=targets))
    assert main(["tune", "--models", "all", "--quant", "fp8", "--quick"]) == 0
    assert seen["quant"] == "fp8" and seen["quick"] and seen["budget_s"] == 45.0 and seen["rotations"] == 2
    assert len(seen["targets"]) == 5
    assert main(["tune", "--models", "qwen3-30b-a3b", "--quant", "bf16", "--budget-s", "20"]) == 0
    assert seen["quant"] is None and not seen["quick"] and seen["budget_s"] == 20.0 and seen["rotations"] == 4
    assert seen["force_block_k"] is None
    assert main(["tune", "--models", "qwen3-30b-a3b", "--block-k", "128"]) == 0 and seen["force_block_k"] == 128
    # round 52: --block-k auto reaches run_tune_auto (the BLOCK_K chosen over all buckets), with the same options
    import moekit.benchmarking.tune_auto as tune_auto

    auto = {}
    monkeypatch.setattr(tune_auto, "run_tune_auto", lambda targets, dtype, **kw: auto.update(kw, targets=targets))
    seen.clear()
    assert main(["tune", "--models", "qwen3-30b-a3b", "--block-k", "auto", "--budget-s", "30"]) == 0
    assert not seen and auto["budget_s"] == 30.0 and auto["quant"] is None and "force_block_k" not in auto
