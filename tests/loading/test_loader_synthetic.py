"""load_moe_layers on synthetic safetensors checkpoints written here (no transformers needed).

The DeepSeek-V4 checkpoint uses DeepSeek's own key names (``layers.{i}.ffn.experts.{e}.w1.weight``,
``ffn.gate.bias``, ``ffn.gate.tid2eid``, ``ffn.shared_experts.w1``), is sharded through
``model.safetensors.index.json`` and is checked against a naive per-token loop written below.
"""

import json
import math
import os
import weakref

import pytest
import torch
from safetensors.torch import save_file

from moekit import load_moe_layers
from moekit.loading import reader as reader_mod
from moekit.loading.architectures import plan_layers, supported_model_types
from reference import ref_experts, ref_hash_route, ref_route

H, I, E, K, VOCAB, LIMIT, SCALE = 16, 8, 6, 2, 50, 0.8, 1.5
V4_CONFIG = dict(
    model_type="deepseek_v4",
    hidden_size=H,
    moe_intermediate_size=I,
    n_routed_experts=E,
    num_experts_per_tok=K,
    num_hidden_layers=3,
    mlp_layer_types=["hash_moe", "moe", "moe"],
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=SCALE,
    swiglu_limit=LIMIT,
    vocab_size=VOCAB,
    hidden_act="silu",
    dtype="float32",
)


def _v4_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"embed.weight": torch.randn(VOCAB, H, generator=g), "norm.weight": torch.ones(H)}
    for i, kind in enumerate(V4_CONFIG["mlp_layer_types"]):
        p = f"layers.{i}.ffn."
        t[f"layers.{i}.attn.wq_a.weight"] = torch.randn(H, H, generator=g)  # not MoE: ignored
        t[p + "gate.weight"] = torch.randn(E, H, generator=g)
        if kind == "hash_moe":
            t[p + "gate.tid2eid"] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(VOCAB)]).to(torch.int32)
        else:
            t[p + "gate.bias"] = torch.rand(E, generator=g) * 0.5
        for e in range(E):
            for n, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                t[p + f"experts.{e}.{n}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        for n, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            t[p + f"shared_experts.{n}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
    return t


def write_checkpoint(path, config, tensors, shards=2):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _naive_v4(t, i, x, input_ids):
    """DeepSeek-V4 block i from its checkpoint tensors, through the float64 oracles of tests/reference.py:
    hash or biased sqrtsoftplus top-k (renormalised, scaled), clamped SwiGLU experts, a shared expert."""
    p = f"layers.{i}.ffn."
    d = {k[len(p):]: v.double() for k, v in t.items() if k.startswith(p)}
    w13 = torch.stack([torch.cat([d[f"experts.{e}.w1.weight"], d[f"experts.{e}.w3.weight"]]) for e in range(E)])
    w2 = torch.stack([d[f"experts.{e}.w2.weight"] for e in range(E)])
    logits = x @ d["gate.weight"].t()
    kw = dict(scoring_func="sqrtsoftplus", renormalize=True, routed_scaling_factor=SCALE)
    if "gate.tid2eid" in d:
        w, ids = ref_hash_route(logits, t[p + "gate.tid2eid"], input_ids, **kw)
    else:
        w, ids, _ = ref_route(logits, K, bias=d["gate.bias"], **kw)
    out = ref_experts(x, w13, w2, w, ids, swiglu_limit=LIMIT)
    shared_w13 = torch.cat([d["shared_experts.w1.weight"], d["shared_experts.w3.weight"]])[None]
    shared = ref_experts(x, shared_w13, d["shared_experts.w2.weight"][None], torch.ones(x.shape[0], 1, dtype=torch.float64),
                         torch.zeros(x.shape[0], 1, dtype=torch.int64), swiglu_limit=LIMIT)
    return out + shared


def test_deepseek_v4_synthetic_sharded_against_naive(tmp_path):
    t = _v4_tensors()
    write_checkpoint(tmp_path, V4_CONFIG, t, shards=2)
    layers = load_moe_layers(tmp_path)
    assert list(layers) == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, H, generator=g) * 2
    input_ids = torch.randint(0, VOCAB, (7,), generator=g)
    for i, (name, layer) in enumerate(layers.items()):
        assert layer.routed_experts.w13_weight.dtype == torch.float32
        out = layer(x, input_ids=input_ids)
        ref = _naive_v4(t, i, x.double(), input_ids)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids"):
        layers["model.layers.0.mlp"](x)


def test_dtype_device_and_single_file(tmp_path):
    t = _v4_tensors(2)
    write_checkpoint(tmp_path, dict(V4_CONFIG, dtype="bfloat16"), t, shards=1)
    layers = load_moe_layers(tmp_path)  # dtype from config.json
    layer = layers["model.layers.1.mlp"]
    assert layer.routed_experts.w13_weight.dtype == torch.bfloat16
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    x = torch.randn(5, H)
    ref = _naive_v4(t, 1, x.double(), None)
    out = layer(x.bfloat16()).double()
    assert (out - ref).norm() / ref.norm() < 2e-2
    layers = load_moe_layers(tmp_path, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(layers["model.layers.1.mlp"](x).double(), ref, rtol=1e-5, atol=1e-5)


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    t = _v4_tensors(3)
    write_checkpoint(tmp_path, V4_CONFIG, t, shards=2)
    live = {"now": 0, "peak": 0}
    real_read = reader_mod._read

    def counting_read(handle, key):
        out = real_read(handle, key)
        n = out.numel() * out.element_size()
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(out, lambda: live.__setitem__("now", live["now"] - n))
        return out

    monkeypatch.setattr(reader_mod, "_read", counting_read)
    layers = load_moe_layers(tmp_path)
    largest = max(v.numel() * v.element_size() for k, v in t.items() if ".ffn." in k)
    construction = max(t[k].numel() * t[k].element_size() for k in t if k.endswith(("gate.bias", "tid2eid")))
    moe_bytes = sum(v.numel() * v.element_size() for k, v in t.items() if ".ffn." in k)
    kept = sum(t[k].numel() * t[k].element_size() for k in t if k.endswith("gate.bias"))
    # nothing read lives on: the selection biases are copies (round 66: they lived on as the routers' own buffers,
    # views of the checkpoint file's mapping)
    assert live["now"] == 0
    # peak: one tensor in flight + one layer's construction tensors + the biases already kept
    assert live["peak"] <= largest + construction + kept < moe_bytes / 20, (live, largest, moe_bytes)
    assert len(layers) == 3


def test_missing_and_misshaped_tensors_name_the_key(tmp_path):
    t = _v4_tensors(4)
    del t["layers.1.ffn.experts.3.w2.weight"]
    write_checkpoint(tmp_path / "missing", V4_CONFIG, t)
    with pytest.raises(KeyError, match=r"layers\.1\.ffn\.experts\.3\.w2\.weight"):
        load_moe_layers(tmp_path / "missing")
    t = _v4_tensors(4)
    t["layers.2.ffn.experts.0.w1.weight"] = torch.zeros(I, H + 1)
    write_checkpoint(tmp_path / "shape", V4_CONFIG, t)
    with pytest.raises(ValueError, match=r"layers\.2\.ffn\.experts\.0\.w1\.weight.*\[8, 17\].*\[8, 16\]"):
        load_moe_layers(tmp_path / "shape")
    t = _v4_tensors(4)
    t["layers.1.ffn.gate.bias"] = torch.zeros(E + 1)
    write_checkpoint(tmp_path / "bias", V4_CONFIG, t)
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.gate\.bias.*\[7\].*\[6\]"):
        load_moe_layers(tmp_path / "bias")
    t = _v4_tensors(4)
    del t["layers.0.ffn.gate.tid2eid"]
    write_checkpoint(tmp_path / "hash", V4_CONFIG, t)
    with pytest.raises(KeyError, match="tid2eid"):
        load_moe_layers(tmp_path / "hash")


def test_unsupported_and_quantised_checkpoints(tmp_path):
    write_checkpoint(tmp_path / "a", {"model_type": "llama", "hidden_size": 8}, {"x": torch.zeros(1)}, 1)
    with pytest.raises(NotImplementedError, match=r"'llama' is not supported.*Mixtral.*DeepSeek-V4.*OLMoE"):
        load_moe_layers(tmp_path / "a")
    write_checkpoint(tmp_path / "q", dict(V4_CONFIG, quantization_config={"quant_method": "fp8"}), {"x": torch.zeros(1)}, 1)
    with pytest.raises(NotImplementedError, match="fp8"):
        load_moe_layers(tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_moe_layers(tmp_path / "nothing")
    assert {"mixtral", "deepseek_v4", "llama4_text", "longcat_flash"} <= set(supported_model_types())


def _ds3_tensors(n_layers, dense, mtp):
    g = torch.Generator().manual_seed(5)
    t = {}
    for i in range(n_layers + mtp):
        p = f"model.layers.{i}.mlp."
        if i < dense:
            for n, shape in (("gate_proj", (24, H)), ("up_proj", (24, H)), ("down_proj", (H, 24))):
                t[p + f"{n}.weight"] = torch.randn(*shape, generator=g)
            continue
        t[p + "gate.weight"] = torch.randn(E, H, generator=g)
        t[p + "gate.e_score_correction_bias"] = torch.rand(E, generator=g)
        for e in range(E):
            for n, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                t[p + f"experts.{e}.{n}.weight"] = torch.randn(*shape, generator=g)
        for n, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            t[p + f"shared_experts.{n}.weight"] = torch.randn(*shape, generator=g)
    return t


def test_dense_and_mtp_layers_are_skipped(tmp_path):
    cfg = dict(
        model_type="deepseek_v3", hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
        n_group=3, topk_group=2, n_shared_experts=1, num_hidden_layers=3, first_k_dense_replace=1, dtype="float32",
    )  # fmt: skip
    write_checkpoint(tmp_path, cfg, _ds3_tensors(3, 1, 1))  # layer 3 is an MTP layer (past num_hidden_layers)
    layers = load_moe_layers(tmp_path)
    assert list(layers) == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert layers["model.layers.1.mlp"].router.spec.num_expert_group == 3
    assert [layer.eager_graph_tokens for layer in layers.values()] == [0, 0]  # torch backend: no graphs
    # Triton layers of one model share a graph pool and graph up to T = 2048 (MODEL_GRAPH_TOKENS); on the GPU where
    # there is one (CPU Triton layers need the interpreter, which a GPU host does not set)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for asked, want in ((None, 2048), (16, 16)):
        layers = list(load_moe_layers(tmp_path, backend="triton", device=dev, eager_graph_tokens=asked).values())
        assert [layer.eager_graph_tokens for layer in layers] == [want, want]
        assert layers[0]._graphs.pool is layers[1]._graphs.pool is not None


def test_qwen_sparse_step_and_mlp_only_layers_plan():
    base = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_hidden_layers=6)
    _, plans = plan_layers(dict(base, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [p.layer_idx for p in plans] == [1, 5]
    _, plans = plan_layers(dict(base, model_type="qwen2_moe", shared_expert_intermediate_size=12, mlp_only_layers=[0]))
    assert [p.layer_idx for p in plans] == [1, 2, 3, 4, 5] and plans[0].shared_expert_gate
    _, plans = plan_layers(dict(base, model_type="llama4_text", intermediate_size=I, interleave_moe_layer_step=2))
    assert [p.name for p in plans] == ["model.layers.1.feed_forward", "model.layers.3.feed_forward", "model.layers.5.feed_forward"]
    with pytest.raises(NotImplementedError, match="num_experts_per_tok=2"):
        plan_layers(dict(base, model_type="llama4_text", intermediate_size=I, num_experts_per_tok=2))
