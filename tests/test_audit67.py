"""Round 67's audit: defects found by review helpers and reproduced; each case names the edge it covers."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch

import moekit


def _longcat():
    g = torch.Generator().manual_seed(2)
    e, z, h, i = 8, 2, 32, 48
    layer = moekit.FusedMoE(e, 3, h, i, renormalize=False, zero_expert_type="identity",
                            e_score_correction_bias=torch.randn(e + z, generator=g) * 0.1, routed_scaling_factor=1.5,
                            backend="torch")
    layer.load_expert_weights(torch.randn(e, 2 * i, h, generator=g) * h ** -0.5,
                              torch.randn(e, h, i, generator=g) * i ** -0.5)
    return layer, torch.randn(4, h, generator=g), torch.randn(4, e + z, generator=g)


def test_zero_expert_output_of_a_finished_thread_is_not_read_by_a_new_one():
    # edge: the side channel was a dict keyed by threading.get_ident(); the OS reuses a finished thread's id, so a new
    # thread that never routed read the value a dead thread left (14 of 20 in the audit), and dead threads' tensors
    # stayed in the router
    layer, x, logits = _longcat()
    router = layer.router
    for _ in range(20):
        a = threading.Thread(target=router.select_experts, args=(x, logits))
        a.start()
        a.join()
        got = []
        b = threading.Thread(target=lambda: got.append(router.zero_expert_output))
        b.start()
        b.join()
        assert got == [None]
    router.select_experts(x, logits)  # this thread's own value: read once, then None
    assert router.zero_expert_output is not None and router.zero_expert_output is None


def test_zero_expert_output_is_not_carried_by_copies_or_saves():
    # edge: a deep copy (a replica per worker) handed out the original's pending value, and torch.save wrote it
    layer, x, logits = _longcat()
    layer.router.select_experts(x, logits)  # routed, not read
    assert copy.deepcopy(layer).router.zero_expert_output is None
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.router.zero_expert_output is None
    loaded.router.select_experts(x, logits)  # the loaded router still works as the seed's
    want = layer.router.zero_expert_output
    assert torch.equal(loaded.router.zero_expert_output, want)


def test_a_router_saved_with_the_old_side_channel_dict_still_routes():
    # edge: routers pickled before round 67 hold a dict in _zero_expert_output; reading / routing must not fail
    layer, x, logits = _longcat()
    layer.router.__dict__["_zero_expert_output"] = {123: torch.ones(4, 32)}
    assert layer.router.zero_expert_output is None
    layer.router.select_experts(x, logits)
    assert layer.router.zero_expert_output is not None


def _weights_past_fp16(e=2, h=64, i=64):
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(e, 2 * i, h, generator=g) * 0.01
    w2 = torch.randn(e, h, i, generator=g) * 0.01
    w13[0, i + 6, 3] = 1e5  # one up-projection weight past float16's range once dequantised
    return w13, w2


@pytest.mark.parametrize("fmt", [moekit.Mxfp4Format(), moekit.Int4GroupFormat(32)], ids=["mxfp4", "int4_g32"])
def test_fp16_weight_only_layers_refuse_weights_past_fp16_range(fmt):
    # edge: float16 mxfp4 / int4 layers dequantise W to float16 (SPEC §8): a group past 65504 loaded silently and every
    # token routed to the expert came out NaN (192 of 192), while an unquantised fp16 layer refuses such a weight.
    # Checked by every load path: whole stacks, state dicts, one shard at a time (scale first or weight first).
    w13, w2 = _weights_past_fp16()
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, fmt)

    def layer(dtype=torch.float16):
        return moekit.FusedMoE(2, 1, 64, 64, params_dtype=dtype, quant_config=fmt, backend="torch")

    with pytest.raises(ValueError, match="w13 of expert 0 holds 1 finite values outside float16's range"):
        layer().load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    fp32 = layer(torch.float32)
    fp32.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)  # float32 holds them
    assert torch.isfinite(fp32(torch.randn(3, 64), torch.tensor([[5.0, -5.0]] * 3))).all()
    with pytest.raises(ValueError, match="state dict entries routed_experts.w13 of expert 0"):
        layer().load_state_dict(fp32.state_dict())
    for order in (("scale", "weight"), ("weight", "scale")):
        experts = layer().routed_experts
        parts = {"scale": s13[0, 64:], "weight": q13[0, 64:]}
        experts.load_expert_shard(0, "w3", parts[order[0]], kind=order[0])
        with pytest.raises(ValueError, match=r"expert 0 w3 \w+ \(dequantised\) holds 1 finite values"):
            experts.load_expert_shard(0, "w3", parts[order[1]], kind=order[1])
    experts = layer().routed_experts  # a float shard quantised on load: its own pair
    with pytest.raises(ValueError, match=r"expert 0 w3 weight \(dequantised\)"):
        experts.load_expert_shard(0, "w3", w13[0, 64:])
    ok = layer()  # in range: every path loads, as before
    small13 = w13.clone()
    small13[0, 70, 3] = 0.02
    k13, k2, t13, t2 = moekit.quantize_experts(small13, w2, fmt)
    ok.load_expert_weights(k13, k2, w13_scale=t13, w2_scale=t2)
    assert torch.isfinite(ok(torch.randn(3, 64, dtype=torch.float16), torch.tensor([[5.0, -5.0]] * 3))).all()


def test_nan_in_hidden_states_with_a_gate_says_where_the_logits_came_from():
    # edge: a NaN in hidden_states reached the router through the layer's gate; the error blamed "router_logits",
    # which the caller never passed, and named no row
    g = torch.Generator().manual_seed(0)
    layer = moekit.FusedMoE(4, 2, 16, 8, gate=torch.nn.Linear(16, 4, bias=False), backend="torch")
    layer.load_expert_weights(torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 8, generator=g))
    x = torch.randn(5, 16, generator=g)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"router_logits contains non-finite values \(e.g. .*first in row 3\).*"
                                         r"its gate's output: non-finite hidden_states"):
        layer(x)


def test_functional_call_with_a_never_loaded_layers_own_detached_tensors_is_refused():
    # review of round 66: the functional_call exemption took any plain tensors as "swapped in whole", so the common
    # ``{k: v.detach() for k, v in layer.named_parameters()}`` of a never-loaded layer computed with its NaN memory
    from torch.func import functional_call
    x, lg = torch.randn(3, 16), torch.randn(3, 8)
    for quant in (None, moekit.Int4GroupFormat(32)):
        layer = moekit.FusedMoE(8, 2, 16 if quant is None else 32, 8 if quant is None else 32, quant_config=quant,
                                backend="torch")
        given = {k: v.detach() for k, v in layer.named_parameters()}
        h = 16 if quant is None else 32
        with pytest.raises(RuntimeError, match="forward before the expert weights were loaded"):
            functional_call(layer, given, (torch.randn(3, h), lg))
    template, source = moekit.FusedMoE(8, 2, 16, 8, backend="torch"), moekit.FusedMoE(8, 2, 16, 8, backend="torch")
    source.load_expert_weights(torch.randn(8, 16, 16), torch.randn(8, 16, 8))
    given = {k: v.detach() for k, v in source.named_parameters()}  # another layer's loaded values: still runs
    torch.testing.assert_close(functional_call(template, given, (x, lg)), source(x, lg))


def test_the_swapped_in_check_does_not_compute_a_parametrized_weight():
    # review of round 66: the swapped-in check read every parametrized weight once more (a whole [E, 2I, H] computed
    # once more a forward); it checks the stored tensors only
    from torch.nn.utils import parametrize
    from moekit.experts.loaded_record import check_swapped_in
    calls = []

    class Same(torch.nn.Module):
        def forward(self, w):
            calls.append(1)
            return w * 1.0

    layer = moekit.FusedMoE(8, 2, 16, 8, backend="torch")
    layer.load_expert_weights(torch.randn(8, 16, 16), torch.randn(8, 16, 8))
    parametrize.register_parametrization(layer.routed_experts, "w13_weight", Same())
    layer(torch.randn(3, 16), torch.randn(3, 8))
    calls.clear()
    check_swapped_in(layer.routed_experts)
    assert calls == []


def test_functional_call_supplying_a_to_empty_bias_keeps_the_layers_own_refused():
    # review of round 66: a functional_call that supplied the router's bias counted as writing it: the refusal of the
    # layer's own to_empty'd (NaN) bias was dropped, and the next plain forward blamed "non-finite values"
    from torch.func import functional_call
    layer = moekit.FusedMoE(8, 2, 16, 8, device="meta", backend="torch", scoring_func="sigmoid",
                            e_score_correction_bias=torch.zeros(8, device="meta")).to_empty(device="cpu")
    layer.load_expert_weights(torch.randn(8, 16, 16) / 4, torch.randn(8, 16, 8) / 4)
    x, lg = torch.randn(4, 16), torch.randn(4, 8)
    assert torch.isfinite(functional_call(layer, {"router.e_score_correction_bias": torch.randn(8)}, (x, lg))).all()
    with pytest.raises(RuntimeError, match="e_score_correction_bias came from to_empty"):
        layer(x, lg)
    layer.router.e_score_correction_bias = torch.zeros(8)  # an assignment: the layer's bias from now on
    assert torch.isfinite(layer(x, lg)).all()


def test_the_torch_zero_combine_runs_in_row_blocks_with_the_same_bits(monkeypatch):
    # review (memory): the torch combine of zero experts / output scaling built several [T, H] float32 temporaries
    # outside any workspace (6 GB at T = 262144, H = 2048); it runs in row blocks, elementwise: the same bits
    import moekit.ops.zero_experts as zero
    g = torch.Generator().manual_seed(0)
    routed, x = torch.randn(37, 16, generator=g).bfloat16(), torch.randn(37, 16, generator=g).bfloat16()
    s = torch.rand(37, generator=g)
    want = [zero.zero_combine_torch(routed, x, s, 2.5), zero.zero_combine_torch(routed, None, None, 0.5)]
    monkeypatch.setattr(zero, "COMBINE_WORKSPACE_BYTES", 16 * 16 * 5)  # 5 rows a block: 8 blocks, a partial last
    got = [zero.zero_combine_torch(routed, x, s, 2.5), zero.zero_combine_torch(routed, None, None, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("fmt", [moekit.Mxfp4Format(), moekit.Fp8BlockFormat(block_n=32, block_k=32)],
                         ids=["mxfp4", "fp8"])
def test_the_quantised_twin_chunks_by_one_experts_rows(fmt, monkeypatch):
    # review (CPU cost): the quantised twin counted every slot's w13 / activation rows in its chunk size (one expert
    # runs at a time), so chunks were 2.2-2.7x smaller than the workspace allows and each dequantised every expert
    # again; the output is the same bits whatever the chunking
    import moekit.ops.experts_quant as quant
    from moekit.ops.experts_quant import fused_experts_quant_torch as fused_experts_quant
    chunks = []
    real = quant._token_chunk
    monkeypatch.setattr(quant, "_token_chunk", lambda x, *a: chunks.append(len(x)) or real(x, *a))
    g = torch.Generator().manual_seed(1)
    e, h, i, t, k = 4, 64, 64, 40, 2
    w13, w2, s13, s2 = moekit.quantize_experts(torch.randn(e, 2 * i, h, generator=g) / 8,
                                               torch.randn(e, h, i, generator=g) / 8, fmt)
    x = torch.randn(t, h, generator=g).bfloat16()
    w = torch.rand(t, k, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    kw = dict(fmt=fmt, w13_scale=s13, w2_scale=s2)
    whole = fused_experts_quant(x, w13, w2, w, ids, **kw)
    per_token = 4 * k * h + 16 * k + 64 + 4 * (2 * h + 2 * i + 2 * i)
    chunks.clear()
    got = fused_experts_quant(x, w13, w2, w, ids, workspace_bytes=7 * per_token, **kw)  # 7 tokens a chunk
    assert torch.equal(got, whole) and max(chunks) == 7 and len(chunks) == 6  # (it ran chunks of 4: 10 of them)
