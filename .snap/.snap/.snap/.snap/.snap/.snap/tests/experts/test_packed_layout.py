"""Packed 4-bit words re-laid for the register-operand GEMMs (``packed_layout == "rega"``, :mod:`moekit.ops.w4_layout`)
on the Triton backend, here under the interpreter: the Triton kernels read re-laid words with the same bits as SPEC
§8's, a layer stores them re-laid where it can (and SPEC §8's packing where it cannot), every write path re-lays,
state dicts hold SPEC §8's packing both ways, and adopted weights are used as given. The register-operand Gluon
kernels on re-laid words: ``tests/ops/test_w4_relaid.py`` (GPU)."""

import pytest
import torch

import moekit

pytest.importorskip("triton")

from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.quant_spec import QuantSpec  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402
from moekit.ops import w4_layout  # noqa: E402
from moekit.ops.w4_layout import relay_rega, rega_layout_ok  # noqa: E402
from small_experts import DEV  # noqa: E402

E, K, H, I, T = 4, 2, 256, 128, 5
FMTS = {"mxfp4": moekit.Mxfp4Format(), "int4_g32": moekit.Int4GroupFormat(32),
        "int4_g128": moekit.Int4GroupFormat(128)}


def _problem(seed=0, t=T, bias=False, h=H, i=I):
    """Weights, input, logits and biases on :data:`DEV` (the interpreter on the CPU, else the GPU)."""
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * i, h, generator=g) / h**0.5, torch.randn(E, h, i, generator=g) / i**0.5
    x = torch.randn(t, h, generator=g).bfloat16()
    logits = torch.randn(t, E, generator=g)
    b1 = (torch.randn(E, 2 * i, generator=g) * 0.1).bfloat16() if bias else None
    b2 = (torch.randn(E, h, generator=g) * 0.1).bfloat16() if bias else None
    on = lambda v: None if v is None else v.to(DEV)  # noqa: E731
    return on(w13), on(w2), on(x), on(logits), on(b1), on(b2)


def _cfg(bm, swap):
    part = {"BN": 64, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, "SWAP": int(swap)}
    return {"BLOCK_M": bm, "w13": dict(part), "w2": dict(part)}


@pytest.mark.parametrize("fmt, bm, swap, t, h, i", [
    ("mxfp4", 16, True, 5, H, I),  # swapped decode tiles (swigluoai + biases)
    ("mxfp4", 64, False, 9, H, I),  # unswapped, wgmma-sized token rows
    ("mxfp4", 16, False, 1, H, I),  # one token, one row block per expert
    ("mxfp4", 16, True, 0, H, I),  # the empty batch
    ("int4_g32", 16, True, 5, H, I),
    ("int4_g32", 64, False, 9, H, I),
    ("int4_g128", 16, True, 5, H, I),  # one scale group per K step
    ("mxfp4", 16, True, 5, 192, 320),  # both GEMMs' rows end in a half chunk (gpt-oss's 2880 = 22.5 chunks)
    ("int4_g32", 64, False, 9, 320, 64),  # w2's K one half chunk only: its first step is the last
    ("mxfp4", 16, False, 1, 192, 128),  # w13's K with a half chunk, w2's whole
])
def test_triton_kernels_read_relaid_words_with_the_same_bits(fmt, bm, swap, t, h, i):
    w13, w2, x, logits, b1, b2 = _problem(t=t, bias=fmt == "mxfp4", h=h, i=i)
    q13, q2, s13, s2 = quantize_experts(w13, w2, FMTS[fmt])
    topk_w, topk_ids = torch.softmax(logits, -1).topk(K, -1)
    act = "swigluoai" if fmt == "mxfp4" else "silu"
    limit = 7.0 if act == "swigluoai" else None

    def run(p13, p2, relaid):
        spec = QuantSpec.of(FMTS[fmt], relaid=relaid)
        return tq.fused_experts_quant_impl(x, p13, p2, topk_w.contiguous(), topk_ids.int().contiguous(), spec, s13,
                                           s2, None, None, act, False, b1, b2, None, limit, config=_cfg(bm, swap))

    ref = run(q13, q2, False)
    out = run(relay_rega(q13), relay_rega(q2), True)
    assert torch.equal(ref, out)
    assert t == 0 or ref.abs().sum() > 0
    if (fmt, t) == ("mxfp4", 5):  # not vacuous: re-laid words read as SPEC §8's packing give other values
        assert not torch.equal(run(relay_rega(q13), relay_rega(q2), False), ref)
    if h % 128:  # not vacuous either: the half chunk's bytes are read (reversed, they give other values)
        bad = relay_rega(q13)
        bad[..., -16:] = relay_rega(q13)[..., -16:].flip(-1)
        assert not torch.equal(run(bad, relay_rega(q2), True), ref)


@pytest.mark.parametrize("fmt, h, i", [("mxfp4", H, I), ("int4_g32", H, I),
                                       ("mxfp4", 192, 320)])  # rows ending in a half chunk (gpt-oss's 2880)
def test_a_triton_layer_stores_relaid_words_and_computes_the_spec_bits(monkeypatch, fmt, h, i):
    if h % 128:  # layers store half chunks re-laid once the GPU bits are in (LAYER_HALF_CHUNKS): the path it turns on
        monkeypatch.setattr(w4_layout, "LAYER_HALF_CHUNKS", True)
    w13, w2, x, logits, _, _ = _problem(seed=1, h=h, i=i)
    q13, q2, s13, s2 = quantize_experts(w13, w2, FMTS[fmt])
    layer = moekit.FusedMoE(E, K, h, i, params_dtype=torch.bfloat16, quant_config=FMTS[fmt], backend="triton",
                           device=DEV)
    re = layer.routed_experts
    assert re.packed_layout == "rega" and "packed_layout='rega'" in repr(re)
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    assert torch.equal(re.w13_weight, relay_rega(q13)) and torch.equal(re.w2_weight, relay_rega(q2))
    out = layer(x, logits)
    # the same weights adopted as given (SPEC §8's packing: the layer then reads them so) give the same bits
    spec = moekit.FusedMoE(E, K, h, i, params_dtype=torch.bfloat16, quant_config=FMTS[fmt], backend="triton",
                           device=DEV)
    spec.routed_experts.adopt_weights(q13.clone(), q2.clone(), w13_scale=s13, w2_scale=s2)
    assert spec.routed_experts.packed_layout == "spec"
    assert torch.equal(spec(x, logits), out)
    # and the torch twin agrees within SPEC §8's weight-only tolerance
    twin = moekit.FusedMoE(E, K, h, i, params_dtype=torch.bfloat16, quant_config=FMTS[fmt], backend="torch",
                           device=DEV)
    assert twin.routed_experts.packed_layout == "spec"
    twin.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    ref = twin(x, logits).float()
    assert ((out.float() - ref).norm() / ref.norm()).item() <= 1e-2
    # its state dict holds SPEC §8's packing
    assert torch.equal(layer.state_dict()["routed_experts.w13_weight"], q13)


def test_state_dicts_hold_spec_packing_both_ways():
    w13, w2, x, logits, _, _ = _problem(seed=2)
    fmt = FMTS["mxfp4"]
    q13, q2, s13, s2 = quantize_experts(w13, w2, fmt)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="triton", device=DEV)
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    sd = layer.state_dict()
    assert torch.equal(sd["routed_experts.w13_weight"], q13) and torch.equal(sd["routed_experts.w2_weight"], q2)
    assert torch.equal(layer.routed_experts.w13_weight, relay_rega(q13))  # saving left the layer's words alone
    again = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="triton", device=DEV)
    again.load_state_dict(sd)
    assert torch.equal(again.routed_experts.w13_weight, relay_rega(q13))
    assert torch.equal(again(x, logits), layer(x, logits))
    # assign=True: the state dict's tensors are the caller's, left in SPEC §8's packing
    sd2 = {k: v.clone() for k, v in sd.items()}
    third = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="triton", device=DEV)
    third.load_state_dict(sd2, assign=True)
    assert torch.equal(sd2["routed_experts.w13_weight"], q13)
    assert torch.equal(third(x, logits), layer(x, logits))
    # a torch-backend layer (SPEC §8's packing) loads the same state dict
    twin = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch", device=DEV)
    twin.load_state_dict(sd)
    assert torch.equal(twin.routed_experts.w13_weight, q13)


def test_per_shard_loading_relays_each_shard():
    # load_weights / load_expert_shard: one expert's gate, up and down shards at a time (checkpoint order)
    w13, w2, _, _, _, _ = _problem(seed=3)
    fmt = FMTS["int4_g32"]
    q13, q2, s13, s2 = quantize_experts(w13, w2, fmt)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=fmt, backend="triton", device=DEV)
    re = layer.routed_experts
    for e in range(E):
        for shard, rows in (("w1", slice(0, I)), ("w3", slice(I, 2 * I))):
            re.load_expert_shard(e, shard, q13[e, rows])
            re.load_expert_shard(e, shard, s13[e, rows], kind="scale")
        re.load_expert_shard(e, "w2", q2[e])
        re.load_expert_shard(e, "w2", s2[e], kind="scale")
    assert re.loaded and torch.equal(re.w13_weight, relay_rega(q13)) and torch.equal(re.w2_weight, relay_rega(q2))
    assert torch.equal(re.w13_scale, s13.float()) and torch.equal(re.w2_scale, s2.float())  # scales as given


def test_where_the_words_stay_in_spec_packing():
    # float32 activations (K steps of 64), a K that is no whole number of 64-value half chunks (gpt-oss's I = 2880
    # over two tensor-parallel ranks: 1440 here; H = 96), fp8, the torch backend: SPEC §8's packing. Rows ending in
    # a half chunk (gpt-oss's own 2880) can be re-laid, but layers keep them SPEC-packed until their GPU bits are in
    # (LAYER_HALF_CHUNKS, round 45)
    mx = FMTS["mxfp4"]
    assert rega_layout_ok(mx, torch.bfloat16, 256, 128) and rega_layout_ok(mx, torch.float16, 7168, 2048)
    assert not rega_layout_ok(mx, torch.bfloat16, 2880, 2880) and not rega_layout_ok(mx, torch.bfloat16, 256, 64)
    assert rega_layout_ok(mx, torch.bfloat16, 2880, 2880, half_chunks=True)
    assert rega_layout_ok(mx, torch.bfloat16, 256, 64, half_chunks=True)
    assert not rega_layout_ok(mx, torch.float32, 256, 128)
    assert not rega_layout_ok(mx, torch.bfloat16, 2880, 1440, half_chunks=True)
    assert not rega_layout_ok(mx, torch.bfloat16, 96, 128, half_chunks=True)
    assert not rega_layout_ok(moekit.Fp8BlockFormat(128, 128), torch.bfloat16, 256, 128)
    assert not rega_layout_ok(None, torch.bfloat16, 256, 128)
    for kw in (dict(params_dtype=torch.float32, backend="triton"), dict(params_dtype=torch.bfloat16, backend="torch")):
        assert moekit.FusedMoE(E, K, H, I, quant_config=mx, device=DEV, **kw).routed_experts.packed_layout == "spec"
    assert moekit.FusedMoE(E, K, 96, I, params_dtype=torch.bfloat16, quant_config=mx, backend="triton",
                           device=DEV).routed_experts.packed_layout == "spec"
    assert not w4_layout.LAYER_HALF_CHUNKS
    assert moekit.FusedMoE(E, K, 192, I, params_dtype=torch.bfloat16, quant_config=mx, backend="triton",
                           device=DEV).routed_experts.packed_layout == "spec"


def test_relaid_refusals():
    with pytest.raises(ValueError, match="relaid=True is a layout of packed 4-bit weights"):
        QuantSpec.of(moekit.Fp8BlockFormat(128, 128), relaid=True)
    with pytest.raises(ValueError, match="need bfloat16 or float16 activations"):
        QuantSpec.of(FMTS["mxfp4"], relaid=True).fix_config(_cfg(16, True), torch.float32)
    w13, w2, x, logits, _, _ = _problem()
    q13, q2, s13, s2 = quantize_experts(w13, w2, FMTS["mxfp4"])
    # rows that are no whole number of half chunks cannot be re-laid words: refused, not read as if they were
    w13b, w2b, xb, _, _, _ = _problem(h=96, i=128)
    b13, b2, t13, t2 = quantize_experts(w13b, w2b, FMTS["mxfp4"])
    with pytest.raises(ValueError, match=r"re-laid 4-bit weights .*\(multiples of 64\), got H = 96, I = 128"):
        tq.fused_experts_quant_impl(xb, b13, b2, torch.ones(T, K, device=DEV),
                                    torch.zeros(T, K, dtype=torch.int32, device=DEV),
                                    QuantSpec.of(FMTS["mxfp4"], relaid=True), t13, t2, None, None, "silu", False,
                                    None, None, None, None, config=_cfg(16, True))
    with pytest.raises(ValueError, match="packed_layout must be 'spec' or 'rega', got 'marlin'"):
        tq.launch_quant_experts(x, q13, q2, torch.ones(T, K, device=DEV),
                                torch.zeros(T, K, dtype=torch.int32, device=DEV), fmt=FMTS["mxfp4"], w13_scale=s13,
                                w2_scale=s2, packed_layout="marlin")


def test_a_float32_cast_goes_back_to_spec_packing():
    # a re-laid bf16 layer cast to float32 (round 48: quantised layers' params_dtype follows a float cast): float32
    # activations cannot read re-laid words, so the layer stores SPEC §8's packing again and equals a float32 layer
    w13, w2, x, logits, _, _ = _problem(seed=2)
    q13, q2, s13, s2 = quantize_experts(w13, w2, FMTS["mxfp4"])
    kw = dict(quant_config=FMTS["mxfp4"], backend="triton", device=DEV)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, **kw)
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    assert layer.routed_experts.packed_layout == "rega"
    layer.float()
    re = layer.routed_experts
    assert re.packed_layout == "spec" and re.params_dtype == torch.float32
    assert torch.equal(re.w13_weight, q13) and torch.equal(re.w2_weight, q2)
    ref = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, **kw)
    ref.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    assert torch.equal(layer(x.float(), logits), ref(x.float(), logits))
