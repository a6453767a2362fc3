"""Whole-config validation (:func:`moekit.ops.config_keys.check_config`): every config a launcher can be given — a
config file's entries when the file is read, an explicit ``config=`` — is checked where it enters, so a typo or a
value of the wrong kind raises ``ValueError`` naming where it came from, the key and the value, never being ignored.
"""

import glob
import itertools
import json

import pytest
import torch

from moekit.ops import triton_configs as tc
from moekit.ops.config_keys import PART_KEYS, TOP_KEYS, check_config

DEV = "Fake GPU 9000"
KEY = tc.shape_key(8, 64, 32, 2, torch.bfloat16, True)


def _cfg(**top) -> dict:
    tile = dict(BN=32, BK=64, GROUP_M=8, num_warps=4, num_stages=3)
    return {"BLOCK_M": 64, "w13": dict(tile), "w2": dict(tile), **top}


def _part(part: str, **keys) -> dict:
    cfg = _cfg()
    cfg[part].update(keys)
    return cfg


def test_shipped_tables_pass():
    # every entry of every shipped table (load_config_file checks each; a failure names the entry)
    files = glob.glob(str(tc.CONFIG_DIR / "*.json"))
    assert len(files) >= 2
    seen_top, seen_part = set(), set()
    for f in files:
        for table in tc.load_config_file(f).values():
            for cfg in table.values():
                seen_top |= set(cfg)
                seen_part |= set(cfg["w13"]) | set(cfg["w2"])
    # the known keys are the ones the tables and docs use: a table key the check did not know would have raised
    assert seen_top <= set(TOP_KEYS) and seen_part <= set(PART_KEYS)
    assert {"BLOCK_M", "w13", "w2", "pdl", "tail_bm", "sum_pass", "fp8_acc"} <= seen_top
    assert {"SWAP", "gluon", "gluon_dec", "gluon_nt", "gluon_rega", "gluon_early", "gluon_ws"} <= seen_part


@pytest.mark.parametrize("quant", [None, "fp8_block128x128", "fp8_channel", "mxfp4", "int4_g32"])
def test_heuristic_configs_pass(quant):
    # the heuristic's configs over awkward shapes (T = 1, primes, K = E, huge T) and every params dtype
    for t, (e, k), (h, i), dt in itertools.product(
            [1, 3, 8, 61, 257, 1024, 16384], [(8, 2), (7, 7), (128, 8), (256, 8)], [(64, 32), (2880, 2880),
                                                                                     (7168, 2048), (4096, 14336)],
            [torch.bfloat16, torch.float16, torch.float32]):
        check_config(tc.heuristic_config(t, e, h, i, k, dt, 132, quant))


@pytest.mark.parametrize("cfg,match", [
    # top level: a typo, a key of another tool, a missing part, a string / bool where an int belongs
    (_cfg(BLOCK_N=64), r"unknown key 'BLOCK_N' \(never ignored\)"),
    (_cfg(SPLIT_K=2), r"unknown key 'SPLIT_K'"),
    ({"BLOCK_M": 64, "w13": _cfg()["w13"]}, r"the key 'w2' is missing"),
    (_cfg(BLOCK_M="64"), r'"BLOCK_M" = \'64\', expected a power of two in 16..256'),
    (_cfg(BLOCK_M=48), r'"BLOCK_M" = 48'),
    (_cfg(BLOCK_M=True), r'"BLOCK_M" = True'),
    (_cfg(BLOCK_M=8), r'"BLOCK_M" = 8'),
    (_cfg(tma="yes"), r'"tma" = \'yes\', expected true or false'),
    (_cfg(pdl=2), r'"pdl" = 2'),
    (_cfg(sum_pass="auto"), r'"sum_pass" = \'auto\', expected true, false or null'),
    (_cfg(fp8_acc=-1), r'"fp8_acc" = -1, expected an int >= 0'),
    (_cfg(tail_bm=64), r'"tail_bm" = 64, expected 0 \(off\) or a power of two >= 16 and below BLOCK_M'),
    # a part: a typo, a missing required key, each kind of bad value
    (_part("w13", num_warp=4), r'config "w13": unknown key \'num_warp\''),
    (_part("w2", SPLIT_K=4), r'config "w2": unknown key \'SPLIT_K\''),
    ({"BLOCK_M": 64, "w13": {"BN": 32}, "w2": _cfg()["w2"]}, r'config "w13": the key \'BK\' is missing'),
    (_cfg(w2=[64, 64]), r'config "w2" = \[64, 64\], expected a dict'),
    (_part("w13", BN=48), r'"BN" = 48, expected a power of two in 8..1024'),
    (_part("w2", BK=8), r'"BK" = 8, expected a power of two in 16..1024'),
    (_part("w13", GROUP_M=0), r'"GROUP_M" = 0, expected an int >= 1'),
    (_part("w2", num_warps=3), r'"num_warps" = 3, expected 1, 2, 4, 8 or 16'),
    (_part("w13", num_stages=0), r'"num_stages" = 0, expected an int in 1..16'),
    (_part("w13", num_stages=4.0), r'"num_stages" = 4.0'),
    (_part("w2", SWAP=2), r'"SWAP" = 2, expected 0 or 1'),
    (_part("w2", gluon="on"), r'"gluon" = \'on\', expected 0 or 1'),
    (_part("w13", gluon_wbuf=3), r'"gluon_wbuf" = 3, expected 1 or 2'),
    (_part("w2", gluon_stages=-1), r'"gluon_stages" = -1'),
    # the keys that select kernel forms, through their own checks
    (_part("w13", gluon_nt=2), r'config "w13": "gluon_nt" = 2: column tiles per program are a key of the Gluon w2'),
    (_part("w2", gluon_nt=0), r'"gluon_nt" = 0, expected an int in 1..16'),
    (_part("w13", gluon_dec=2), r'config "w13": "gluon_dec" = 2, expected 0 or 1'),
    (_part("w2", gluon_dec=2, gluon_nt=2), r'"gluon_dec" = 2 .* cannot be combined with "gluon_nt" = 2'),
    (_part("w2", gluon_rega=2), r'config "w2": "gluon_rega" = 2'),
    (_part("w13", gluon_early=1), r'"gluon_early" = 1 needs "gluon_rega"'),
    (_part("w13", gluon_ws=-1), r'"gluon_ws" = -1'),
    (_part("w2", gluon_maxnreg=128), r'"gluon_maxnreg" = 128 needs "gluon_rega"'),  # the Triton kernels: not theirs
    (_part("w2", gluon_rega=1, gluon_maxnreg=130), r'"gluon_maxnreg" = 130, expected 0 \(off\) or a multiple of 8'),
    (_part("w2", gluon_rega=1, gluon_maxnreg=256), r'"gluon_maxnreg" = 256'),  # past ptxas' 255
    (_part("w2", gluon_rega=1, gluon_maxnreg=True), r'"gluon_maxnreg" = True'),
    (_part("w13", gluon_stack=5), r'"gluon_stack" = 5, expected 0 or 1'),
])
def test_bad_configs_raise_naming_the_key(cfg, match):
    with pytest.raises(ValueError, match=r"^kernel config: .*" + match):
        check_config(cfg)


def test_good_configs_pass_and_are_not_changed():
    for cfg in (_cfg(), _cfg(tma=True, pdl=False, sum_pass=None, w13_split=0, fp8_acc=128),
                _cfg(BLOCK_M=128, tail_bm=64), _part("w2", SWAP=1, gluon=1, gluon_dec=1, gluon_nt=4),
                _part("w13", gluon=1, gluon_rega=2, gluon_early=1, gluon_wbuf=1, gluon_stages=2),
                _part("w2", gluon=1, gluon_rega=1, gluon_maxnreg=128), _part("w2", gluon_maxnreg=0)):
        before = json.dumps(cfg, sort_keys=True)
        check_config(cfg)
        assert json.dumps(cfg, sort_keys=True) == before
    with pytest.raises(ValueError, match=r"^kernel config: expected a dict"):
        check_config([("BLOCK_M", 64)])


@pytest.fixture
def env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(tc, "_device_props", lambda index: (DEV, 132, (8, 0)))
    tc.clear_config_cache()
    yield tmp_path
    tc.clear_config_cache()


def _write(folder, entries) -> str:
    path = folder / f"{tc.device_key(DEV)}.json"
    path.write_text(json.dumps({"device": DEV, "entries": entries}))
    return str(path)


def test_a_bad_file_entry_raises_naming_file_shape_bucket_and_key(env_dir):
    # a hand-edited table with a typo in one bucket: the lookup of any shape in that file raises, naming it
    cfg = _cfg()
    cfg["w2"]["num_stage"] = 4
    path = _write(env_dir, {KEY: {"1": _cfg(), "64": cfg}})
    dev = torch.device("cuda", 0)  # _device_props is faked: no CUDA call
    with pytest.raises(ValueError, match=(rf"^{path}: shape {KEY}, bucket 64 \(fix or delete the entry, or re-run "
                                          rf"`moekit tune`\): config \"w2\": unknown key 'num_stage'")):
        tc.get_config(dev, 1, 8, 64, 32, 2, torch.bfloat16, True)


@pytest.mark.parametrize("entries,match", [
    ([1, 2], r'"entries" = list, expected'),
    ({KEY: [1]}, rf"shape {KEY}: list, expected"),
    ({KEY: {"0": _cfg()}}, rf"shape {KEY}: bucket '0', expected a token count >= 1"),
    ({KEY: {"x8": _cfg()}}, rf"shape {KEY}: bucket 'x8'"),
])
def test_a_malformed_file_raises(env_dir, entries, match):
    path = _write(env_dir, entries)
    with pytest.raises(ValueError, match=match):
        tc.load_config_file(path)


@pytest.mark.parametrize("text,match", [
    ('{"entries": {', r"not valid JSON"),  # a truncated file: the error names it (it named no file)
    ("[1, 2]", r"got list"),  # not an object (was an AttributeError)
    (json.dumps({KEY: {"1": _cfg()}}), r"got keys \['E=.*'\]"),  # the wrapper left out: was read as empty
    (json.dumps({"device": DEV, "entires": {}}), r"got keys \['device', 'entires'\]"),  # a misspelt key: ignored
])
def test_a_malformed_file_raises_naming_it(env_dir, text, match):
    # round 51: these were a JSONDecodeError without the path, an AttributeError, or a file silently read as empty
    # (the user's tuning dropped, the shipped table run instead)
    path = env_dir / f"{tc.device_key(DEV)}.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}: .*{match}"):
        tc.load_config_file(str(path))


def test_an_explicit_config_is_checked_before_any_launch():
    # fused_experts_impl (the tuner's and the benchmarks' entry) and the quantised launcher check config= first:
    # CPU tensors, no kernel runs
    from moekit.ops.triton_experts import fused_experts_impl
    from moekit.ops.triton_experts_quant import fused_experts_quant_impl
    from moekit.ops.formats import Fp8BlockFormat
    from moekit.ops.quant_spec import QuantSpec

    x = torch.randn(3, 64)
    w1, w2 = torch.randn(4, 64, 64), torch.randn(4, 64, 32)
    w, ids = torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    bad = _part("w13", BLOCK_K=64)
    with pytest.raises(ValueError, match=r"^kernel config: config \"w13\": unknown key 'BLOCK_K'"):
        fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None, None, config=bad)
    with pytest.raises(ValueError, match=r"^kernel config: unknown key 'block_m'"):
        fused_experts_quant_impl(x, w1, w2, w, ids, QuantSpec.of(Fp8BlockFormat(32, 32)), None, None, None, None,
                                 "silu", False, None, None, None, None, config={"block_m": 64, **_cfg()})
