"""Kernel-config lookup order: $MOEKIT_CONFIG_DIR, then ~/.cache/moekit/configs, then the shipped
folder; the first file holding a shape decides all of that shape's buckets (no per-bucket mixing)."""

import json

import pytest
import torch

from moekit.ops import triton_configs as tc

DEV = "Fake GPU 9000"
KEY = tc.shape_key(8, 64, 32, 2, torch.bfloat16, True)
OTHER = tc.shape_key(16, 64, 32, 2, torch.bfloat16, True)


def _cfg(bm: int) -> dict:
    tile = dict(BN=32, BK=64, GROUP_M=8, num_warps=4, num_stages=3)
    return {"BLOCK_M": bm, "w13": dict(tile), "w2": dict(tile)}


def _write(folder, entries: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tc.device_key(DEV)}.json").write_text(json.dumps({"device": DEV, "entries": entries}))


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    env, home, shipped = tmp_path / "env", tmp_path / "home", tmp_path / "shipped"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MOEKIT_CONFIG_DIR", raising=False)
    monkeypatch.setattr(tc, "CONFIG_DIR", shipped)
    monkeypatch.setattr(tc, "_device_props", lambda index: (DEV, 132, (8, 0)))
    tc.clear_config_cache()
    tc._config_dirs.cache_clear()
    yield env, home / ".cache" / "moekit" / "configs", shipped
    tc.clear_config_cache()
    tc._config_dirs.cache_clear()


def test_search_order(dirs, monkeypatch):
    env, user, shipped = dirs
    assert tc.config_dirs() == [user, shipped]
    _write(shipped, {KEY: {"1": _cfg(16), "64": _cfg(32)}, OTHER: {"1": _cfg(64)}})
    assert tc.lookup_config(DEV, KEY, 50)["BLOCK_M"] == 32
    _write(user, {KEY: {"8": _cfg(128)}})  # the user's file now decides KEY, every bucket of it
    tc.clear_config_cache()
    assert tc.lookup_config(DEV, KEY, 1)["BLOCK_M"] == 128
    assert tc.lookup_config(DEV, KEY, 64)["BLOCK_M"] == 128  # never the shipped 64 bucket
    assert tc.lookup_config(DEV, OTHER, 1)["BLOCK_M"] == 64  # shapes merge: OTHER still from shipped
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(env))
    assert tc.config_dirs() == [env, user, shipped]
    _write(env, {KEY: {"1": _cfg(16)}})
    tc.clear_config_cache()
    assert tc.lookup_config(DEV, KEY, 4096)["BLOCK_M"] == 16
    path, table = tc.shape_table(DEV, KEY)
    assert path == env / f"{tc.device_key(DEV)}.json" and list(table) == ["1"]
    assert tc.shape_table(DEV, tc.shape_key(3, 3, 3, 1, torch.float16, False)) == (None, {})


def test_get_config_follows_env_and_falls_back_to_heuristic(dirs, monkeypatch):
    env, user, shipped = dirs
    dev = torch.device("cuda", 0)  # _device_props is faked: no CUDA call
    heur = tc.get_config(dev, 1, 8, 64, 32, 2, torch.bfloat16, True)
    assert heur == tc.heuristic_config(1, 8, 64, 32, 2, torch.bfloat16, 132)
    _write(env, {KEY: {"1": _cfg(64)}})
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(env))  # part of the cache key: no clearing needed
    assert tc.get_config(dev, 1, 8, 64, 32, 2, torch.bfloat16, True)["BLOCK_M"] == 64
    monkeypatch.delenv("MOEKIT_CONFIG_DIR")
    assert tc.get_config(dev, 1, 8, 64, 32, 2, torch.bfloat16, True) == heur
    assert tc.get_config(torch.device("cpu"), 1, 8, 64, 32, 2, torch.bfloat16, True) == tc.heuristic_config(
        1, 8, 64, 32, 2, torch.bfloat16, 4)


def test_config_path_prefers_the_first_existing_file(dirs):
    env, user, shipped = dirs
    name = f"{tc.device_key(DEV)}.json"
    assert tc.config_path(DEV) == shipped / name
    _write(user, {})
    assert tc.config_path(DEV) == user / name


def test_fp8_heuristic_keeps_the_measured_fp8_tiles():
    """Untuned fp8 shapes: 4 warps everywhere; past :data:`SWAP_MAX_ROWS` expected rows per expert BLOCK_M 64
    unswapped (BLOCK_M 128 with 8 warps measured ~2x slower on H200), w13 BN within the format's 32..64 band;
    at decode both GEMMs swapped (weights on wgmma's M side: BN 64, BLOCK_M 16 / 32); the same BLOCK_K as
    the heuristic."""
    from moekit.ops.triton_configs import SWAP_MAX_ROWS, fp8_heuristic, heuristic_config

    for t, swapped, bm in ((1, True, 16), (8, True, 16), (64, True, 16), (400, True, 32), (1024, False, 64),
                           (16384, False, 64)):
        base = heuristic_config(t, 512, 6144, 2048, 12, torch.bfloat16, 132)
        cfg = fp8_heuristic(base, t, 512, 12)
        assert (t * 12 / min(512, t * 12) <= SWAP_MAX_ROWS) == swapped
        assert cfg["BLOCK_M"] == bm and cfg["tma"] is True, (t, cfg)
        assert cfg["w13"]["num_warps"] == cfg["w2"]["num_warps"] == 4
        assert bool(cfg["w13"].get("SWAP")) == bool(cfg["w2"].get("SWAP")) == swapped
        if swapped:
            assert cfg["w13"]["BN"] == 64 and cfg["w2"]["BN"] == 64
        else:
            assert 32 <= cfg["w13"]["BN"] <= 64 and cfg["w2"]["BN"] in (64, 128)
        assert (cfg["w13"]["BK"], cfg["w2"]["BK"]) == (base["w13"]["BK"], base["w2"]["BK"])
        assert base == heuristic_config(t, 512, 6144, 2048, 12, torch.bfloat16, 132)  # the input is not mutated
        assert "gluon_nt" not in cfg["w2"]  # I = 2048: 16 K steps, one column tile per program
    # a Gluon w2 of few K steps (Qwen3-30B-A3B: I = 768, 6 steps) computes 4 column tiles per program
    for t, nt in ((16, None), (1024, 4), (16384, 4)):
        cfg = heuristic_config(t, 128, 2048, 768, 8, torch.bfloat16, 132, quant="fp8_block128x128")
        assert cfg["w2"].get("gluon_nt") == nt and bool(cfg["w2"].get("gluon")) == (nt is not None), (t, cfg)
    # the unquantised heuristic never swaps (no gain); 4-bit up to 16 rows per expert, BLOCK_M 16 up to 8 rows
    for t, bm in ((1, 16), (64, 16), (256, 16), (512, 32), (1024, None)):  # 1, 2, 8, 16, 32 rows (not swapped)
        for quant in (None, "mxfp4", "int4_g32"):
            cfg = heuristic_config(t, 256, 7168, 2048, 8, torch.bfloat16, 132, quant=quant)
            want = quant is not None and t * 8 / min(256, t * 8) <= 16
            assert bool(cfg["w13"].get("SWAP")) == bool(cfg["w2"].get("SWAP")) == want, (quant, t)
            if want:
                assert cfg["BLOCK_M"] == bm and cfg["w13"]["BN"] >= 64 and cfg["w2"]["BN"] >= 64, (quant, t, cfg)

def test_4bit_heuristic_on_sm90_runs_the_register_operand_gemms():
    from moekit.ops.config_keys import check_config
    from moekit.ops.formats import Int4GroupFormat, Mxfp4Format
    from moekit.ops.triton_experts_quant import QuantSpec

    heuristic_config = tc.heuristic_config
    # DeepSeek-V3-like (E 256, K 8): T = 1 / 64 / 256 / 512 / 1024 / 1536 / 4096 -> 1, 2, 8, 16, 32, 48, 128 rows
    for t, bm, w2_bn in ((1, 16, 64), (64, 16, 64), (256, 16, 64), (512, 32, 64), (1024, 64, 128), (1536, 64, 128),
                         (4096, 128, 256)):
        for quant, fmt in (("mxfp4", Mxfp4Format()), ("int4_g32", Int4GroupFormat(32))):
            cfg = heuristic_config(t, 256, 7168, 2048, 8, torch.bfloat16, 132, quant=quant, capability=(9, 0))
            check_config(cfg)
            assert cfg["BLOCK_M"] == bm and cfg["sum_pass"] is True, (t, cfg)
            c13, c2 = cfg["w13"], cfg["w2"]
            # w13: 64 weight rows per program on the register-operand kernel, the ring refilled early
            assert (c13["BN"], c13["SWAP"], c13["gluon"], c13["gluon_rega"], c13["gluon_early"]) == (64, 1, 1, 1, 1)
            assert c13.get("gluon_stages") == (2 if bm == 128 else None)
            assert c2["BN"] == w2_bn and bool(c2.get("gluon_rega")) == (bm < 128), (t, c2)
            assert bool(c2.get("SWAP")) == (bm < 128) and c2["num_warps"] == (4 if w2_bn == 64 else 8)
            # the format's fixing keeps the forms (BK 128 for every bucket: batch invariance)
            fixed = QuantSpec.of(fmt).fix_config(cfg, torch.bfloat16)
            assert fixed == {**cfg, "w13": dict(c13, BK=128), "w2": dict(c2, BK=128)}, (t, fixed)
    # a shape's buckets share one BLOCK_K (SPEC §9)
    ks = {tc.heuristic_config(t, 8, 4096, 14336, 2, torch.bfloat16, 132, "mxfp4", (9, 0))["w13"]["BK"]
          for t in (1, 8, 64, 256, 1024, 4096, 16384)}
    assert ks == {128}
    # elsewhere the previous tiles: other GPUs, unknown GPUs, fp16 activations, unquantised (fp8: its own test below)
    for cap, dtype, quant in (((8, 0), torch.bfloat16, "mxfp4"), (None, torch.bfloat16, "int4_g32"),
                              ((10, 0), torch.bfloat16, "mxfp4"), ((9, 0), torch.float16, "mxfp4"),
                              ((9, 0), torch.bfloat16, None)):
        for t in (1, 256, 4096):
            cfg = heuristic_config(t, 256, 7168, 2048, 8, dtype, 132, quant=quant, capability=cap)
            assert cfg == heuristic_config(t, 256, 7168, 2048, 8, dtype, 132, quant=quant), (cap, dtype, quant)
            assert not cfg["w13"].get("gluon_rega") and not cfg["w2"].get("gluon_rega")
    for t in (1, 256, 4096):  # fp8 never takes the 4-bit forms
        cfg = heuristic_config(t, 256, 7168, 2048, 8, torch.bfloat16, 132, "fp8_block128x128", (9, 0))
        assert not cfg["w13"].get("gluon_rega") and not cfg["w2"].get("gluon_rega")


def test_fp8_heuristic_on_sm90_runs_the_gluon_decode_gemms():
    from moekit.ops.config_keys import check_config
    from moekit.ops.formats import Fp8BlockFormat
    from moekit.ops.triton_experts_quant import QuantSpec
    from moekit.ops.triton_plan import _freeze, launch_plan

    heuristic_config, fp8 = tc.heuristic_config, "fp8_block128x128"
    spec = QuantSpec.of(Fp8BlockFormat(128, 128))
    # (E, H, I, K, T): rows per touched expert 1 (T = 1; Kimi-K2's shape T = 12: 96 slots on 96 experts), 1.5
    # (LongCat-Flash T = 64), 2 exactly (Qwen3-235B's shape T = 32: the bound, inclusive)
    for e, h, i, k, t in ((384, 7168, 2048, 8, 1), (384, 7168, 2048, 8, 12), (512, 6144, 2048, 12, 64),
                          (128, 4096, 1536, 8, 32), (160, 5120, 1536, 8, 1)):
        old = heuristic_config(t, e, h, i, k, torch.bfloat16, 132, quant=fp8)
        cfg = heuristic_config(t, e, h, i, k, torch.bfloat16, 132, quant=fp8, capability=(9, 0))
        check_config(cfg)
        # the Triton heuristic's swapped BLOCK_M 16 tiles, both GEMMs on the Gluon decode kernels (64-row weight
        # tiles), programmatic dependent launches, weight tiles by descriptor; nothing else changed
        assert cfg == {**old, "BLOCK_M": 16, "tma": True, "pdl": True, "w13": dict(old["w13"], BN=64, gluon_dec=1),
                       "w2": dict(old["w2"], BN=64, gluon_dec=1)}, (t, cfg)
        assert old["BLOCK_M"] == 16 and old["w13"]["SWAP"] == old["w2"]["SWAP"] == 1 and "pdl" not in old
        # the format's fixing keeps the form (BK = the scale block, fp8_acc = BK: what the Gluon kernels need)
        fixed = spec.fix_config(cfg, torch.bfloat16)
        assert fixed["w13"]["gluon_dec"] == fixed["w2"]["gluon_dec"] == 1 and fixed["pdl"] is True
        assert fixed["w13"]["BK"] == fixed["w2"]["BK"] == fixed["fp8_acc"] == 128 and fixed["BLOCK_M"] == 16
    # the launch plan takes both decode GEMMs for it (a decode batch: 2 tokens x 8 slots over 16 experts)
    fixed = spec.fix_config(heuristic_config(2, 16, 512, 384, 8, torch.bfloat16, 132, fp8, (9, 0)), torch.bfloat16)
    plan = launch_plan(2, 512, 384, 768, 16, 16, 8, torch.bfloat16, 0, True, False, False, False, False, None, False,
                       1024, 16, _freeze(fixed))
    assert plan.w13_gluon_dec and plan.w2_gluon_dec == 1 and plan.want_pdl
    # past 2 rows per expert (DeepSeek-V3 T = 128: 4 rows; T = 1024: 32), on other GPUs, with fp16 activations and for
    # per-channel / per-tensor fp8 (no Gluon decode kernel): the Triton heuristic as before
    for cap, dtype, quant, t in (((9, 0), torch.bfloat16, fp8, 128), ((9, 0), torch.bfloat16, fp8, 1024),
                                 ((8, 0), torch.bfloat16, fp8, 1), ((10, 0), torch.bfloat16, fp8, 1),
                                 (None, torch.bfloat16, fp8, 1), ((9, 0), torch.float16, fp8, 1),
                                 ((9, 0), torch.bfloat16, "fp8_channel", 1), ((9, 0), torch.bfloat16, "fp8_tensor", 1)):
        cfg = heuristic_config(t, 256, 7168, 2048, 8, dtype, 132, quant=quant, capability=cap)
        assert cfg == heuristic_config(t, 256, 7168, 2048, 8, dtype, 132, quant=quant), (cap, dtype, quant, t)
        assert not cfg["w13"].get("gluon_dec") and not cfg["w2"].get("gluon_dec") and not cfg.get("pdl")
    # just past the bound: Qwen3-235B's shape at T = 33 (264 slots on 128 experts, 2.06 rows)
    cfg = heuristic_config(33, 128, 4096, 1536, 8, torch.bfloat16, 132, fp8, (9, 0))
    assert cfg == heuristic_config(33, 128, 4096, 1536, 8, torch.bfloat16, 132, fp8) and not cfg.get("pdl")
    # a shape's buckets share one BLOCK_K (SPEC §9)
    ks = {spec.fix_config(heuristic_config(t, 384, 7168, 2048, 8, torch.bfloat16, 132, fp8, (9, 0)),
                          torch.bfloat16)["w13"]["BK"] for t in (1, 8, 64, 256, 1024, 4096, 16384)}
    assert ks == {128}


def test_the_heuristic_keys_on_nvidia_capabilities_only(monkeypatch):
    # a ROCm build's gfx9 devices report major 9: they get the other GPUs' tiles, not the sm_90 forms
    from types import SimpleNamespace

    props = SimpleNamespace(major=9, minor=4)
    monkeypatch.setattr(torch.version, "hip", None)
    assert tc.heuristic_capability(props) == (9, 4)
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert tc.heuristic_capability(props) is None
    # the runtime lookup's device properties and the tuner's take it (no CUDA call: the properties are faked)
    from moekit.benchmarking import tune

    fake = SimpleNamespace(name="AMD Instinct MI300X", multi_processor_count=304, major=9, minor=4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert tc._device_props.__wrapped__(0) == ("AMD Instinct MI300X", 304, None)
    assert tune._device_traits() == (304, None)
    monkeypatch.setattr(torch.version, "hip", None)
    assert tc._device_props.__wrapped__(0) == ("AMD Instinct MI300X", 304, (9, 4))
    assert tune._device_traits() == (304, (9, 4))


def test_get_config_passes_the_device_capability_to_the_heuristic(dirs, monkeypatch):
    monkeypatch.setattr(tc, "_device_props", lambda index: (DEV, 132, (9, 0)))
    tc.clear_config_cache()
    try:
        got = tc.get_config(torch.device("cuda", 0), 1, 8, 64, 32, 2, torch.bfloat16, True, quant="mxfp4")
        assert got == tc.heuristic_config(1, 8, 64, 32, 2, torch.bfloat16, 132, "mxfp4", (9, 0))
        assert got["w13"]["gluon_rega"] == 1
    finally:
        tc.clear_config_cache()
