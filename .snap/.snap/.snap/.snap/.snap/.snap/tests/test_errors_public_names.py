"""SPEC §7: errors name the argument as the user passes it.

The public routing functions take ``gating_output`` and ``topk`` (the seed's names); their errors said
``router_logits`` / ``top_k`` (the routers' names) until round 50. Each case checks the caller's name is in
the message and the internal one is not. The routers keep ``router_logits`` / ``top_k``.
"""

import pytest
import torch

import moekit
from moekit import FusedTopKRouter, GroupedTopk, fused_topk, fused_topk_bias, grouped_topk

E = 8
META = torch.device("meta")


def _hash(x, k, **o):
    # 5 tokens, a table [4, k] of expert 0 (k clamped to >= 1 so the table itself is valid)
    table = torch.zeros(4, k if isinstance(k, int) and k > 0 else 1, dtype=torch.long)
    return fused_topk_bias(None, x, None, k, True, input_tokens=torch.zeros(5, dtype=torch.long),
                           hash_indices_table=table, **o)


# every public routing function, as fn(gating_output, topk, **options); logits are [5, E] when well formed
FUNCS = {
    "fused_topk": lambda x, k, **o: fused_topk(None, x, k, True, **o),
    "fused_topk_bias": lambda x, k, **o: fused_topk_bias(None, x, torch.zeros(E), k, True, **o),
    "fused_topk_bias_hash": _hash,
    "grouped_topk": lambda x, k, **o: grouped_topk(None, x, k, True, 2, 2, **o),
    "grouped_topk_bias": lambda x, k, **o: grouped_topk(None, x, k, True, 2, 2, "sigmoid", 1.0,
                                                        torch.zeros(E), **o),
    # the seed's module: arguments topk / gating_output as well; forward_native is the torch path
    "GroupedTopk": lambda x, k, backend=None: GroupedTopk(k, True, 2, 2).forward_native(None, x),
}


def _raises(exc, fn, *args, **kw) -> str:
    with pytest.raises(exc) as err:
        fn(*args, **kw)
    return str(err.value)


def _names_caller(msg: str, caller: str, internal: str) -> None:
    assert caller in msg, msg
    assert internal not in msg, msg


@pytest.mark.parametrize("name", FUNCS)
def test_logits_rank_and_type_name_gating_output(name):
    fn = FUNCS[name]
    logits = torch.randn(5, E)
    # edge: rank 1 logits (one token's row, no T dim)
    _names_caller(_raises(ValueError, fn, logits[0], 2), "gating_output", "router_logits")
    # edge: rank 3 logits ([B, T, E]: the functions take [T, E] only)
    _names_caller(_raises(ValueError, fn, logits.unsqueeze(0), 2), "gating_output", "router_logits")
    # edge: integer logits
    _names_caller(_raises(TypeError, fn, logits.long(), 2), "gating_output", "router_logits")
    # edge: not a tensor at all
    _names_caller(_raises(TypeError, fn, logits.tolist(), 2), "gating_output", "router_logits")


@pytest.mark.parametrize("name", ["fused_topk", "fused_topk_bias", "grouped_topk"])
def test_token_count_mismatch_names_gating_output(name):
    # edge: hidden_states has 4 rows, gating_output 5 (the message named router_logits)
    x = torch.zeros(4, 16)
    logits = torch.randn(5, E)
    fn = {"fused_topk": lambda: fused_topk(x, logits, 2, True),
          "fused_topk_bias": lambda: fused_topk_bias(x, logits, torch.zeros(E), 2, True),
          "grouped_topk": lambda: grouped_topk(x, logits, 2, True, 2, 2)}[name]
    _names_caller(_raises(ValueError, fn), "gating_output", "router_logits")


@pytest.mark.parametrize("name", FUNCS)
def test_width_and_topk_errors_name_topk(name):
    fn = FUNCS[name]
    logits = torch.randn(5, E)
    # edge: topk wider than gating_output (K > E)
    _names_caller(_raises(ValueError, fn, logits, E + 1), "topk", "top_k")
    # edge: topk = 0 (below 1)
    _names_caller(_raises(ValueError, fn, logits, 0), "topk", "top_k")
    # edge: topk not an int
    _names_caller(_raises(TypeError, fn, logits, 2.0), "topk", "top_k")


def test_grouped_width_errors_name_topk():
    logits = torch.randn(5, E)
    # edge: topk above the experts of the kept groups (1 group of 2 experts kept, K = 3)
    _names_caller(_raises(ValueError, grouped_topk, None, logits, 3, True, 4, 1), "topk (3)", "top_k")
    # edge: gating_output's width not divisible by num_expert_group (names the group count, not top_k)
    msg = _raises(ValueError, grouped_topk, None, torch.randn(5, 9), 2, True, 2, 1)
    assert "num_expert_group" in msg, msg
    # edge: GroupedTopk (module, argument topk) refuses a bad topk at construction by its name
    _names_caller(_raises(ValueError, GroupedTopk, 0, True, 2, 1), "topk", "top_k")


def test_bias_and_hash_width_errors_name_the_callers_arguments():
    logits = torch.randn(5, E)
    # edge: a bias one column narrower than gating_output: named by its own argument, no internal name
    for call in (lambda: fused_topk_bias(None, logits, torch.zeros(E - 1), 2, True),
                 lambda: grouped_topk(None, logits, 2, True, 2, 2, "sigmoid", 1.0, torch.zeros(E - 1))):
        _names_caller(_raises(ValueError, call), f"e_score_correction_bias must have shape [{E}]", "router_logits")
    # edge: bias on another device than the logits: the device message names gating_output
    msg = _raises(ValueError, fused_topk_bias, None, logits, torch.zeros(E, device=META), 2, True)
    _names_caller(msg, "gating_output", "router_logits")
    msg = _raises(ValueError, grouped_topk, None, logits, 2, True, 2, 2, "sigmoid", 1.0, torch.zeros(E, device=META))
    _names_caller(msg, "gating_output", "router_logits")
    # edge: hash table narrower than topk: the shape message names topk
    table = torch.zeros(4, 2, dtype=torch.long)
    tokens = torch.zeros(5, dtype=torch.long)
    msg = _raises(ValueError, fused_topk_bias, None, logits, None, 3, True, input_tokens=tokens,
                  hash_indices_table=table)
    _names_caller(msg, "topk=3", "top_k")


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_gating_output(name, bad):
    # edge: NaN / inf logit on the reference (torch) path, which checks values
    logits = torch.randn(5, E)
    logits[2, 3] = bad
    msg = _raises(ValueError, FUNCS[name], logits, 2, backend="torch")
    _names_caller(msg, "gating_output contains non-finite", "router_logits")


def test_float64_beyond_float32_names_gating_output():
    # edge: a finite float64 logit that overflows float32 (the second branch of the value check)
    logits = torch.zeros(2, E, dtype=torch.float64)
    logits[0, 0] = 1e39
    _names_caller(_raises(ValueError, fused_topk, None, logits, 2, True, backend="torch"), "gating_output",
                  "router_logits")


def test_routers_keep_router_logits_and_top_k():
    # edge: the router classes' arguments are router_logits / top_k, and their errors keep those names
    router = FusedTopKRouter(2, E, renormalize=True)
    x = torch.zeros(5, 16)
    assert "router_logits" in _raises(ValueError, router.select_experts, x, torch.randn(5))
    bad = torch.randn(5, E)
    bad[0, 0] = float("nan")
    assert "router_logits" in _raises(ValueError, router.select_experts, x, bad)
    assert "top_k" in _raises(ValueError, FusedTopKRouter, E + 1, E)
    # and the layer too
    assert "top_k" in _raises(ValueError, moekit.FusedMoE, E, 0, 16, 8)


def test_triton_kernel_limit_names_topk():
    # edge: topk above the Triton routing kernel's limit (64), refused before any launch, by the caller's name
    pytest.importorskip("triton")
    from moekit.ops.kernels import triton_unavailable_reason

    if triton_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    msg = _raises(NotImplementedError, fused_topk, None, torch.randn(1, 128), 65, True, backend="triton")
    _names_caller(msg, "topk <= 64", "top_k")
