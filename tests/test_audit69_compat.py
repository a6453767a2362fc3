"""Round 69's compatibility audit (artefacts of older moekit versions), each case failing before its fix: state dicts
of quantised layers saved before round 62 (version 1: all-zero scales marked never-loaded experts) loaded through
load_weights or without their metadata, the message naming that mark, whole-layer pickles of biased routers from
rounds <= 63, state dicts saved before round 48 (no router bias / hash table) into a meta-built layer, and
compare.py --plot on result files whose rows carry no 'device'. Old artefacts are built synthetically here."""

import importlib.util
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

import moekit

E, K, H, I = 8, 2, 64, 64
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
UNLOADED = (6, 7)  # the experts the old layer never loaded


def _fp8_layer():
    return moekit.FusedMoE(E, K, H, I, quant_config=FP8, backend="torch")


def _quantised(seed=0):
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5, torch.randn(E, H, I, generator=g) * I ** -0.5
    return moekit.quantize_experts(w13, w2, FP8)


def _pre62_state_dict():
    """What a round 53-61 layer whose experts 6 and 7 were never loaded saved: their scales all zero (the unset mark
    of then), codes zero, ``_metadata`` version 1 for the experts."""
    layer = _fp8_layer()
    q13, q2, s13, s2 = _quantised()
    keep = [e for e in range(E) if e not in UNLOADED]
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    sd = layer.state_dict()
    for key in ("routed_experts.w13_weight", "routed_experts.w2_weight", "routed_experts.w13_scale",
                "routed_experts.w2_scale"):
        t = sd[key].clone()
        t[list(UNLOADED)] = 0
        sd[key] = t
    assert keep and sd._metadata["routed_experts"]["version"] == 2
    sd._metadata["routed_experts"]["version"] = 1
    return sd


def _inputs():
    g = torch.Generator().manual_seed(1)
    x, lg = torch.randn(6, H, generator=g), torch.randn(6, E, generator=g)
    lg[:, list(UNLOADED)] += 3  # tokens routed to the unloaded experts
    return x, lg


def _refused(layer):
    with pytest.raises(RuntimeError, match="never loaded"):
        layer(*_inputs())
    assert "expert 6 w1 scale" in layer.routed_experts.missing()


# ---------------------------------------------------------------------------------- 1. pre-62 dicts in load_weights
def test_load_weights_reads_a_version_1_state_dict_given_as_a_mapping():
    # the edge: load_weights(sd) of a pre-62 dict dropped its _metadata: the never-loaded experts loaded as zeros and
    # the forward computed zeros for them (load_state_dict(sd) refused)
    layer = _fp8_layer()
    layer.load_weights(_pre62_state_dict())
    _refused(layer)


def test_load_weights_reads_a_version_1_state_dict_given_as_its_items():
    # the edge: load_weights(sd.items()), the documented (name, tensor) form, of the dict torch.load returned
    layer = _fp8_layer()
    layer.load_weights(_pre62_state_dict().items())
    _refused(layer)


def test_load_weights_reads_the_version_of_a_model_state_dict():
    # the edge: a whole model's state dict (the layer under a module path) keeps one version per module name
    model = torch.nn.ModuleDict({"mlp": _fp8_layer()})
    sd = _pre62_state_dict()
    sd = type(sd)((f"mlp.{k}", v) for k, v in sd.items())
    sd._metadata = {"mlp.routed_experts": {"version": 1}, "mlp": {"version": 1}}
    model["mlp"].load_weights(sd.items())
    _refused(model["mlp"])


@pytest.mark.parametrize("how", ["dict", "pairs"])
def test_all_zero_scales_without_version_metadata_warn(how):
    # the edge: dict(sd) / a generator of pairs loses the metadata: the zeros load as values (valid since round 62),
    # and a UserWarning says what they were before round 62 and how to load such a dict (before: silent)
    sd, layer = _pre62_state_dict(), _fp8_layer()
    with pytest.warns(UserWarning, match=r"all-zero scales for expert 6 w1 scale.*before round 62.*with its metadata"):
        if how == "dict":
            layer.load_state_dict(dict(sd))
        else:
            layer.load_weights((k, v) for k, v in sd.items())
    assert layer.routed_experts.missing() == []
    layer(*_inputs())  # values: the forward runs


def test_a_current_state_dict_with_a_padding_expert_loads_silently():
    # the edge (guard): a version-2 dict's all-zero scales are values, given with its metadata: no warning, no refusal
    q13, q2, s13, s2 = _quantised()
    q2[7], s2[7] = 0, 0  # an all-zero padding expert's down projection
    a = _fp8_layer()
    a.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    x, lg = _inputs()
    for load in (lambda b, sd: b.load_weights(sd.items()), lambda b, sd: b.load_weights(sd),
                 lambda b, sd: b.load_state_dict(sd)):
        b = _fp8_layer()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load(b, a.state_dict())
        torch.testing.assert_close(b(x, lg), a(x, lg), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- 4. the pre-62 mark's message
def test_the_refusal_of_a_pre62_dict_names_its_all_zero_scales():
    # the edge: the refusal said "(NaN weights or NaN scales)" of a dict holding zeros, and gave no way forward for
    # zeros that were values
    layer = _fp8_layer()
    layer.load_state_dict(_pre62_state_dict())
    with pytest.raises(RuntimeError) as err:
        layer(*_inputs())
    text = str(err.value)
    assert "all-zero scales, the unset mark of state dicts saved before round 62 (version 1)" in text
    assert "NaN" not in text and "without its metadata" in text and "load_expert_weights()" in text


# ---------------------------------------------------------------------------------- 2. whole-layer pickles <= r63
def _old_pickle(layer):
    """``torch.save(layer)`` then ``torch.load``, with the router's ``_bias_dtype`` removed as a round <= 63 pickle
    lacks it (it was set only in ``__init__`` from round 64 on)."""
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    old = torch.load(buf, weights_only=False)
    del old.router.__dict__["_bias_dtype"]
    return old


@pytest.mark.parametrize("kind", ["grouped", "zero"])
def test_a_pre64_pickled_biased_router_runs(kind):
    # the edge: every forward of such an unpickled layer raised AttributeError '_bias_dtype'
    g = torch.Generator().manual_seed(0)
    if kind == "grouped":
        layer = moekit.FusedMoE(E, K, H, I, use_grouped_topk=True, num_expert_group=4, topk_group=2,
                                scoring_func="sigmoid", e_score_correction_bias=torch.rand(E, generator=g))
        cols = E
    else:
        layer = moekit.FusedMoE(E, K, H, I, zero_expert_type="identity", e_score_correction_bias=torch.zeros(E + 4))
        cols = E + 4
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1)
    old = _old_pickle(layer)
    x, lg = torch.randn(3, H, generator=g), torch.randn(3, cols, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = old(x, lg)
    assert torch.equal(out, layer(x, lg))


# ---------------------------------------------------------------------------------- 3. pre-48 dicts into meta layers
def _grouped(**kw):
    return moekit.FusedMoE(E, K, H, I, use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                           e_score_correction_bias=torch.linspace(0, 0.5, E), **kw)


def _hashed(**kw):
    table = torch.arange(100 * K).reshape(100, K) % E
    return moekit.FusedMoE(E, K, H, I, hash_indices_table=table, **kw)


def _pre48(build, key):
    layer = build()
    g = torch.Generator().manual_seed(0)
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1)
    sd = layer.state_dict()
    del sd[key]  # persistent since round 48
    return layer, sd


@pytest.mark.parametrize("build, key", [(_grouped, "router.e_score_correction_bias"),
                                        (_hashed, "router.hash_indices_table")], ids=["bias", "hash"])
def test_a_pre48_state_dict_into_a_meta_layer_says_never_loaded(build, key):
    # the edge: the buffer stayed on meta (assign=True, strict=False) and the forward blamed a device mismatch
    # (ValueError "... is on meta but router_logits is on cpu"); strict loading stays strict
    old, sd = _pre48(build, key)
    with pytest.raises(RuntimeError, match="Missing key"):
        build().load_state_dict(sd)
    layer = build(device="meta")
    assert layer.load_state_dict(sd, strict=False, assign=True).missing_keys == [key]
    x, lg, ids, name = torch.randn(3, H), torch.randn(3, E), torch.tensor([1, 5, 9]), key.split(".")[1]
    with pytest.raises(RuntimeError, match=rf"{name} is on the meta device: it was never loaded.*round 48"):
        layer(x, lg, input_ids=ids)
    setattr(layer.router, name, getattr(old.router, name).clone())  # the way forward the message gives
    assert torch.equal(layer(x, lg, input_ids=ids), old(x, lg, input_ids=ids))


# ---------------------------------------------------------------------------------- 5. compare.py --plot
def _compare():
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("moekit_compare_a69", root / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_plots_rows_without_a_device(tmp_path, capsys):
    # the edge: a round-33 result file holds 'device' in its object, not in its rows: --plot raised KeyError 'device'
    pytest.importorskip("matplotlib")
    rows = [dict(model="deepseek-v3", tokens=t, impl="layer", us=10.0 * t, round=0) for t in (1, 8, 64)]
    res, png = tmp_path / "r33.json", tmp_path / "speed.png"
    res.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    assert _compare().main([str(res), "--baseline", "none", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000 and "NVIDIA H200" in capsys.readouterr().out
    from moekit.benchmarking.plot import plot_roofline, plot_speed
    plot_speed(rows, tmp_path / "direct.png")  # the rows as they are, no device anywhere
    plot_roofline([dict(r, flops=1e9, bytes=1e6, tflops=1.0) for r in rows], 4e12, 1e15, tmp_path / "roof.png")
