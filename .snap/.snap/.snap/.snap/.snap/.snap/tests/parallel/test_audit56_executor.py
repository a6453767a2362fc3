"""Round 56: ``layer.expert_executor.chunk_tokens`` (docs/parallel.md) took 0, -1, 2.5 or "8", and the next forward
raised a bare ``range()`` / ``torch.cat`` error on every rank after the EP layout collective. The executor's knobs
(``chunk_tokens``, ``all_gather_min_tokens``, ``check_tp_tokens``) are now checked when set, with errors naming the
attribute, the value and what is expected. Single process: the setters need no process group."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.parallel.executor import DEFAULT_CHUNK_TOKENS, ParallelExecutor

np = pytest.importorskip("numpy")


def _executor(**kw) -> ParallelExecutor:
    """A parallel executor over a small layer's experts, without groups (what the setters need)."""
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, backend="torch")
    return ParallelExecutor(layer.routed_experts, **kw)


@pytest.mark.parametrize("attr, value, err, needle", [
    ("chunk_tokens", 0, ValueError, "got 0"),  # zero: range() step 0 in the forward before
    ("chunk_tokens", -1, ValueError, "got -1"),  # negative: torch.cat of no chunks before
    ("chunk_tokens", 2.5, TypeError, "got 2.5 (float)"),  # a float, even a whole one (8.0): range() TypeError before
    ("chunk_tokens", 8.0, TypeError, "got 8.0 (float)"),
    ("chunk_tokens", "8", TypeError, "got '8' (str)"),  # a string: a comparison TypeError before
    ("chunk_tokens", True, TypeError, "got True (bool)"),  # a bool is not a count
    ("chunk_tokens", None, TypeError, "got None (NoneType)"),  # None is not "no chunking"
    ("all_gather_min_tokens", -1, ValueError, "got -1"),  # negative threshold
    ("all_gather_min_tokens", 0.5, TypeError, "got 0.5 (float)"),
    ("all_gather_min_tokens", "1024", TypeError, "got '1024' (str)"),
    ("check_tp_tokens", 1, TypeError, "got 1 (int)"),  # a truth value, not a bool
    ("check_tp_tokens", "yes", TypeError, "got 'yes' (str)"),
])
def test_knobs_checked_at_assignment(attr, value, err, needle):
    ex = _executor()
    before = getattr(ex, attr)
    with pytest.raises(err) as caught:
        setattr(ex, attr, value)
    msg = str(caught.value)
    assert f"expert_executor.{attr} must be" in msg and needle in msg, msg
    assert getattr(ex, attr) == before  # a refused value leaves the knob as it was


def test_knob_messages_say_what_is_expected():
    # the message says the type and range expected (the library's int / bool checks)
    ex = _executor()
    with pytest.raises(ValueError, match=r"expert_executor.chunk_tokens must be >= 1, got 0"):
        ex.chunk_tokens = 0
    with pytest.raises(ValueError, match=r"expert_executor.all_gather_min_tokens must be >= 0, got -5"):
        ex.all_gather_min_tokens = -5
    with pytest.raises(TypeError, match=r"check_tp_tokens must be a bool \(True or False\)"):
        ex.check_tp_tokens = None


def test_valid_knobs_accepted():
    # edges accepted: the smallest chunk (1), threshold 0 (always all-gather) and None (the default rule), bools for the
    # TP check; numpy ints are refused as every int argument of the library is; the defaults are unchanged
    ex = _executor()
    assert ex.chunk_tokens == DEFAULT_CHUNK_TOKENS and ex.all_gather_min_tokens is None and ex.check_tp_tokens is False
    ex.chunk_tokens = 1
    assert ex.chunk_tokens == 1
    with pytest.raises(TypeError, match=r"chunk_tokens must be an int, got .*64.* \(int64\)"):
        ex.chunk_tokens = np.int64(64)
    for v in (0, 7, None):
        ex.all_gather_min_tokens = v
        assert ex.all_gather_min_tokens == v
    ex.all_gather_min_tokens = 0
    assert ex.choose(0, 2) == "all_gather"  # 0: always all-gather
    ex.check_tp_tokens = True
    assert ex.check_tp_tokens is True


def test_constructor_checks_too():
    # the same checks at construction (the knobs are keyword arguments of ParallelExecutor)
    with pytest.raises(ValueError, match=r"expert_executor.chunk_tokens must be >= 1, got 0"):
        _executor(chunk_tokens=0)
    with pytest.raises(TypeError, match=r"expert_executor.all_gather_min_tokens must be an int, got 1.5 \(float\)"):
        _executor(all_gather_min_tokens=1.5)
    assert _executor(chunk_tokens=16, all_gather_min_tokens=4).chunk_tokens == 16
