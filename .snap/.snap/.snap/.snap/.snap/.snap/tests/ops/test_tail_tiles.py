"""``tail_bm`` (config key): an expert's last rows — at most BS of them past its last whole BLOCK_M block — run in a
BS-row tile of the same Triton GEMMs, in the same grid, instead of a padded BLOCK_M tile (``align.tail_split``).

Every output row is the same dot either way (same BK steps, same epilogue), so the result must be the same bits as
the config without the key, for every path the tiles touch: both align kernels, the fused top-k sum and the sum pass,
biases and clamps, non-gated experts, the split w13, the quantised Triton kernels. Each problem gives its experts
row counts on both sides of every boundary: 0, 1, BS, BS + 1, BM - 1, BM, BM + 1, 2·BM + BS.
"""

import pytest

import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts as te  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.experts import fused_experts_torch  # noqa: E402
from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402
from moekit.ops.config_keys import tail_bm_value  # noqa: E402
from moekit.ops.triton_configs import heuristic_config  # noqa: E402
from moekit.ops.triton_plan import _freeze, launch_plan  # noqa: E402
from compile_check import run_compiled  # noqa: E402
from small_experts import DEV  # noqa: E402

BM, H, I = 64, 64, 96  # I = 96: a partial 64-column block


def _counts(bs, bm=BM):
    """Rows per expert on both sides of each boundary of a BLOCK_M ``bm`` / BS layout."""
    return [0, 1, bs, bs + 1, bm - 1, bm, bm + 1, 2 * bm + bs]


def _problem(counts, k=1, dtype=torch.bfloat16, act="silu", bias=False, seed=0):
    """Routing that gives expert ``e`` exactly ``counts[e]`` slots (k = 1), or about that many (k = 2: each token's
    second expert is the next one), in a shuffled token order; random weights of the activation's shape."""
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    first = torch.cat([torch.full((c,), j, dtype=torch.int32) for j, c in enumerate(counts)])
    first = first[torch.randperm(first.numel(), generator=g)]
    ids = first[:, None] if k == 1 else torch.stack([first, (first + 1) % e], 1)
    t = ids.shape[0]
    rows = I if act == "relu2" else 2 * I
    w13 = (torch.randn(e, rows, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(e, H, I, generator=g) / I**0.5).to(dtype)
    x = torch.randn(t, H, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g) + 0.05
    b1 = (torch.randn(e, rows, generator=g) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(e, H, generator=g) * 0.1).to(dtype) if bias else None
    to = lambda v: v.to(DEV) if v is not None else None  # noqa: E731
    return to(x), to(w13), to(w2), to(w), to(ids.contiguous()), to(b1), to(b2)


def _cfg(t, e, k, dtype, tail=0, bm=BM, **extra):
    cfg = heuristic_config(t, e, H, I, k, dtype, 4)
    cfg = dict(cfg, BLOCK_M=bm, **extra)
    cfg.pop("tma", None)  # no tensor descriptors under the interpreter
    for part in ("w13", "w2"):
        cfg[part] = {key: v for key, v in cfg[part].items() if key not in ("SWAP", "gluon")}
    return dict(cfg, tail_bm=tail) if tail else cfg


def _run(problem, act, cfg, limit=None):
    x, w13, w2, w, ids, b1, b2 = problem
    return te.fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=cfg)


# each case: (BS, top-k, dtype, activation, bias, extra config, align kernel)
CASES = [
    (16, 1, torch.bfloat16, "silu", False, {}, "small"),  # the single-program align, K = 1 (no combine)
    (32, 1, torch.bfloat16, "silu", False, {}, "multi"),  # count + scatter
    (16, 2, torch.bfloat16, "silu", False, {"sum_pass": False}, "small"),  # the fused top-k sum in w2's tail
    (32, 2, torch.bfloat16, "silu", False, {"sum_pass": True}, "multi"),  # the sum pass
    (16, 2, torch.float32, "swigluoai", True, {}, "small"),  # fp32 (exact dots), clamp, both biases
    (32, 1, torch.bfloat16, "relu2", True, {}, "small"),  # non-gated: one accumulator
    (16, 2, torch.bfloat16, "gelu_tanh", False, {"w13_split": True}, "small"),  # split w13 + the epilogue pass
]


@pytest.mark.parametrize("bs, k, dtype, act, bias, extra, align", CASES,
                         ids=[f"bs{c[0]}-k{c[1]}-{c[3]}-{c[6]}-{'-'.join(c[5]) or 'plain'}" for c in CASES])
def test_tail_tiles_are_the_same_bits(bs, k, dtype, act, bias, extra, align, monkeypatch):
    counts = _counts(bs)
    problem = _problem(counts, k, dtype, act, bias)
    t, e = problem[0].shape[0], len(counts)
    limit = 7.0 if act == "swigluoai" else None
    monkeypatch.setattr(te, "SMALL_SLOTS", 1 << 20 if align == "small" else 0)
    base = _run(problem, act, _cfg(t, e, k, dtype, **extra), limit)
    tail = _run(problem, act, _cfg(t, e, k, dtype, bs, **extra), limit)
    assert torch.equal(base, tail)
    # the tail path really ran: fewer padded rows than BLOCK_M blocks would reserve
    plan = launch_plan(t, H, I, problem[1].shape[1], e, e, k, dtype, 0, act != "relu2", False, bias, bias, False,
                       limit, True, te.SMALL_SLOTS, te.INLINE_SLOTS, _freeze(_cfg(t, e, k, dtype, bs, **extra)))
    assert plan.tail == bs and plan.align == align and plan.w13_kw["TAIL"] == bs and plan.align_kw["TAIL"] == bs


def test_tail_tiles_match_the_torch_twin():
    problem = _problem(_counts(32), 2, torch.float32, "silu")
    x, w13, w2, w, ids, _, _ = problem
    out = _run(problem, "silu", _cfg(x.shape[0], 8, 2, torch.float32, 32))
    ref = fused_experts_torch(x, w13, w2, w, ids, activation="silu")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


# (format, BLOCK_M, BS): fp8 dots on wgmma need >= 64 token rows per tile (tail tiles too); 4-bit decodes to bf16
QUANT_CASES = {
    "fp8_block_fused_requant": (Fp8BlockFormat(64, 64), 128, 64),  # w2's input quantised in w13's epilogue
    "fp8_block_separate_requant": (Fp8BlockFormat(64, 64), 128, 64),  # w13 BN 32: a separate pass over the slots
    "mxfp4": (Mxfp4Format(), 64, 16),
    "int4_g32": (Int4GroupFormat(32), 64, 32),
}


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_quantised_tail_tiles_are_the_same_bits(name):
    fmt, bm, bs = QUANT_CASES[name]
    counts = _counts(bs, bm)
    x, w13, w2, w, ids, b1, b2 = _problem(counts, 2, torch.bfloat16, "swigluoai", True, seed=3)
    q13, q2, s13, s2 = (v.to(DEV) for v in quantize_experts(w13.cpu(), w2.cpu(), fmt))
    spec = tq.QuantSpec.of(fmt)
    t, e = x.shape[0], len(counts)

    def run(cfg):
        return tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, None, None, "swigluoai", False, b1, b2,
                                           None, 7.0, config=cfg)

    base = _cfg(t, e, 2, torch.bfloat16, bm=bm)
    bn = 32 if name.endswith("separate_requant") else getattr(fmt, "block_n", 64)  # 32 < bk: the separate pass
    base = dict(base, w13=dict(base["w13"], BN=bn))
    assert torch.equal(run(base), run(dict(base, tail_bm=bs)))


def test_fp8_wgmma_refuses_narrow_tail_tiles():
    with pytest.raises(ValueError, match='"tail_bm" = 32 with fp8 wgmma'):
        tq.QuantSpec.of(Fp8BlockFormat(128, 128)).fix_config(dict(_cfg(100, 8, 2, torch.bfloat16, 32, bm=128)),
                                                             torch.bfloat16)


@pytest.mark.parametrize("value", [8, 24, 64, 128, True, "32", -16])
def test_tail_bm_refuses_bad_values(value):
    with pytest.raises(ValueError, match='"tail_bm"'):
        tail_bm_value({"BLOCK_M": 64, "tail_bm": value})


@pytest.mark.parametrize("part, key", [("w13", "SWAP"), ("w2", "SWAP"), ("w13", "gluon"), ("w2", "gluon")])
def test_tail_bm_refuses_swapped_and_gluon_tiles(part, key):
    cfg = _cfg(100, 8, 2, torch.bfloat16, 16)
    cfg[part] = dict(cfg[part], **{key: 1})
    with pytest.raises(ValueError, match=f'"tail_bm" = 16 .*"{part}": "{key}"'):
        launch_plan(100, H, I, 2 * I, 8, 8, 2, torch.bfloat16, 0, True, False, False, False, False, None, True,
                    te.SMALL_SLOTS, te.INLINE_SLOTS, _freeze(cfg))


def test_tail_tiles_never_take_the_inline_layout():
    """A decode-sized chunk with tail blocks runs the align kernel (the inline layout has BLOCK_M blocks only)."""
    cfg = _cfg(2, 8, 2, torch.bfloat16, 16)
    plan = launch_plan(2, H, I, 2 * I, 8, 8, 2, torch.bfloat16, 0, True, False, False, False, False, None, True,
                       te.SMALL_SLOTS, 64, _freeze(cfg))
    assert plan.align == "small" and plan.tail == 16


SM90_SNIPPET = """
import compile_sm90 as c
from pathlib import Path
import tempfile
cfg = {"BLOCK_M": 128, "tma": True, "w13": {"BK": 64, "BN": 128, "GROUP_M": 8, "num_stages": 3, "num_warps": 8},
       "w2": {"BK": 64, "BN": 256, "GROUP_M": 8, "num_stages": 4, "num_warps": 8}}
seen = set()
for tail in (32, 64):
    for kf, args, kw in c.launches(c.FORMATS["bf16"], 4096, "deepseek", config=dict(cfg, tail_bm=tail)):
        if kf.__name__ in ("w13_kernel", "w2_kernel"):
            assert kw["TAIL"] == tail, kw
            ptx = c.compile_launch(kf, args, kw).asm["ptx"]
            assert "wgmma.mma_async" in ptx, (tail, kf.__name__)  # the BLOCK_M tiles stay on wgmma
            rep = c.ptxas_report(ptx, Path(tempfile.mkdtemp()))
            assert "0 bytes spill stores" in rep and "C7514" not in rep, rep
            seen.add((tail, kf.__name__))
assert len(seen) == 4, seen
print("ok")
"""


def test_tail_tiles_compile_for_sm90(tmp_path):
    """With tail blocks the big tiles still compile to wgmma, without spills (Triton's real compiler, on CPU)."""
    pytest.importorskip("triton.backends.nvidia")
    run_compiled(SM90_SNIPPET, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bs", [32, 64])
@pytest.mark.parametrize("shape", [(16, 8, 7168, 2048, "silu", False), (16, 4, 2880, 2880, "swigluoai", True)],
                         ids=["deepseek-slice", "gpt-oss-slice"])
def test_gpu_tail_tiles_are_the_same_bits(shape, bs):
    """The shipped compute-bound tiles (BLOCK_M 128, 8 warps, TMA) with and without tail blocks on the GPU: the BS-row
    tiles (mma.sync at 32 rows, wgmma at 64) give each row the bits of the 128-row wgmma tiles."""
    e, k, h, i, act, bias = shape
    t = 300  # ~150 (K = 8) / ~75 (K = 4) rows per expert: every remainder class, some whole blocks
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int().cuda()
    x = torch.randn(t, h, generator=g).bfloat16().cuda()
    w = (torch.rand(t, k, generator=g) + 0.05).cuda()
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).bfloat16().cuda()
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).bfloat16().cuda()
    b1 = (torch.randn(e, 2 * i, generator=g) * 0.1).bfloat16().cuda() if bias else None
    b2 = (torch.randn(e, h, generator=g) * 0.1).bfloat16().cuda() if bias else None
    cfg = {"BLOCK_M": 128, "tma": True, "w13": {"BK": 64, "BN": 128, "GROUP_M": 8, "num_stages": 3, "num_warps": 8},
           "w2": {"BK": 64, "BN": 256, "GROUP_M": 8, "num_stages": 4, "num_warps": 8}}
    limit = 7.0 if act == "swigluoai" else None
    outs = [te.fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=c)
            for c in (cfg, dict(cfg, tail_bm=bs), dict(cfg, tail_bm=bs, sum_pass=False))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
