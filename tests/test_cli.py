"""The `moekit` command and the README's Python example."""

import re
from pathlib import Path

import pytest

from moekit.cli import build_parser, main
from moekit.demo import histogram

README = Path(__file__).resolve().parents[1] / "README.md"


def test_demo_runs_and_checks(capsys):
    # the main job: both layers agree with their float64 reference on the CPU
    assert main(["demo", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert "ZeroExpertRouter" in out and "GroupedTopKRouter" in out
    assert "time per call" in out and "expert load" in out


def test_no_command_means_demo():
    args = build_parser().parse_args(["demo"])
    assert args.command == "demo"


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


@pytest.mark.parametrize("name", ["bench", "tune", "inspect"])
def test_subcommands_are_forwarded(name, monkeypatch):
    # `moekit NAME ARGS...` hands ARGS to the subcommand's own entry point untouched
    import importlib

    from moekit.cli import FORWARDED

    module, func, _ = FORWARDED[name]
    seen = []
    fake = type("M", (), {func: staticmethod(lambda argv: seen.append(argv) or 0)})
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda m: fake if m == module else real_import(m))
    assert main([name, "--help", "x"]) == 0
    assert seen == [["--help", "x"]]
