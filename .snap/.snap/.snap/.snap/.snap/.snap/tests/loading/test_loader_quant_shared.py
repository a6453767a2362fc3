"""Shared experts of fp8 checkpoints load in fp8 (:class:`QuantSharedMLP`): one expert with K = 1 through the
layer's quantised experts op. Synthetic DeepSeek-V3 fp8 block, GLM-4.5 compressed-tensors fp8 channel
(static inputs) and per-tensor checkpoints; quantise-on-load; the Triton interpreter; state_dict,
``.to(dtype)``, CUDA-graph folding, bad scales.

Tolerances (SPEC §8, relative RMS of the whole output): the shared expert against the float64 twin of the
same w8a8 math <= 5e-3 (torch path); the whole layer against the old dequantised shared expert <= 3e-2
(that one drops the activation quantisation of the shared GEMMs, ~1.4e-2 of the shared part: a
different math, so the bound is a sanity check, not an accuracy claim).
"""

import os

import pytest
import torch

import moekit
from moekit import load_moe_layers
from moekit.experts.graphed_plan import shared_foldable
from moekit.loading.modules import SharedMLP
from moekit.loading.quant import dequantize_dense
from moekit.loading.quant_shared import QuantSharedMLP
from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.quantize import quantize_weight
from test_loader_quant import FP8, _write
from reference import rel_rms

E, K, T = 4, 2, 9


def _ds3(h, i, fmt_dict, dtype="bfloat16", shared=None, quantised=True, seed=0):
    """A DeepSeek-V3 checkpoint (layer 1 is MoE): per-expert routed weights, shared experts from ``shared``
    (proj -> float weight), quantised by ``fmt_dict`` (None: float checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    cfg = dict(model_type="deepseek_v3", hidden_size=h, moe_intermediate_size=i, n_routed_experts=E,
               num_experts_per_tok=K, n_group=2, topk_group=1, n_shared_experts=1, num_hidden_layers=2,
               first_k_dense_replace=1, dtype=dtype)
    if quantised:
        cfg["quantization_config"] = fmt_dict
    fmt = moekit.parse_quant_config(fmt_dict)
    pre = "model.layers.1.mlp."
    t = {pre + "gate.weight": torch.randn(E, h, generator=g), pre + "gate.e_score_correction_bias": torch.rand(E)}
    shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for e in range(E):
        for proj, shape in shapes.items():
            w = torch.randn(*shape, generator=g) * shape[1] ** -0.5
            if quantised:
                t[pre + f"experts.{e}.{proj}.weight"], t[pre + f"experts.{e}.{proj}.weight_scale_inv"] = quantize_weight(w, fmt)
            else:
                t[pre + f"experts.{e}.{proj}.weight"] = w
    shared = shared or {p: torch.randn(*s, generator=g) * s[1] ** -0.5 for p, s in shapes.items()}
    for proj, w in shared.items():
        if quantised:
            t[pre + f"shared_experts.{proj}.weight"], t[pre + f"shared_experts.{proj}.weight_scale_inv"] = quantize_weight(w, fmt)
        else:
            t[pre + f"shared_experts.{proj}.weight"] = w
    return cfg, t, fmt


def _twin(shared, x, **over):
    """The torch twin of one expert with K = 1 on the module's own quantised tensors."""
    kw = dict(fmt=shared.fmt, w13_scale=shared.w13_scale, w2_scale=shared.w2_scale,
              w13_input_scale=shared.w13_input_scale, w2_input_scale=shared.w2_input_scale,
              activation=shared.activation, swiglu_limit=shared.swiglu_limit)
    kw.update(over)
    t = x.shape[0]
    return fused_experts_quant_torch(x, shared.w13, shared.w2, torch.ones(t, 1), torch.zeros(t, 1, dtype=torch.int32),
                                     **kw)




def test_deepseek_fp8_shared_experts_run_fp8(tmp_path):
    h, i = 48, 40  # partial 16 x 16 blocks
    cfg, t, fmt = _ds3(h, i, FP8)
    _write(tmp_path, cfg, t)
    layer = load_moe_layers(tmp_path)["model.layers.1.mlp"]
    shared, pre = layer.shared_experts, "model.layers.1.mlp.shared_experts."
    assert isinstance(shared, QuantSharedMLP) and shared.kernels is layer.routed_experts.kernels
    assert shared.w13.shape == (1, 2 * i, h) and shared.w2.shape == (1, h, i) and shared.w13.dtype == torch.float8_e4m3fn
    assert shared.w13_scale.shape == (1, 2 * 3, 3) and shared.w2_scale.shape == (1, 3, 3)
    assert torch.equal(shared.w13_scale[0], torch.cat([t[pre + "gate_proj.weight_scale_inv"],
                                                      t[pre + "up_proj.weight_scale_inv"]]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, h, generator=g).bfloat16()
    assert torch.equal(shared(x), _twin(shared, x))  # exact: the same function on the same tensors
    # against the float64 twin of the same w8a8 math (SPEC §8 torch-path bound)
    x32 = x.float()
    assert rel_rms(shared(x32), _twin(shared, x32.double())) <= 5e-3
    # the whole layer vs the previous behaviour (a dequantised bf16 shared MLP, no activation quantisation)
    old = SharedMLP(h, i, dtype=torch.bfloat16)
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = {"weight": t[pre + f"{proj}.weight"], "weight_scale_inv": t[pre + f"{proj}.weight_scale_inv"]}
            getattr(old, proj).weight.copy_(dequantize_dense(parts, fmt, proj))
        new_out = layer(x)
        layer.shared_experts = old
        old_out = layer(x)
    assert new_out.dtype == torch.bfloat16 and 0 < rel_rms(new_out, old_out) <= 3e-2


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_channel_and_tensor(tmp_path, strategy):
    h, i = 32, 16
    static = strategy == "channel"  # channel weights + static per-tensor inputs (GLM-4.5-FP8); tensor: dynamic
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*mlp.gate$"],
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                    "strategy": strategy, "dynamic": False},
                                        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                              "strategy": "tensor" if static else "token",
                                                              "dynamic": not static}}}}
    cfg, t, fmt = _ds3(h, i, ct, seed=2)
    pre = "model.layers.1.mlp."
    for key in [k for k in t if k.endswith("weight_scale_inv")]:  # compressed-tensors names and layouts
        s = t.pop(key)
        t[key.replace("weight_scale_inv", "weight_scale")] = s[:, None].bfloat16() if s.dim() == 1 else s.reshape(1)
        if static:
            t[key.replace("weight_scale_inv", "input_scale")] = torch.rand(1) * 0.02 + 0.01
    _write(tmp_path, cfg, t)
    layer = load_moe_layers(tmp_path)["model.layers.1.mlp"]
    shared = layer.shared_experts
    assert isinstance(shared, QuantSharedMLP) and shared.fmt == fmt
    sp = pre + "shared_experts."
    if static:
        assert shared.w13_scale.shape == (1, 2 * i) and shared.w2_scale.shape == (1, h)
        assert torch.equal(shared.w2_scale[0], t[sp + "down_proj.weight_scale"][:, 0].float())
        assert torch.equal(shared.w13_input_scale, torch.maximum(t[sp + "gate_proj.input_scale"],
                                                                 t[sp + "up_proj.input_scale"]))
        assert torch.equal(shared.w2_input_scale, t[sp + "down_proj.input_scale"])
    else:
        assert shared.w13_scale.shape == (1, 2) and shared.w2_scale.shape == (1,) and shared.w13_input_scale is None
        assert shared.w13_scale[0, 1] == t[sp + "up_proj.weight_scale"][0]
    x = torch.randn(T, h).bfloat16()
    assert torch.equal(shared(x), _twin(shared, x))
    assert rel_rms(shared(x.float()), _twin(shared, x.double())) <= 5e-3
    assert layer(x).shape == (T, h)


def test_quantise_on_load_quantises_shared_experts_unless_ignored(tmp_path):
    h, i = 32, 32
    cfg, t, fmt = _ds3(h, i, FP8, dtype="float32", quantised=False, seed=3)
    _write(tmp_path, cfg, t)
    layer = load_moe_layers(tmp_path, quant_config=FP8)["model.layers.1.mlp"]
    shared, sp = layer.shared_experts, "model.layers.1.mlp.shared_experts."
    assert isinstance(shared, QuantSharedMLP)
    w13 = torch.cat([t[sp + "gate_proj.weight"], t[sp + "up_proj.weight"]])[None]
    q13, q2, s13, s2 = moekit.quantize_experts(w13, t[sp + "down_proj.weight"][None], fmt)
    assert torch.equal(shared.w13.view(torch.uint8), q13.view(torch.uint8)) and torch.equal(shared.w2_scale, s2)
    assert torch.equal(shared.w13_scale, s13)
    ignored = dict(FP8, modules_to_not_convert=["shared_experts"])
    layer = load_moe_layers(tmp_path, quant_config=ignored)["model.layers.1.mlp"]
    assert type(layer.shared_experts) is SharedMLP and layer.routed_experts.quant is not None
    assert torch.equal(layer.shared_experts.down_proj.weight, t[sp + "down_proj.weight"])


def test_triton_interpreter_matches_twin(tmp_path):
    """A DeepSeek-style fp8 checkpoint loaded on the Triton backend (on CPU: the interpreter): the shared
    expert runs the Triton quantised kernel with E = 1, K = 1 and agrees with the torch backend's."""
    pytest.importorskip("moekit.ops.triton_experts_quant")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    h, i = 64, 32  # blocks of 32: the interpreter stays fast
    fp8 = dict(FP8, weight_block_size=[32, 32])
    cfg, t, fmt = _ds3(h, i, fp8, dtype="float32", seed=4)
    _write(tmp_path, cfg, t)
    ref = load_moe_layers(tmp_path, backend="torch")["model.layers.1.mlp"].shared_experts
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tri = load_moe_layers(tmp_path, backend="triton", device=dev)["model.layers.1.mlp"].shared_experts
    assert isinstance(tri, QuantSharedMLP) and tri.kernels.name == "triton"
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        x = torch.randn(5, h, device=dev).to(dtype)
        out = tri(x)
        assert out.dtype == dtype and rel_rms(out.cpu(), ref(x.cpu())) <= (tol if dev == "cpu" else 1e-2)


def _module(fmt=None, seed=5, h=32, i=32):
    fmt = fmt or moekit.parse_quant_config(FP8)
    g = torch.Generator().manual_seed(seed)
    q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(1, 2 * i, h, generator=g) / h**0.5,
                                               torch.randn(1, h, i, generator=g) / i**0.5, fmt)
    return QuantSharedMLP(fmt, q13, q2, s13, s2, scale=0.5), (q13, q2, s13, s2)


def test_state_dict_round_trip_and_dtype_moves():
    mod, (q13, q2, s13, s2) = _module()
    sd = mod.state_dict()
    assert set(sd) == {"w13", "w2", "w13_scale", "w2_scale"} and sd["w13"].dtype == torch.float8_e4m3fn
    other, _ = _module(seed=6)
    other.load_state_dict(sd)
    x = torch.randn(T, 32)
    assert torch.equal(other(x), mod(x))
    assert torch.equal(mod(x), _twin(mod, x) * 0.5)  # the output multiplier of SharedMLP
    for move in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float64), lambda m: m.float()):
        move(mod)
        assert mod.w13.dtype == torch.float8_e4m3fn and mod.w2.dtype == torch.float8_e4m3fn
        assert mod.w13_scale.dtype == torch.float32 and torch.equal(mod.w13_scale, s13)
        assert torch.equal(mod.w2.view(torch.uint8), q2.view(torch.uint8))
    out = mod(x.half())  # the output follows the activation dtype (the layer's params dtype)
    assert out.dtype == torch.float16 and torch.equal(out, _twin(mod, x.half()) * 0.5)
    assert mod(x.reshape(3, 3, 32)).shape == (3, 3, 32)
    # the layer's internal CUDA graph may fold it (no children, declared on the class)
    assert shared_foldable(mod, None) and shared_foldable(mod, torch.nn.Linear(32, 1, bias=False))


def test_bad_inputs():
    mod, (q13, q2, s13, s2) = _module()
    with pytest.raises(ValueError, match="w13_scale"):
        QuantSharedMLP(mod.fmt, q13, q2, s13[:, :-1], s2)
    with pytest.raises(ValueError, match="one expert"):
        QuantSharedMLP(mod.fmt, q13.expand(2, -1, -1), q2.expand(2, -1, -1), s13.expand(2, -1, -1), s2.expand(2, -1, -1))
    with pytest.raises(ValueError, match="not gated"):
        QuantSharedMLP(mod.fmt, q13, q2, s13, s2, activation="relu2")
    with pytest.raises(TypeError, match="fp8"):
        QuantSharedMLP({"quant_method": "mxfp4"}, q13, q2, s13, s2)
    with pytest.raises(ValueError, match="last dimension"):
        mod(torch.randn(2, 16))


def test_checkpoint_scale_of_wrong_shape_names_the_key(tmp_path):
    cfg, t, _ = _ds3(32, 32, FP8, seed=7)
    key = "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"
    t[key] = t[key][:1]
    _write(tmp_path, cfg, t)
    with pytest.raises(ValueError, match=r"up_proj\.weight_scale_inv.*\[1, 2\].*expected \[2, 2\]"):
        load_moe_layers(tmp_path)


def _plan(h, i, act="silu", fused=False):
    from types import SimpleNamespace

    return SimpleNamespace(outer_hidden_size=h, shared_intermediate_size=i, shared_activation=act,
                           shared_swiglu_limit=None, shared_scale=1.0, shared_fused=fused)


def test_fused_gate_up_and_non_gated_layouts():
    """A fused ``gate_up_proj`` checkpoint gives the module of the same gate/up rows stored apart (the
    per-shard block grids stack the same way); a fused grid whose blocks straddle gate/up (I not a
    multiple of block_n) is refused (None: dequantised instead); a non-gated (relu2) shared MLP holds
    ``w13 [1, I, H]`` and equals the twin of one expert with K = 1."""
    from moekit.loading.quant_shared import quant_shared_from_checkpoint

    fmt = moekit.parse_quant_config(dict(FP8, weight_block_size=[32, 32]))
    g = torch.Generator().manual_seed(11)
    h, i = 64, 64
    gate, up, down = (torch.randn(i, h, generator=g) / 8, torch.randn(i, h, generator=g) / 8,
                      torch.randn(h, i, generator=g) / 8)
    q = {name: quantize_weight(w, fmt) for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))}

    def parts(names):
        return ({p: {"weight": q[p][0], "weight_scale_inv": q[p][1]} for p in names},
                {p: {"weight": f"{p}.weight", "weight_scale_inv": f"{p}.weight_scale_inv"} for p in names})

    apart = quant_shared_from_checkpoint(_plan(h, i), fmt, *parts(("gate_proj", "up_proj", "down_proj")))
    q["gate_up_proj"] = (torch.cat([q["gate_proj"][0], q["up_proj"][0]]), torch.cat([q["gate_proj"][1], q["up_proj"][1]]))
    fused = quant_shared_from_checkpoint(_plan(h, i, fused=True), fmt, *parts(("gate_up_proj", "down_proj")))
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        assert torch.equal(getattr(fused, name).float(), getattr(apart, name).float()), name
    x = torch.randn(3, h, generator=g)
    assert torch.equal(fused(x), apart(x))
    # I = 48 with 32-row blocks: the fused grid's second block holds gate and up rows
    q48 = quantize_weight(torch.randn(96, h, generator=g) / 8, fmt)
    d48 = quantize_weight(torch.randn(h, 48, generator=g) / 8, fmt)
    straddle = ({"gate_up_proj": {"weight": q48[0], "weight_scale_inv": q48[1]},
                 "down_proj": {"weight": d48[0], "weight_scale_inv": d48[1]}},
                {"gate_up_proj": {"weight": "gu.weight", "weight_scale_inv": "gu.weight_scale_inv"},
                 "down_proj": {"weight": "d.weight", "weight_scale_inv": "d.weight_scale_inv"}})
    assert quant_shared_from_checkpoint(_plan(h, 48, fused=True), fmt, *straddle) is None
    # non-gated relu2: up + down
    relu = quant_shared_from_checkpoint(_plan(h, i, act="relu2"), fmt, *parts(("up_proj", "down_proj")))
    assert tuple(relu.w13.shape) == (1, i, h) and relu.activation == "relu2"
    assert torch.equal(relu(x), _twin(relu, x))
