"""fp8 block activations quantised in the GEMMs' main loops (config ``"qa"`` of w13 / w2): the same output bits as
the quantiser launches they replace, in every layout (inline decode, one-program align, count + scatter), with the
fused or the separate requantisation, swapped or unswapped tiles, a routing weight on the input, ue8m0 scales and
partial groups; no quantiser launch; the config checks."""

import pytest
import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts_quant as tq
from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Mxfp4Format
from moekit.ops.triton_configs import heuristic_config
from reference import rel_rms
from test_triton_experts_quant import DEV, make

VARIANTS = {"base": (0, 0), "qa13": (1, 0), "qa2": (0, 1), "qa": (1, 1)}


def _run(args, kw, cfg, spec, on_input=False):
    x, w13, w2, w, ids = args
    return tq.fused_experts_quant_impl(x, w13, w2, w, ids, spec, kw["w13_scale"], kw["w2_scale"], None, None,
                                       kw.get("activation", "silu"), on_input, kw.get("w1_bias"), kw.get("w2_bias"),
                                       None, None, config=cfg)


def _cfg(t, e, h, i, k, bn13, swap, qa):
    cfg = heuristic_config(t, e, h, i, k, torch.bfloat16, 132)
    c13 = {n: v for n, v in cfg["w13"].items() if n != "SWAP"}
    c2 = {n: v for n, v in cfg["w2"].items() if n != "SWAP"}
    if swap:
        c13["SWAP"] = c2["SWAP"] = 1
    c13.update(BN=bn13, qa=qa[0])
    c2["qa"] = qa[1]
    return dict(cfg, w13=c13, w2=c2)


@pytest.mark.parametrize("t, align", [
    (1, "inline"),   # T = 1: the decode layout, no align kernel
    (5, "inline"),   # several tokens sharing experts, inline
    (40, "small"),   # the one-program align kernel
    (40, "multi"),   # count + scatter
])
@pytest.mark.parametrize("bn13", [64, 32], ids=["fused_req", "separate_req"])  # BN == bk: w13 requantises itself
@pytest.mark.parametrize("swap", [False, True], ids=["unswapped", "swapped"])
def test_loop_quantisation_same_bits(t, align, bn13, swap, monkeypatch):
    from moekit.ops import triton_experts as te

    monkeypatch.setattr(te, "SMALL_SLOTS", 0 if align == "multi" else 1 << 20)
    fmt = Fp8BlockFormat(64, 64)
    e, k, h, i = 4, 2, 160, 96  # H = 160, I = 96: a partial group at the end of each K loop
    args, kw = make(fmt, t, e, k, h, i, bias=True)
    spec = tq.QuantSpec.of(fmt)
    outs = {}
    for name, qa in VARIANTS.items():
        cfg = _cfg(t, e, h, i, k, bn13, swap, qa)
        fixed = spec.fix_config(cfg, torch.bfloat16)
        assert (fixed["w13"]["qa"], fixed["w2"]["qa"]) == qa
        outs[name] = _run(args, kw, cfg, spec)
    for name in ("qa13", "qa2", "qa"):
        assert torch.equal(outs[name], outs["base"]), name
    cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    twin = fused_experts_quant_torch(*[cpu(a) for a in args], **{n: cpu(v) for n, v in kw.items()})
    assert rel_rms(outs["qa"], twin) <= 1e-2


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32_scales", "ue8m0"])
@pytest.mark.parametrize("t", [1, 7])
def test_loop_quantisation_on_input_and_ue8m0(ue8m0, t):
    """K = 1 with the routing weight on the input: w13 rounds x · w to the params dtype before quantising, as the
    quantiser launch does; power-of-two (ue8m0) scales computed in the loop match the quantiser's."""
    fmt = Fp8BlockFormat(32, 32, ue8m0=ue8m0)
    e, k, h, i = 5, 1, 96, 64
    args, kw = make(fmt, t, e, k, h, i)
    spec = tq.QuantSpec.of(fmt)
    base = _run(args, kw, _cfg(t, e, h, i, k, 32, False, (0, 0)), spec, on_input=True)
    loop = _run(args, kw, _cfg(t, e, h, i, k, 32, False, (1, 1)), spec, on_input=True)
    assert torch.equal(base, loop)
    cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    twin = fused_experts_quant_torch(*[cpu(a) for a in args], **{n: cpu(v) for n, v in kw.items()},
                                     apply_router_weight_on_input=True)
    assert rel_rms(loop, twin) <= 1e-2


def test_no_quantiser_launch(monkeypatch):
    """With "qa" on both GEMMs no activation quantiser is launched (the kernels are replaced by ones that raise)."""
    from moekit.ops._triton import quant as qk

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("an activation quantiser was launched")

        warmup = __getitem__

    fmt = Fp8BlockFormat(64, 64)
    args, kw = make(fmt, 3, 4, 2, 128, 64)
    spec = tq.QuantSpec.of(fmt)
    want = _run(args, kw, _cfg(3, 4, 128, 64, 2, 32, False, (0, 0)), spec)
    monkeypatch.setattr(qk, "act_quant_kernel", Refuse())
    monkeypatch.setattr(qk, "act_quant_sorted_kernel", Refuse())
    for bn13 in (64, 32):
        assert torch.equal(_run(args, kw, _cfg(3, 4, 128, 64, 2, bn13, False, (1, 1)), spec), want)
    with pytest.raises(AssertionError, match="quantiser was launched"):
        _run(args, kw, _cfg(3, 4, 128, 64, 2, 32, False, (1, 0)), spec)  # w2's input still needs the pass


def test_config_checks():
    cfg = heuristic_config(1, 8, 256, 128, 2, torch.bfloat16, 132)
    with_qa = dict(cfg, w13=dict(cfg["w13"], qa=1))
    for fmt in (Fp8ChannelFormat(), Mxfp4Format()):  # per-row scales span the row; weight-only: bf16 activations
        with pytest.raises(ValueError, match='"w13": "qa" = 1 .* expected fp8 block weights'):
            tq.QuantSpec.of(fmt).fix_config(with_qa, torch.bfloat16)
    block = tq.QuantSpec.of(Fp8BlockFormat(128, 128))
    with pytest.raises(ValueError, match='"w2": "qa" = 2, expected 0 or 1'):
        block.fix_config(dict(cfg, w2=dict(cfg["w2"], qa=2)), torch.bfloat16)
    with pytest.raises(ValueError, match="Gluon"):
        block.fix_config(dict(with_qa, w2=dict(cfg["w2"], gluon=1)), torch.bfloat16)
    assert block.fix_config(with_qa, torch.bfloat16)["w13"]["qa"] == 1


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("model", ["deepseek-v3", "gpt-oss-120b", "mixtral-8x7b", "qwen3-30b-a3b"])
def test_gpu_loop_quantisation_same_bits_as_the_shipped_config(model):
    """Real shapes on the device (the shipped fp8 block table's config at each T, with and without "qa"): the same
    bits at decode and mid-size token counts."""
    from moekit.benchmarking.shapes import MODELS
    from moekit.ops.quantize import quantize_experts
    from moekit.ops.triton_configs import get_config

    m = MODELS[model]
    fmt = Fp8BlockFormat(128, 128)
    spec = tq.QuantSpec.of(fmt)
    gen = torch.Generator(device=DEV).manual_seed(0)
    e = min(m.E, 32)  # a slice of the experts: the same kernels and tiles, less memory and quantisation time
    rows = 2 * m.I if m.gated else m.I
    w13 = torch.randn(e, rows, m.H, device=DEV, generator=gen, dtype=torch.bfloat16) / m.H**0.5
    w2 = torch.randn(e, m.H, m.I, device=DEV, generator=gen, dtype=torch.bfloat16) / m.I**0.5
    w13q, w2q, s13, s2 = quantize_experts(w13, w2, fmt)
    limit = 7.0 if m.act == "swigluoai" else None
    checked = 0
    for t in (1, 8, 64, 256):
        x = torch.randn(t, m.H, device=DEV, generator=gen, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(e, device=DEV, generator=gen)[: m.K] for _ in range(t)]).int()
        w = torch.rand(t, m.K, device=DEV, generator=gen)
        # the full shape's table entry (the slice of experts runs the same tiles)
        cfg = get_config(x.device, t, m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=spec.key)
        if cfg["w13"].get("gluon") or cfg["w2"].get("gluon"):
            continue  # a Gluon GEMM in this bucket: "qa" is the Triton GEMMs'
        outs = [tq.fused_experts_quant_impl(x, w13q, w2q, w, ids, spec, s13, s2, None, None, m.act, False, None, None,
                                            None, limit,
                                            config=dict(cfg, w13=dict(cfg["w13"], qa=qa), w2=dict(cfg["w2"], qa=qa)))
                for qa in (0, 1)]
        assert torch.equal(outs[0], outs[1]), (model, t)
        checked += 1
    assert checked >= 3
