"""``w13_split`` (config key): w13 with one accumulator per program (gate column blocks, then up column
blocks) and the epilogue in a separate pass over the fp32 GEMM outputs. Every output element is the same
dot as in the fused w13, so the layer output must be the same bits — for every format and epilogue: bias,
clamp, every gated activation, fp8 re-quantisation fused (BN = bk) or in its own pass (narrow tiles),
static fp8 inputs. Non-gated experts (relu2: one accumulator already) ignore the key.
"""

import pytest

import torch

pytest.importorskip("triton")

from moekit.ops.triton_configs import heuristic_config  # noqa: E402
from moekit.ops.triton_experts import fused_experts_impl  # noqa: E402
from moekit.ops.triton_plan import _freeze, launch_plan  # noqa: E402
from compile_check import run_compiled  # noqa: E402
from small_experts import DEV, EPILOGUES, FORMATS, E, H, I, K, T, experts_problem, quantised_same_bits  # noqa: E402

def _cfg(bn=64, split=False):
    cfg = heuristic_config(T, E, H, I, K, torch.bfloat16, 4)
    cfg = dict(cfg, w13=dict(cfg["w13"], BN=bn))
    return dict(cfg, w13_split=True) if split else cfg


@pytest.mark.parametrize("dtype, act, bias", EPILOGUES, ids=lambda v: str(v).replace("torch.", ""))
def test_unquantised_split_is_the_same_bits(dtype, act, bias):
    w13, w2, x, w, ids, b1, b2 = experts_problem(dtype, act, bias)
    w13, w2 = w13.to(DEV), w2.to(DEV)
    limit = 7.0 if act in ("swigluoai", "silu_post_clamp") else None
    fused = fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=_cfg())
    split = fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=_cfg(split=True))
    assert torch.equal(fused, split)
    # the split path really ran (gated: twice the w13 programs), relu2 ignores the key
    plan = launch_plan(T, H, I, w13.shape[1], E, E, K, dtype, 0, act != "relu2", False, bias, bias, False, limit,
                       False, 8192, 0, _freeze(_cfg(split=True)))
    base = launch_plan(T, H, I, w13.shape[1], E, E, K, dtype, 0, act != "relu2", False, bias, bias, False, limit,
                       False, 8192, 0, _freeze(_cfg()))
    assert plan.split == (act != "relu2")
    assert plan.grid13[0] == base.grid13[0] * (2 if plan.split else 1)




@pytest.mark.parametrize("name", list(FORMATS))
def test_quantised_split_is_the_same_bits(name):
    fmt, bn = FORMATS[name]
    assert quantised_same_bits(fmt, [_cfg(bn, split) for split in (False, True)])


SM90_SNIPPET = """
import sys
import compile_sm90 as c
cfg = {"BLOCK_M": 128, "w13": {"BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
       "w2": {"BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}, "tma": True, "w13_split": True}
names = set()
for fmt in ("bf16", "fp8_block"):
    for kf, args, kw in c.launches(c.FORMATS[fmt], 4000, (16, 8, 1024, 512, "silu", False), config=cfg):
        if kf.__name__ in ("w13_kernel", "act_pass_kernel"):
            ptx = c.compile_launch(kf, args, kw).asm["ptx"]
            assert kf.__name__ == "act_pass_kernel" or "wgmma.mma_async" in ptx, (fmt, kf.__name__)
            names.add(kf.__name__)
assert names == {"w13_kernel", "act_pass_kernel"}, names
print("ok")
"""


def test_split_kernels_compile_for_sm90(tmp_path):
    """The split w13 and the epilogue pass compile for Hopper with Triton's real compiler (on CPU)."""
    pytest.importorskip("triton.backends.nvidia")
    run_compiled(SM90_SNIPPET, tmp_path)
