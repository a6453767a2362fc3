"""What the compiled sm_90 kernels must look like, checked on CPU with Triton's real compiler.

Two defects that every interpreter test passed and only an H200 showed:

- Pointer-loaded weights must stay 16-byte ``cp.async`` copies. ``tl.multiple_of(offset, 1)`` on the expert
  offset (the 4-bit alignment hint at its default) replaced Triton's own divisibility facts, and bf16
  weights were read 2 bytes at a time without pipelining: 2.5-2.8x slower non-TMA buckets (Qwen3-30B-A3B
  T = 8: 394 vs 141 µs, Mixtral T = 64: 1698 vs 683 µs).
- The 4-bit decoded tile must reach ``mma.sync`` with the bf16 operand layout (``kWidth = 2``). With the
  packed words in the dot operand's backward slice Triton chose kWidth 4 (int4) / 8 (mxfp4), which changes
  which k each MMA instruction sums: mma.sync buckets then differed in the last bits from wgmma buckets
  (SPEC §9 batch invariance; ``test_gpu_batch_invariant_every_bucket[int4]`` failed at 256 tokens).
"""


import pytest

from compile_check import run_compiled

pytest.importorskip("triton.backends.nvidia")

# config of a decode bucket on pointer loads (the H200 table's Qwen3-30B-A3B T = 8 entry)
POINTER_SNIPPET = """
import re
import compile_sm90 as c
cfg = {"BLOCK_M": 16, "tma": False, "w13": {"BN": 32, "BK": 64, "num_stages": 5, "num_warps": 4, "GROUP_M": 8},
       "w2": {"BN": 64, "BK": 64, "num_stages": 3, "num_warps": 4, "GROUP_M": 8}}
for fmt in ("bf16", "fp8_channel"):
    for kf, args, kw in c.launches(c.FORMATS[fmt], 8, "invariance", config=cfg):
        if kf.__name__ in ("w13_kernel", "w2_kernel"):
            ptx = c.compile_launch(kf, args, kw).asm["ptx"]
            narrow = [w for w in ("ld.global.b16", "ld.global.u16", "ld.global.b8", "ld.global.u8") if w in ptx]
            assert not narrow, (fmt, kf.__name__, narrow)
            assert "cp.async.cg.shared.global" in ptx, (fmt, kf.__name__)
# packed 4-bit rows of gpt-oss (int4: 360 words, mxfp4: 1440 bytes, no multiple of 16 elements): the launcher's
# W_ALIGN hint makes every weight copy a 16-byte one (the hint had been lost once: 4-byte copies)
for fmt in ("int4_g32", "mxfp4"):
    for kf, args, kw in c.launches(c.FORMATS[fmt], 1, "gpt-oss"):
        if kf.__name__ in ("w13_kernel", "w2_kernel"):
            assert kw["W_ALIGN"] > 1, (fmt, kf.__name__)
            ptx = c.compile_launch(kf, args, kw).asm["ptx"]
            widths = set(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", ptx))
            assert widths == {"0x10"}, (fmt, kf.__name__, widths)
print("ok")
"""


def test_pointer_loaded_tiles_stay_16_byte_copies(tmp_path):
    run_compiled(POINTER_SNIPPET, tmp_path)


# every shipped H200 bucket on pointer loads ("tma" false): bf16 and fp8 block, each shape's H, I, K (E = 8:
# the kernels do not depend on E, and the CPU tensors stay small)
SHIPPED_SNIPPET = """
import json
import re
import compile_sm90 as c
table = json.load(open("src/moekit/configs/NVIDIA_H200.json"))["entries"]
n = 0
for key, buckets in table.items():
    f = dict(kv.split("=") for kv in key.split(","))
    fmt = {None: None, "fp8_block128x128": c.FORMATS["fp8_block"]}.get(f.get("quant"), "skip")
    if fmt == "skip":
        continue
    shape = (8, int(f["K"]), int(f["H"]), int(f["I"]), "silu", False)
    for t, cfg in buckets.items():
        if cfg.get("tma"):
            continue
        for kf, args, kw in c.launches(fmt, int(t), shape, config=cfg):
            if kf.__name__ in ("w13_kernel", "w2_kernel"):
                ptx = c.compile_launch(kf, args, kw).asm["ptx"]
                narrow = re.findall(r"ld\\.global(?:\\.[a-z]+)*\\.(?:b16|u16|b8|u8)\\b", ptx)
                assert not narrow and "cp.async.cg.shared.global" in ptx, (key, t, kf.__name__, set(narrow))
                n += 1
assert n >= 20, n
print("ok", n)
"""


def test_shipped_pointer_load_buckets_copy_16_bytes(tmp_path):
    """The shipped H200 table's pointer-load buckets compile to 16-byte ``cp.async`` weight copies (what
    round 5's H200 tuner timed at 2.5-2.8x slower when they did not)."""
    run_compiled(SHIPPED_SNIPPET, tmp_path)


KWIDTH_SNIPPET = """
import re
import compile_sm90 as c
for fmt in ("mxfp4", "int4_g32", "int4_g128"):
    for t in (1, 128):
        for kf, args, kw in c.launches(c.FORMATS[fmt], t, "invariance"):
            if kf.__name__ in ("w13_kernel", "w2_kernel"):
                ttgir = c.compile_launch(kf, args, kw).asm["ttgir"]
                widths = set(re.findall(r"dot_op<\\{opIdx = \\d, parent = #mma, kWidth = (\\d+)\\}>", ttgir))
                assert widths == {"2"}, (fmt, t, kf.__name__, widths)
print("ok")
"""


def test_4bit_mma_sync_operands_keep_the_bf16_k_order(tmp_path):
    run_compiled(KWIDTH_SNIPPET, tmp_path)
