"""Round 53's audit: a layer's lifecycle and hidden state on the CPU (torch backend).

Copies (``copy.deepcopy``, ``pickle``, ``torch.save``), state dicts into fresh layers (strict, partial, ``assign``,
the meta device), dtype casts followed by loads, reloading a checkpoint, several layers in one model and in two
threads, the LongCat router's read-and-clear side channel, and inputs that are views, 3-D, empty or of other dtypes.
The defects it found each have a test here that failed before the fix (comments say which edge each covers).
"""

import copy
import io
import pickle
import threading

import pytest
import torch

import moekit
from reference import GatedMLP, assert_close_dtype, make_expert_weights, ref_layer, ref_route, spread_logits

E, H, I, K = 8, 32, 16, 2
QH, QI = 160, 96  # quantised shapes: fp8 [128, 128] blocks end in partial blocks, mxfp4 / int4 need multiples of 32
FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
QUANTS = {"fp8_block": FP8_BLOCK, "mxfp4": {"quant_method": "mxfp4"}, "int4": moekit.Int4GroupFormat(32)}
STATIC_FP8 = moekit.Fp8ChannelFormat(per_tensor=True, static_input=True)


def _weights(e, h, inter, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * inter, h, generator=g) * h**-0.5, torch.randn(e, h, inter, generator=g) * inter**-0.5


def _routing_kwargs(kind):
    """FusedMoE keywords and the logit width of each routing / module kind."""
    g = torch.Generator().manual_seed(4)
    if kind == "shared":
        return dict(shared_experts=GatedMLP(H, 8), shared_expert_gate=torch.nn.Linear(H, 1, bias=False),
                    gate=torch.nn.Linear(H, E, bias=False)), E
    if kind == "zero":
        return dict(zero_expert_type="identity", e_score_correction_bias=torch.randn(E + 2, generator=g) * 0.1,
                    routed_scaling_factor=2.0, renormalize=False), E + 2
    if kind == "hash":
        table = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(32)])
        return dict(hash_indices_table=table, scoring_func="sqrtsoftplus"), E
    if kind == "grouped":
        return dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                    e_score_correction_bias=torch.randn(E, generator=g) * 0.1), E
    if kind == "eplb":
        return dict(enable_eplb=True), E
    return {}, E


def _layer(kind="plain", dtype=torch.float32, **extra):
    """(loaded layer in eval mode, forward arguments, forward keywords) of a routing kind or a quantised format."""
    if kind in QUANTS:
        fmt = moekit.parse_quant_config(QUANTS[kind])
        layer = moekit.FusedMoE(E, K, QH, QI, params_dtype=torch.bfloat16, quant_config=QUANTS[kind], backend="torch")
        q13, q2, s13, s2 = moekit.quantize_experts(*_weights(E, QH, QI), fmt)
        layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
        g = torch.Generator().manual_seed(2)
        return layer.eval(), (torch.randn(6, QH, generator=g).bfloat16(), torch.randn(6, E, generator=g)), {}
    kw, n = _routing_kwargs(kind)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=dtype, backend="torch", **kw, **extra)
    layer.load_expert_weights(*_weights(E, H, I))
    g = torch.Generator().manual_seed(2)
    x, lg = torch.randn(6, H, generator=g).to(dtype), torch.randn(6, n, generator=g)
    fkw = dict(input_ids=torch.randint(0, 32, (6,), generator=g)) if kind == "hash" else {}
    return layer.eval(), ((x,) if kind == "shared" else (x, lg)), fkw


def _fresh(layer):
    """An unloaded layer built like ``layer`` (other random user modules, a zeroed bias)."""
    kind = getattr(layer, "_audit_kind")
    if kind in QUANTS:
        return moekit.FusedMoE(E, K, QH, QI, params_dtype=torch.bfloat16, quant_config=QUANTS[kind],
                               backend="torch").eval()
    kw, _ = _routing_kwargs(kind)
    torch.manual_seed(123)
    if "e_score_correction_bias" in kw:
        kw["e_score_correction_bias"] = torch.zeros_like(kw["e_score_correction_bias"])
    if kind == "shared":
        kw = _routing_kwargs("shared")[0]
    return moekit.FusedMoE(E, K, H, I, params_dtype=layer.routed_experts.params_dtype, backend="torch", **kw).eval()


KINDS = ["plain", "shared", "zero", "hash", "grouped", "eplb", *QUANTS]


def _built(kind):
    layer, args, kw = _layer(kind, dtype=torch.bfloat16 if kind == "plain" else torch.float32)
    layer._audit_kind = kind
    return layer, args, kw


def _torch_round_trip(layer):
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------ copies and state dicts (behaviours that hold)
@pytest.mark.parametrize("kind", KINDS)
def test_copies_give_the_same_bits_and_independent_state(kind):
    # deepcopy / pickle / torch.save of a whole layer of every routing kind and quantised format: same output, the
    # executor and EPLB state still point into the copy, and changing the copy's weights leaves the original alone
    layer, args, kw = _built(kind)
    ref = layer(*args, **kw)
    copies = [copy.deepcopy(layer), _torch_round_trip(layer)]
    if kind != "fp8_block":  # torch 2.13 cannot pickle float8 tensors (UntypedStorage has no dtype): torch.save can
        copies.append(pickle.loads(pickle.dumps(layer)))
    for other in copies:
        assert torch.equal(other(*args, **kw), ref)
        assert other.expert_executor.experts is other.routed_experts
        if kind == "eplb":
            assert other.router.eplb_state is other.expert_executor.eplb_state is not layer.router.eplb_state
        with torch.no_grad():
            other.routed_experts.w2_weight.zero_()
        assert torch.equal(layer(*args, **kw), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_into_a_fresh_layer_gives_the_same_bits(kind):
    # state_dict -> a new layer -> load_state_dict(strict) -> bit-identical output; quantised state dicts carry scales
    layer, args, kw = _built(kind)
    sd = layer.state_dict()
    if kind in QUANTS:
        assert {"routed_experts.w13_scale", "routed_experts.w2_scale"} <= set(sd)
    fresh = _fresh(layer)
    assert str(fresh.load_state_dict(sd)) == "<All keys matched successfully>"
    assert torch.equal(fresh(*args, **kw), layer(*args, **kw))


@pytest.mark.parametrize("kind", ["plain", "fp8_block"])
def test_a_partial_state_dict_names_its_keys_and_the_forward_raises(kind):
    # missing / unexpected keys are reported (strict raises, non-strict returns them); the layer then refuses to run
    layer, args, kw = _built(kind)
    sd = {k: v for k, v in layer.state_dict().items() if "w2" not in k}
    sd["bogus.weight"] = torch.zeros(1)
    fresh = _fresh(layer)
    with pytest.raises(RuntimeError, match="routed_experts.w2_weight"):
        fresh.load_state_dict(sd)
    res = fresh.load_state_dict(sd, strict=False)
    assert "routed_experts.w2_weight" in res.missing_keys and res.unexpected_keys == ["bogus.weight"]
    with pytest.raises(RuntimeError, match="expert 0 w2"):
        fresh(*args, **kw)


def test_load_expert_weights_twice_keeps_only_the_second():
    # reloading other weights and then the first ones gives the first layer's bits (no state left over)
    layer, (x, lg), _ = _layer()
    ref = layer(x, lg)
    layer.load_expert_weights(*_weights(E, H, I, seed=9))
    assert not torch.equal(layer(x, lg), ref)
    layer.load_expert_weights(*_weights(E, H, I))
    assert torch.equal(layer(x, lg), ref)


# ------------------------------------------------------------------ the meta device
def test_hash_routed_layer_builds_on_meta_and_loads():
    # round 53: FusedMoE(device="meta", hash_indices_table=<meta>) read the table's values (Tensor.item() on meta)
    # although a meta table is documented as accepted with device="meta"; it now builds, and loads both ways
    layer, (x, lg), kw = _layer("hash")
    ref = layer(x, lg, **kw)
    table = layer.router.hash_indices_table
    for assign in (False, True):
        meta = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, device="meta", backend="torch",
                               hash_indices_table=table.to("meta"), scoring_func="sqrtsoftplus").eval()
        if not assign:
            meta.to_empty(device="cpu")
        meta.load_state_dict(layer.state_dict(), assign=assign)
        assert torch.equal(meta(x, lg, **kw), ref)


def test_eplb_layer_built_on_meta_loads_with_assign():
    # an EPLB layer built on meta and loaded with assign=True (the usual init-on-meta pattern): round 53 found its
    # routing maps (non-persistent buffers) left on meta and the load hook reading them (.tolist() on meta); fixed in
    # moekit/parallel/eplb_state.py by that package's audit of the same round
    layer, (x, lg), _ = _layer("eplb")
    meta = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, device="meta", enable_eplb=True,
                           backend="torch").eval()
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(meta(x, lg), layer(x, lg))


# ------------------------------------------------------------------ dtype casts, then loads
@pytest.mark.parametrize("built,cast", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
                                        (torch.float16, torch.bfloat16)])
def test_a_cast_layer_loads_weights_in_its_new_dtype(built, cast):
    # round 53: .to(dtype) on an unquantised layer kept the construction dtype for loads, so a bf16 layer cast to
    # float32 (or float16) stored bf16-rounded weights and differed from a layer built in the new dtype
    w13, w2, b13, b2 = make_expert_weights(E, I, H, bias=True)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=built, has_bias=True, backend="torch").to(cast).eval()
    direct = moekit.FusedMoE(E, K, H, I, params_dtype=cast, has_bias=True, backend="torch").eval()
    for m in (layer, direct):
        m.load_expert_weights(w13, w2, b13, b2)
    re = layer.routed_experts
    assert re.params_dtype == cast == re.moe_config.params_dtype == layer.moe_config.params_dtype
    assert torch.equal(re.w13_weight, w13.to(cast)) and torch.equal(re.w13_bias, b13.to(cast))
    x, lg = torch.randn(5, H).to(cast), spread_logits(5, E)
    assert torch.equal(layer(x, lg), direct(x, lg))
    re.load_expert_shard(3, "w2", w2[3] * 2)  # one shard, the same way
    assert torch.equal(re.w2_weight[3], (w2[3] * 2).to(cast))


def test_an_assigning_load_of_another_dtype_is_followed():
    # round 53: load_state_dict(float32 state dict, assign=True) on a bf16 layer made its weights float32 but left its
    # loads (and moe_config) at bf16: a later load_expert_weights rounded through bf16
    src, (x, lg), _ = _layer(dtype=torch.float32)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, backend="torch").eval()
    layer.load_state_dict(src.state_dict(), assign=True)
    assert layer.routed_experts.moe_config.params_dtype == torch.float32
    assert torch.equal(layer(x, lg), src(x, lg))
    w13, w2 = _weights(E, H, I, seed=5)
    layer.load_expert_weights(w13, w2)
    assert torch.equal(layer.routed_experts.w13_weight, w13)


# ------------------------------------------------------------------ static input scales across reloads
def _static_checkpoint(w13, w2, scale):
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, STATIC_FP8)
    out = []
    for e in range(E):
        out += [(f"experts.{e}.gate_proj.weight", q13[e, :I]), (f"experts.{e}.up_proj.weight", q13[e, I:]),
                (f"experts.{e}.down_proj.weight", q2[e]), (f"experts.{e}.gate_proj.weight_scale", s13[e, 0]),
                (f"experts.{e}.up_proj.weight_scale", s13[e, 1]), (f"experts.{e}.down_proj.weight_scale", s2[e])]
        out += [(f"experts.{e}.{p}_proj.input_scale", torch.tensor(scale[e])) for p in ("gate", "up", "down")]
    return out


def test_reloading_static_input_scales_replaces_them():
    # round 53: each expert's static input scale was folded into a running max, so loading a second checkpoint with
    # smaller input scales (load_weights / load_expert_shard) kept the first one's: the layer then differed from a
    # fresh layer loaded with the second checkpoint alone, also after load_expert_weights or load_state_dict
    w13, w2 = _weights(E, H, I)
    big, small = [0.5] * E, [0.01 * (e + 1) for e in range(E)]

    def static_layer():
        return moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=STATIC_FP8,
                               backend="torch").eval()

    want = static_layer()
    want.load_weights(_static_checkpoint(w13, w2, small))
    assert torch.equal(want.routed_experts.w13_input_scale, torch.full((E,), 0.08))
    x, lg = torch.randn(5, H).bfloat16(), spread_logits(5, E)
    first = static_layer()
    first.load_weights(_static_checkpoint(w13, w2, big))
    stacked = static_layer()
    q13, q2, s13, s2 = moekit.quantize_experts(w13, w2, STATIC_FP8)
    stacked.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2, w13_input_scale=torch.full((E,), 0.5),
                                w2_input_scale=torch.full((E,), 0.5))
    from_state = static_layer()
    from_state.load_state_dict(first.state_dict())
    for layer in (first, stacked, from_state):
        layer.load_weights(_static_checkpoint(w13, w2, small))
        assert torch.equal(layer.routed_experts.w13_input_scale, want.routed_experts.w13_input_scale)
        assert torch.equal(layer.routed_experts.w2_input_scale, want.routed_experts.w2_input_scale)
        assert torch.equal(layer(x, lg), want(x, lg))
    # one expert given again: the largest of every expert's latest one
    re = first.routed_experts
    re.load_expert_shard(7, "w2", torch.tensor(0.02), kind="input_scale")
    assert torch.equal(re.w2_input_scale, torch.full((E,), 0.07))
    re.load_expert_shard(2, "w2", torch.tensor(0.3), kind="input_scale")
    assert torch.equal(re.w2_input_scale, torch.full((E,), 0.3))
    # after a state dict the stored value stands for every expert until each is given again
    re = from_state.routed_experts
    re.load_expert_shard(0, "w2", torch.tensor(0.001), kind="input_scale")
    assert torch.equal(re.w2_input_scale, torch.full((E,), 0.08))


# ------------------------------------------------------------------ what a state dict may bring
@pytest.mark.parametrize("kind,key,bad,match", [
    ("mxfp4", "routed_experts.w13_scale", lambda t: t.index_fill(-1, torch.tensor([0]), 255), "255"),
    # (one element: a shard all NaN is the mark of a never-written one since round 62, read as "not loaded")
    ("fp8_block", "routed_experts.w2_scale", lambda t: t.flatten().index_fill(0, torch.tensor([0]), float("nan"))
     .view_as(t), "non-finite"),
    ("int4", "routed_experts.w13_scale", lambda t: -t, ">= 0"),
])
def test_a_state_dict_with_bad_scales_is_refused(kind, key, bad, match):
    # round 53: load_state_dict took scales that every other load path refuses (an e8m0 NaN byte, NaN or negative
    # float scales) and the layer returned NaN / wrong outputs; refused now, naming the entry, before anything is copied
    layer, args, kw = _built(kind)
    ref = layer(*args, **kw)
    sd = layer.state_dict()
    sd[key] = bad(sd[key].clone())
    with pytest.raises(ValueError, match=match) as err:
        layer.load_state_dict(sd)
    assert key in str(err.value)
    assert torch.equal(layer(*args, **kw), ref)


def test_a_state_dict_with_a_zero_static_input_scale():
    # round 53: a static fp8 input scale of 0 loaded and made every output NaN. All zero is what an unloaded layer
    # holds: read as "not given" (the forward says it is missing, whatever was loaded before); partly zero: ValueError
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, quant_config=STATIC_FP8, backend="torch")
    w13, w2 = _weights(E, H, I)
    layer.load_weights(_static_checkpoint(w13, w2, [0.1] * E))
    sd = layer.state_dict()
    sd["routed_experts.w2_input_scale"] = torch.tensor([0.1] * (E - 1) + [0.0])
    with pytest.raises(ValueError, match=r"'routed_experts.w2_input_scale' must be > 0"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.routed_experts.w2_input_scale, torch.full((E,), 0.1))
    sd["routed_experts.w2_input_scale"] = torch.zeros(E)
    layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="w2 input_scale"):
        layer(torch.randn(3, H, dtype=torch.bfloat16), torch.randn(3, E))


@pytest.mark.parametrize("quant", ["fp8_block", "mxfp4", "int4", "static_fp8"])
def test_an_unloaded_layers_state_dict_loads_into_another(quant):
    # round 53's review: the state-dict checks refused an unloaded quantised layer's state dict at random (scales were
    # torch.empty: NaN, negative or the e8m0 byte 255 by chance; static input scales 0): scales start at 0 now, and
    # an all-zero input scale is "not given" (that copy's forward says it is missing)
    cfg = STATIC_FP8 if quant == "static_fp8" else QUANTS[quant]
    for _ in range(5):
        a, b = (moekit.FusedMoE(E, K, QH, QI, params_dtype=torch.bfloat16, quant_config=cfg, backend="torch")
                for _ in range(2))
        b.load_state_dict(a.state_dict())
    if quant == "static_fp8":
        with pytest.raises(RuntimeError, match="input_scale"):
            b(torch.randn(3, QH, dtype=torch.bfloat16), torch.randn(3, E))


def test_byte_views_load_through_a_state_dict():
    # round 53's review: load_state_dict refused int8 codes / e8m0 scales that load_expert_weights takes as the same
    # bytes (stored()'s rule); they are read as uint8 views (copy_ would convert the values)
    layer, args, kw = _built("mxfp4")
    ref = layer(*args, **kw)
    sd = layer.state_dict()
    sd["routed_experts.w13_weight"] = sd["routed_experts.w13_weight"].view(torch.int8)
    if hasattr(torch, "float8_e8m0fnu"):
        sd["routed_experts.w2_scale"] = sd["routed_experts.w2_scale"].view(torch.float8_e8m0fnu)
    other, _, _ = _built("mxfp4")
    other.load_state_dict(sd)
    assert torch.equal(other(*args, **kw), ref)


def test_a_full_precision_state_dict_is_refused_by_a_quantised_layer():
    # round 53: an fp8 layer's load_state_dict copied bf16 weights of the same shape into its e4m3 codes (a plain cast,
    # no scale), keeping its old scales: silently wrong outputs; TypeError naming the entry and both dtypes now
    layer, args, kw = _built("fp8_block")
    ref = layer(*args, **kw)
    sd = layer.state_dict()
    sd["routed_experts.w13_weight"] = torch.randn(sd["routed_experts.w13_weight"].shape).bfloat16()
    with pytest.raises(TypeError, match=r"routed_experts.w13_weight.*float8_e4m3fn.*torch.bfloat16"):
        layer.load_state_dict(sd, strict=False)
    assert torch.equal(layer(*args, **kw), ref)


def test_a_state_dict_with_bad_routing_tensors_is_refused():
    # round 53: a hash table with ids outside [0, E) loaded silently (then torch's IndexError at the forward), a float
    # table was cast to ids, and a NaN selection bias loaded; each is refused as the constructor refuses it
    layer, args, kw = _built("hash")
    sd = layer.state_dict()
    table = sd["router.hash_indices_table"].clone()
    table[3, 0] = E + 5
    with pytest.raises(ValueError, match=r"hash_indices_table values must lie in \[0, 8\)"):
        layer.load_state_dict(dict(sd, **{"router.hash_indices_table": table}))
    with pytest.raises(TypeError, match="integer"):
        layer.load_state_dict(dict(sd, **{"router.hash_indices_table": table.float()}))
    assert torch.equal(layer.router.hash_indices_table, sd["router.hash_indices_table"])
    for kind in ("zero", "grouped"):
        layer, args, kw = _built(kind)
        sd = layer.state_dict()
        sd["router.e_score_correction_bias"] = torch.full_like(sd["router.e_score_correction_bias"], float("nan"))
        with pytest.raises(ValueError, match="router.e_score_correction_bias.*non-finite"):
            layer.load_state_dict(sd)


# ------------------------------------------------------------------ several layers, threads, side channels
def test_layers_sharing_a_gate_in_a_sequential_and_in_two_threads():
    # two layers sharing one gate module in an nn.Sequential: copies keep the sharing; forwards of the two layers from
    # two Python threads give their single-thread bits
    gate = torch.nn.Linear(H, E, bias=False)
    a = moekit.FusedMoE(E, K, H, I, gate=gate, backend="torch").eval()
    b = moekit.FusedMoE(E, K, H, I, gate=gate, backend="torch").eval()
    a.load_expert_weights(*_weights(E, H, I, seed=1))
    b.load_expert_weights(*_weights(E, H, I, seed=2))
    model = torch.nn.Sequential(a, b)
    x = torch.randn(5, H)
    out = model(x)
    twin = copy.deepcopy(model)
    assert twin[0].gate is twin[1].gate and twin[0].gate is not gate and torch.equal(twin(x), out)
    refs, bad = (a(x), b(x)), []

    def run(layer, ref):
        for _ in range(20):
            bad.extend([] if torch.equal(layer(x), ref) else ["mismatch"])

    threads = [threading.Thread(target=run, args=(m, r)) for m, r in zip((a, b), refs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_zero_expert_output_is_read_and_clear_and_the_forward_ignores_it():
    # LongCat's router: select_experts sets zero_expert_output, one read clears it; the layer's forward neither sets
    # it nor reads a stale one left by an unread select_experts
    layer, (x, lg), _ = _layer("zero")
    lg[:, E:] += 3.0  # zero experts chosen
    router = layer.router
    out = layer(x, lg)
    assert router.zero_expert_output is None
    router.select_experts(x, lg)
    first = router.zero_expert_output
    assert first is not None and first.shape == x.shape and router.zero_expert_output is None
    router.select_experts(x * 0, lg)  # left unread
    assert torch.equal(layer(x, lg), out)
    assert torch.equal(router.zero_expert_output, torch.zeros_like(x))


# ------------------------------------------------------------------ inputs
def test_input_views_shapes_and_dtypes():
    # non-contiguous and offset views of hidden_states and router_logits, [B, S, H] inputs, T = 0 and T = 1, logits in
    # fp16 / bf16 / fp64: the plain call's bits (routing runs in fp32), within SPEC §4 of the float64 reference
    layer, (x, lg), _ = _layer()
    w13, w2 = _weights(E, H, I)
    lg = spread_logits(6, E)
    out = layer(x, lg)

    def fn(_x, logits):
        return ref_route(logits, K, renormalize=True)[:2]

    assert_close_dtype(out, ref_layer(x, lg, route_fn=fn, num_experts=E, w13=w13, w2=w2), torch.float32)
    wide = torch.zeros(6, 2 * H)
    wide[:, ::2] = x
    flat = torch.zeros(6 * H + 3)
    flat[3:] = x.reshape(-1)
    for xv in (wide[:, ::2], flat[3:].view(6, H)):
        assert not xv.is_contiguous() or xv.storage_offset() == 3
        assert torch.equal(layer(xv, lg.t().contiguous().t()), out)
    assert torch.equal(layer(x.reshape(2, 3, H), lg.reshape(2, 3, E)), out.reshape(2, 3, H))
    assert layer(x[:0], lg[:0]).shape == (0, H) and layer(x.new_zeros(2, 0, H), lg[:0]).shape == (2, 0, H)
    torch.testing.assert_close(layer(x[:1], lg[:1]), out[:1], atol=1e-6, rtol=1e-6)  # torch path: not bitwise (§9)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(layer(x, lg.to(dt)), layer(x, lg.to(dt).float()))
    half = copy.deepcopy(layer).half()
    assert_close_dtype(half(x.half(), lg), ref_layer(x.half(), lg, route_fn=fn, num_experts=E, w13=w13.half(),
                                                     w2=w2.half()), torch.float16)
    with torch.inference_mode():
        assert torch.equal(layer(x, lg), out)


def test_compile_fullgraph_of_a_zero_expert_layer_with_shared_experts():
    # torch.compile(fullgraph=True) (documented for both backends) of a LongCat layer with shared experts and a gate
    torch._dynamo.reset()
    layer, (x, lg), _ = _layer("zero", shared_experts=GatedMLP(H, 8), gate=torch.nn.Linear(H, E + 2, bias=False))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for t in (3, 5, 1):
            xt = torch.randn(t, H)
            torch.testing.assert_close(compiled(xt), layer(xt), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


# ------------------------------------------------------------------ round 53's second review
def _rebalanced_by_hand(w13, w2, perm=(1, 0, 3, 2, 4, 5, 6, 7)):
    """A single-process EPLB layer whose slots hold ``perm`` (what a rebalance leaves: weights moved, maps set)."""
    layer = moekit.FusedMoE(8, 2, 32, 16, backend="torch", enable_eplb=True)
    layer.load_expert_weights(w13 * 2, w2)
    ex, st = layer.routed_experts, layer.expert_executor.eplb_state
    with torch.no_grad():
        ex.w13_weight.copy_((w13 * 2)[list(perm)])
        ex.w2_weight.copy_(w2[list(perm)])
    ex.set_physical_to_logical(perm)
    st.set_placement(ex.placement)
    return layer


def test_load_weights_with_moekits_own_names_into_a_rebalanced_layer():
    # the review: load_weights sent each per-slot tensor as a one-key state dict, which the partial rule then refused
    # on a rebalanced layer; they are gathered into one state dict (the initial placement, every slot rewritten)
    w13, w2 = torch.randn(8, 32, 32), torch.randn(8, 32, 16)
    x, lg = torch.randn(5, 32), torch.randn(5, 8)
    ref = moekit.FusedMoE(8, 2, 32, 16, backend="torch")
    ref.load_expert_weights(w13, w2)
    layer = _rebalanced_by_hand(w13, w2)
    layer.load_weights(iter(ref.state_dict().items()))
    assert layer.routed_experts.placement.physical_to_logical == tuple(range(8))
    torch.testing.assert_close(layer(x, lg), ref(x, lg))


def test_a_placement_without_the_weights_it_places_is_refused_before_any_copy():
    # the review: a state dict holding eplb_physical_to_logical (and w13 alone, or no weights) moved the placement
    # while the slots kept the old experts: silently wrong routing; refused, the layer left as it was
    w13, w2 = torch.randn(8, 32, 32), torch.randn(8, 32, 16)
    x, lg = torch.randn(5, 32), torch.randn(5, 8)
    src = _rebalanced_by_hand(w13, w2)
    sd = src.routed_experts.state_dict()
    for keep in (("eplb_physical_to_logical",), ("eplb_physical_to_logical", "w13_weight")):
        layer = moekit.FusedMoE(8, 2, 32, 16, backend="torch", enable_eplb=True)
        layer.load_expert_weights(w13, w2)
        before = layer(x, lg)
        with pytest.raises(ValueError, match="eplb_physical_to_logical|slots would mix"):
            layer.routed_experts.load_state_dict({k: sd[k] for k in keep}, strict=False)
        assert layer.routed_experts.placement.physical_to_logical == tuple(range(8))
        assert torch.equal(layer(x, lg), before)


def test_a_shape_mismatch_is_refused_before_any_copy():
    # the reviews: torch records a size mismatch, copies the other keys and raises at the end; the placement was
    # applied and every tensor marked loaded (an unloaded layer then ran on torch.empty memory), or, skipping that,
    # the copied keys of a loaded layer were neither re-laid nor placed; the shapes are checked before any copy
    layer = moekit.FusedMoE(8, 2, 32, 16, backend="torch")
    sd = {"w13_weight": torch.randn(8, 32, 32), "w2_weight": torch.randn(4, 32, 16)}
    with pytest.raises(ValueError, match=r"w2_weight: shape \[4, 32, 16\], this rank holds \[8, 32, 16\]"):
        layer.routed_experts.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        layer(torch.randn(2, 32), torch.randn(2, 8))
    w13, w2 = torch.randn(8, 32, 32), torch.randn(8, 32, 16)
    layer.load_expert_weights(w13, w2)
    before = layer(x := torch.randn(3, 32), lg := torch.randn(3, 8))
    with pytest.raises(ValueError, match="w2_weight"):
        layer.routed_experts.load_state_dict(sd)
    assert torch.equal(layer.routed_experts.w13_weight, w13) and torch.equal(layer(x, lg), before)


def test_load_weights_mixing_stacks_and_per_expert_keys_keeps_the_last_write():
    # the third review: the gathered per-slot stacks were loaded after every other key of the call, so a per-expert
    # key given after a stack lost to it; the stacks gathered so far are loaded before such a key
    layer = moekit.FusedMoE(8, 2, 32, 16, backend="torch")
    w13, w2, gate0 = torch.randn(8, 32, 32), torch.randn(8, 32, 16), torch.randn(16, 32)
    layer.load_weights([("routed_experts.w13_weight", w13), ("routed_experts.w2_weight", w2),
                        ("experts.0.gate_proj.weight", gate0)])
    assert torch.equal(layer.routed_experts.w13_weight[0, :16], gate0)
    assert torch.equal(layer.routed_experts.w13_weight[1:], w13[1:])
