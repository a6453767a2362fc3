"""Swapped GEMM tiles (kernel config ``"SWAP": 1``): the weight tile is the MMA's left operand and the
accumulator is transposed ([BN, BM]) until the epilogue. Every output element is the same products, scales
and K order, so under the interpreter (fp32 dots) the layer output must be the same bits as unswapped, for
every format and epilogue. On Hopper the instruction changes (wgmma m64 n=BLOCK_M); the ``gpu`` tests check
that fp8 and bf16 keep their bits there too. mxfp4 / int4 kept them only once the decoded tile was pinned
to the bf16 k order (round 5, ``w4_decode._k_order_barrier``); the fp8 and the bf16-activation 4-bit decode
heuristics swap.
"""

import pytest

import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402
from moekit.ops.triton_configs import heuristic_config  # noqa: E402
from moekit.ops.triton_experts import fused_experts_impl  # noqa: E402
from compile_check import run_compiled  # noqa: E402
from small_experts import DEV, EPILOGUES, E, H, I, K, T, experts_problem, quantised_call  # noqa: E402

def _cfg(swap: bool, bm: int, bn13: int = 64, t=T, e=E, h=H, i=I):
    cfg = heuristic_config(t, e, h, i, K, torch.bfloat16, 4)
    w13, w2 = dict(cfg["w13"], BN=bn13), dict(cfg["w2"], BN=64)
    if swap:
        w13["SWAP"] = w2["SWAP"] = 1
    return dict(cfg, BLOCK_M=bm, w13=w13, w2=w2)


@pytest.mark.parametrize("dtype, act, bias", EPILOGUES, ids=lambda v: str(v).replace("torch.", ""))
def test_unquantised_swap_is_the_same_bits(dtype, act, bias):
    w13, w2, x, w, ids, b1, b2 = experts_problem(dtype, act, bias)
    w13, w2 = w13.to(DEV), w2.to(DEV)
    limit = 7.0 if act in ("swigluoai", "silu_post_clamp") else None
    cfgs = (_cfg(False, 16), _cfg(True, 16), dict(_cfg(True, 16), w13_split=True))  # swapped + split w13 too
    outs = [fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=c) for c in cfgs]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


FORMATS = {
    "fp8_block_fused_requant": (Fp8BlockFormat(64, 64), 64),  # BN = bk: w2's input quantised in w13's epilogue
    "fp8_block_ue8m0": (Fp8BlockFormat(64, 32, ue8m0=True), 32),  # narrower than 64: fix_config widens it
    "fp8_channel": (Fp8ChannelFormat(), 64),
    "fp8_static": (Fp8ChannelFormat(per_tensor=True, static_input=True), 64),
    "mxfp4": (Mxfp4Format(), 64),
    "int4_g32": (Int4GroupFormat(32), 64),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantised_swap_is_the_same_bits(name):
    """Swapped at BLOCK_M 16 (the fp8 decode tiles), also with the split w13, against unswapped at BLOCK_M 64
    (fp8's wgmma rows)."""
    fmt, bn = FORMATS[name]
    spec, run = quantised_call(fmt)
    outs = []
    for sw, bm, split in ((False, 64, False), (True, 16, False), (True, 16, True)):
        cfg = dict(_cfg(sw, bm, bn), w13_split=split)
        fixed = spec.fix_config(cfg, torch.bfloat16)
        if spec.fp8 and sw:  # both swapped: BLOCK_M stays, the weight side is >= 64 rows
            assert fixed["BLOCK_M"] == 16 and fixed["w13"]["BN"] >= 64 and fixed["w2"]["BN"] >= 64
        outs.append(run(cfg))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_fp8_half_swapped_keeps_block_m_64():
    """Only w2 swapped: w13 still puts token rows on wgmma's M side, so BLOCK_M is raised to 64."""
    spec = tq.QuantSpec.of(Fp8BlockFormat(128, 128))
    cfg = _cfg(False, 16)
    cfg = dict(cfg, w2=dict(cfg["w2"], SWAP=1, BN=32, num_warps=8))
    fixed = spec.fix_config(cfg, torch.bfloat16)
    assert fixed["BLOCK_M"] == 64 and fixed["w2"]["BN"] == 64 and fixed["w2"]["num_warps"] == 4


SM90_SNIPPET = """
import re
import compile_sm90 as c
from moekit.ops.triton_configs import heuristic_config
cfg = heuristic_config(1, 256, 7168, 2048, 8, c.torch.bfloat16, 132, quant="fp8_block128x128")
assert cfg["w13"].get("SWAP") and cfg["w2"].get("SWAP") and cfg["BLOCK_M"] == 16, cfg
seen = set()
for kf, args, kw in c.launches(c.FORMATS["fp8_block"], 1, "deepseek", config=cfg):
    if kf.__name__ in ("w13_kernel", "w2_kernel"):
        ptx = c.compile_launch(kf, args, kw).asm["ptx"]
        m = re.search(r"wgmma\\.mma_async\\S*m64n(\\d+)k32\\S*e4m3", ptx)
        assert m and m.group(1) == "16", (kf.__name__, m and m.group(0))
        seen.add(kf.__name__)
assert seen == {"w13_kernel", "w2_kernel"}, seen
print("ok")
"""


def test_swapped_fp8_decode_compiles_to_wgmma_n16(tmp_path):
    """The fp8 decode config (heuristic, DeepSeek-V3, T = 1) compiles for sm_90 with Triton's real compiler
    (on CPU) to e4m3 wgmma with the 16 token rows as its N side."""
    pytest.importorskip("triton.backends.nvidia")
    run_compiled(SM90_SNIPPET, tmp_path)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, Fp8BlockFormat(128, 128), Fp8ChannelFormat()], ids=["bf16", "fp8_block",
                                                                                         "fp8_channel"])
@pytest.mark.parametrize("t", [1, 8, 64, 300])
def test_gpu_swap_keeps_the_bits(fmt, t):
    """On the H200: swapped (BLOCK_M 16 / 32, wgmma m64n16 / n32 over weight rows) and unswapped (BLOCK_M 64)
    give the same bits, DeepSeek-V3 slice (E = 16, K = 8): what lets fp8 decode buckets swap beside
    unswapped larger buckets (SPEC §9)."""
    e, h, i = 16, 7168, 2048
    w13, w2, x, w, ids, _, _ = experts_problem(torch.bfloat16, "silu", False, seed=2, t=t, e=e, h=h, i=i)
    ids = torch.stack([torch.randperm(e)[:K] for _ in range(t)]).int().cuda()  # K = 2 of 16 experts
    outs = []
    for sw, bm in ((False, 64), (True, 16), (True, 32)):
        cfg = _cfg(sw, bm, 64, t, e, h, i)
        if fmt is None:
            outs.append(fused_experts_impl(x, w13.cuda(), w2.cuda(), w, ids, "silu", False, None, None, None, None,
                                           config=cfg))
        else:
            q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), fmt)
            outs.append(tq.fused_experts_quant_impl(x, q13, q2, w, ids, tq.QuantSpec.of(fmt), s13, s2, None, None,
                                                    "silu", False, None, None, None, None, config=cfg))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# (T, E, K, hot, expert_map, on_input): past the inline layout (T·K > 16: the align kernels run) with
# K = E and a prime T; hot experts (rows of one expert over several 16-row blocks); expert parallelism
# (4 of 8 global experts local, -1 slots skipped); the routing weight on the input (K = 1)
EDGES = [(37, 5, 5, False, False, False), (64, 6, 3, True, False, False), (29, 8, 3, False, True, False),
         (23, 4, 1, False, False, True)]


@pytest.mark.parametrize("t, e, k, hot, emap, on_input", EDGES, ids=["prime_T_K_eq_E", "hot", "expert_map",
                                                                       "on_input"])
@pytest.mark.parametrize("name", ["bf16", "fp8_block_fused_requant", "mxfp4"])
def test_swap_same_bits_on_the_aligned_layout(t, e, k, hot, emap, on_input, name):
    g = torch.Generator().manual_seed(t * 31 + e)
    h, i = 64, 96
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) / 8, torch.randn(e, h, i, generator=g) / 8
    x = torch.randn(t, h, generator=g).bfloat16().to(DEV)
    n_ids = 2 * e if emap else e
    ids = torch.stack([torch.randperm(n_ids, generator=g)[:k] for _ in range(t)]).int()
    if hot:
        ids[:, 0] = 0
        ids[:, 1:] = torch.where(ids[:, 1:] == 0, e - 1, ids[:, 1:])
    w = (torch.rand(t, k, generator=g) + 0.05).to(DEV)
    ids = ids.to(DEV)
    mapping = None
    if emap:  # global experts 0, 2, 4, ... live here as 0 .. e-1
        mapping = torch.full((n_ids,), -1, dtype=torch.int32)
        mapping[0::2] = torch.arange(e, dtype=torch.int32)
        mapping = mapping.to(DEV)
    outs = []
    for sw, bm in ((False, 64), (True, 16), (True, 32)):
        cfg = _cfg(sw, bm, 64, t, e, h, i)
        if name == "bf16":
            outs.append(fused_experts_impl(x, w13.bfloat16().to(DEV), w2.bfloat16().to(DEV), w, ids, "silu", on_input,
                                           None, None, mapping, None, config=cfg))
        else:
            fmt = FORMATS[name][0]
            q13, q2, s13, s2 = (v.to(DEV) for v in quantize_experts(w13.bfloat16(), w2.bfloat16(), fmt))
            outs.append(tq.fused_experts_quant_impl(x, q13, q2, w, ids, tq.QuantSpec.of(fmt), s13, s2, None, None,
                                                    "silu", on_input, None, None, mapping, None, config=cfg))
    assert torch.isfinite(outs[0].float()).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
