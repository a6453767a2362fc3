"""Round 55's CLI audit: options that were silently ignored or doubled, `moekit inspect` tracebacks on malformed
config values, a --quant error that did not show its value, and the demo's timer on a second GPU."""

import contextlib
import json

import pytest
import torch

from moekit.cli import main
from test_audit53_cli import _one_line  # one stderr line naming the needles, no traceback

QWEN = dict(model_type="qwen3_moe", hidden_size=128, moe_intermediate_size=128, intermediate_size=256, num_experts=8,
            num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


@pytest.fixture
def past_cuda(monkeypatch):
    """The CLI past its CUDA check, with bench / tune replaced by recorders of what they were asked."""
    import moekit.benchmarking.bench as bench
    import moekit.benchmarking.tune as tune
    import moekit.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_needs_cuda", lambda name: True)
    monkeypatch.setattr(bench, "run_bench", lambda models, tokens, dtype, **kw: seen.update(kw, models=models,
                                                                                            tokens=tokens))
    monkeypatch.setattr(tune, "run_tune", lambda targets, dtype, **kw: seen.update(kw, targets=targets))
    return seen


def test_bench_duplicate_models_and_tokens_are_timed_once(past_cuda):
    # edge: `--models qwen3-30b-a3b,qwen3-30b-a3b --tokens 8,8,1`: every shape and point was timed twice (twice the
    # GPU time, duplicate rows in the JSON and the plots)
    assert main(["bench", "--models", "qwen3-30b-a3b,qwen3-30b-a3b", "--tokens", "8,8,1"]) == 0
    assert [m.name for m in past_cuda["models"]] == ["qwen3-30b-a3b"] and past_cuda["tokens"] == [8, 1]
    assert main(["bench", "--eager", "--eager-tokens", "1,1,8"]) == 0  # edge: the same in --eager-tokens
    assert list(past_cuda["eager_tokens"]) == [1, 8]
    assert main(["bench", "--eager-only", "--quant", "bf16"]) == 0  # (the defaults: no sweep, eager rows at 1,8,64)
    assert past_cuda["tokens"] == [] and list(past_cuda["eager_tokens"]) == [1, 8, 64]


def test_tune_duplicate_models_are_tuned_once(past_cuda):
    # edge: `tune --models mixtral-8x7b,mixtral-8x7b`: the shape was tuned twice, a second full budget
    assert main(["tune", "--models", "mixtral-8x7b,mixtral-8x7b", "--tokens", "1"]) == 0
    assert [m.name for m, _ in past_cuda["targets"]] == ["mixtral-8x7b"]
    from moekit.benchmarking import TOKENS

    assert main(["tune", "--models", "mixtral-8x7b"]) == 0 and past_cuda["targets"][0][1] == list(TOKENS)  # default


@pytest.mark.parametrize("argv, needle", [
    # edge: --tokens beside --points was ignored (the points carry their own token counts)
    (["tune", "--points", "qwen3-30b-a3b:1", "--tokens", "8"], "--tokens"),
    # edge: --tokens beside --eager-only was ignored (the eager rows run at --eager-tokens)
    (["bench", "--eager-only", "--tokens", "8"], "--tokens"),
    # edge: --quant beside --eager-only was ignored (the eager rows are unquantised)
    (["bench", "--eager-only", "--quant", "fp8"], "--quant"),
])
def test_options_ignored_by_the_run_are_usage_errors(argv, needle, capsys):
    assert main(argv) == 2
    _one_line(capsys, needle)


@pytest.mark.parametrize("argv, needles", [
    (["bench", "--quant", ""], ["--quant", "''"]),  # edge: an empty --quant said "argument --quant : empty name"
    (["bench", "--quant", "bf16,foo"], ["--quant", "'foo'"]),  # the item at fault, quoted
])
def test_bench_quant_errors_show_the_value(argv, needles, capsys):
    assert main(argv) == 2
    _one_line(capsys, *needles)


@pytest.mark.parametrize("field, value", [
    ("decoder_sparse_step", 0),  # edge: ZeroDivisionError traceback
    ("hidden_size", -1),  # edge: RuntimeError (negative tensor dimension) traceback
    ("hidden_size", float("inf")),  # edge: `Infinity` in config.json: OverflowError traceback
])
def test_inspect_malformed_values_are_one_line(tmp_path, field, value, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN, field: value}))
    assert main(["inspect", str(tmp_path)]) == 1
    _one_line(capsys, "moekit inspect: error:")


def test_inspect_deeply_nested_config_is_one_line(tmp_path, capsys):
    # edge: a config.json nested past the recursion limit: RecursionError traceback from json.load
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert main(["inspect", str(tmp_path)]) == 1
    _one_line(capsys, "moekit inspect: error:")


def test_time_events_times_the_device_it_is_given(monkeypatch):
    # edge: `moekit demo --device cuda:1`: the CUDA events and syncs went to the current device (cuda:0), so the
    # time per call of a layer on cuda:1 was not its time
    from moekit.benchmarking.timer import time_events

    state = {"current": 0}
    synced, recorded = [], []

    @contextlib.contextmanager
    def device(d):
        was, state["current"] = state["current"], torch.device(d).index
        try:
            yield
        finally:
            state["current"] = was

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(state["current"] if stream is None else stream)

        def synchronize(self):
            synced.append(state["current"])

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: synced.append(
        state["current"] if d is None else torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: state["current"] if d is None else
                        torch.device(d).index)
    assert time_events(lambda: None, 3, warmup=1, device="cuda:1") == 1.0
    assert recorded and synced and set(recorded) == set(synced) == {1}
    assert state["current"] == 0  # the caller's current device as it was
