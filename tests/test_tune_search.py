"""``moekit tune`` on CPU: candidate generation and pruning per regime and format, fix_config + dedup,
the search stages and deadline, the point wiring, the output-file merge and the progress lines (the GPU
timer is mocked)."""

import json

import pytest
import torch

from moekit.benchmarking import tune, tune_auto, tune_checks, tune_forms, tune_space as ts, tune_tables
from moekit.benchmarking.shapes import MODELS, TOKENS, ModelShape
from moekit.benchmarking.tune_space import (
    PRIORS, Space, _cfg, block_k, config_id, expected_rows, family, neighbour_configs, prior_configs, regime, search,
    shape_block_k, smem_estimate,
)
from moekit.ops import triton_configs as tc
from moekit.ops.config_heuristic import swap_tiles
from moekit.ops.triton_configs import heuristic_config, shape_key

DIMS = (128, 2048, 768, 8, True)


def test_regimes_follow_rows_per_expert():
    assert expected_rows(1, 128, 8) == 1 and expected_rows(1024, 128, 8) == 64 and expected_rows(16384, 8, 2) == 4096
    want = ["decode"] * 2 + ["small"] * 2 + ["medium"] * 2 + ["large"]
    assert [regime(r) for r in (1, 8, 9, 48, 49, 256, 257)] == want
    assert family(None) == "bf16" and family(tune.quant_spec("fp8")[1]) == "fp8"
    assert family(tune.quant_spec("mxfp4")[1]) == family(tune.quant_spec("int4")[1]) == "4bit"


@pytest.mark.parametrize("fam", list(PRIORS))
def test_priors_are_few_and_quick_is_fewer(fam):
    base = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    for rows in (1, 30, 100, 1000):
        full = prior_configs(rows, base, fam, (128, 128))
        quick = prior_configs(rows, base, fam, (128, 128), quick=True)
        assert 3 <= len(full) <= 10 and len(quick) <= 4
        assert len({config_id(c) for c in full}) == len(full)
        # compute-bound regimes also try the split w13 (one accumulator per program: the same bits)
        assert any(c.get("w13_split") for c in quick) == (fam != "4bit" and rows > 48)
        # quantised decode also tries swapped tiles (weights on wgmma's M side); bf16 gained nothing
        assert any(c["w13"].get("SWAP") for c in quick) == (fam != "bf16" and rows <= 16)
    if fam == "4bit":
        assert all(c["w13"]["BN"] <= 128 and c["w13"]["num_stages"] <= 3 for c in prior_configs(1, base, fam, (128, 128)))


def test_4bit_priors_include_the_register_operand_gemms():
    # round 35: at Qwen3 T = 1 / 2 the register-operand GEMMs (swapped BN 64, early refill, the sum pass) beat the
    # unswapped Triton winner, whose neighbours never reach them: stage 1 tries them beside the swapped priors, for
    # 4-bit decode rows only, not in a quick search; the space keeps the candidate (mxfp4 and int4)
    base = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    for rows, bm in ((1, 16), (8, 16), (16, 32)):
        ra = [c for c in prior_configs(rows, base, "4bit", (128, 128)) if c["w13"].get("gluon_rega")]
        assert len(ra) == 1, rows
        c = ra[0]
        assert c["BLOCK_M"] == bm and c["sum_pass"] is True and c["w13_split"] is False
        for part in ("w13", "w2"):
            assert {k: c[part][k] for k in ("BN", "SWAP", "gluon", "gluon_rega", "gluon_early")} == {
                "BN": 64, "SWAP": 1, "gluon": 1, "gluon_rega": 1, "gluon_early": 1}
        assert not any(c["w13"].get("gluon_rega") for c in prior_configs(rows, base, "4bit", (128, 128), quick=True))
    for fam, rows in (("fp8", 1), ("bf16", 1), ("fp8", 1000), ("bf16", 1000)):
        assert not any(c["w13"].get("gluon_rega") for c in prior_configs(rows, base, fam, (128, 128))), (fam, rows)
    # round 36: past 16 rows, the sm_90 heuristic's two token blocks (64: w2 on 128-row register-operand tiles; 128:
    # the Triton w2) and Mixtral-8x7B's winner (both GEMMs on 128-row register-operand tiles), not in a quick search
    for rows in (30, 100, 1000):
        ra = [c for c in prior_configs(rows, base, "4bit", (128, 128)) if c["w13"].get("gluon_rega")]
        forms = sorted((c["BLOCK_M"], c["w13"]["BN"], c["w2"]["BN"], bool(c["w2"].get("gluon_rega"))) for c in ra)
        assert forms == [(64, 64, 128, True), (128, 64, 256, False), (128, 128, 128, True)], (rows, forms)
        assert all(c["w13"]["BK"] == c["w2"]["BK"] == 128 and c["sum_pass"] is True for c in ra)
        assert not any(c["w13"].get("gluon_rega") for c in prior_configs(rows, base, "4bit", (128, 128), quick=True))
    for fmt in ("mxfp4", "int4"):
        space = Space(DIMS, torch.bfloat16, tune.quant_spec(fmt)[1])
        assert [c for c in space.fix_all(prior_configs(1, base, "4bit", None)) if c["w13"].get("gluon_rega")]


def test_fp8_priors_include_the_gluon_decode_gemms():
    # round 37: up to 2 rows per expert stage 1 tries the sm_90 heuristic's fp8 decode form (both Gluon decode GEMMs
    # on 64-row weight tiles, PDL), which no stage-2 toggle reaches from Triton tiles; not in a quick search, not past
    # 2 rows, not for the other families; the fp8 space keeps it
    base = _cfg(64, (64, 128, 4, 4), (64, 128, 4, 4))

    def dec(cands):
        return [c for c in cands if c["w13"].get("gluon_dec") or c["w2"].get("gluon_dec")]
    for rows in (1, 1.5, 2):
        got = dec(prior_configs(rows, base, "fp8", (128, 128)))
        assert len(got) == 1, rows
        c = got[0]
        assert c["BLOCK_M"] == 16 and c["pdl"] is True and c["tma"] is True
        for part in ("w13", "w2"):
            assert {k: c[part][k] for k in ("BN", "BK", "SWAP", "gluon_dec")} == {
                "BN": 64, "BK": 128, "SWAP": 1, "gluon_dec": 1}, (rows, part)
        assert not dec(prior_configs(rows, base, "fp8", (128, 128), quick=True))
    for fam, rows in (("fp8", 2.06), ("fp8", 100), ("4bit", 1), ("bf16", 1)):
        assert not dec(prior_configs(rows, base, fam, (128, 128))), (fam, rows)
    space = Space(DIMS, torch.bfloat16, tune.quant_spec("fp8")[1])
    kept = dec(space.fix_all(prior_configs(1, base, "fp8", None)))
    assert len(kept) == 1 and kept[0]["fp8_acc"] == 128 and kept[0]["pdl"] is True
    # a base with the sum pass or a split w13 (each keeps the plan off a decode GEMM) does not pass them on to it
    for flag in ({"sum_pass": True}, {"w13_split": True}):
        c = dec(prior_configs(1, {**base, **flag, "fp8_acc": 128}, "fp8", (128, 128)))[0]
        assert not any(k in c for k in flag) and c["fp8_acc"] == 128, (flag, c)


def test_fix_config_is_applied_and_duplicates_dropped():
    _, spec = tune.quant_spec("fp8")
    space = Space(DIMS, torch.bfloat16, spec)
    # a w13 BN wider than the block's k becomes the block's k: these two become one candidate
    a = _cfg(64, (256, 64, 4, 4), (64, 64, 4, 4))
    b = _cfg(64, (128, 64, 4, 4), (64, 64, 4, 4))
    got = space.fix_all([a, b, dict(b, tma=False)])
    assert len(got) == 1 and got[0]["w13"]["BN"] == 128 and got[0]["w13"]["BK"] == got[0]["w2"]["BK"] == 128
    # narrower w13 tiles stay (w2's input then quantised by a separate pass)
    assert [c["w13"]["BN"] for c in space.fix_all([_cfg(64, (32, 64, 4, 4), (64, 64, 4, 4))])] == [32]
    # 4-bit: BK fixed (128), stages capped, the TMA flag dropped (packed tiles): duplicates go
    _, spec4 = tune.quant_spec("int4")
    s4 = Space(DIMS, torch.bfloat16, spec4)
    got = s4.fix_all([_cfg(16, (32, 64, 4, 5), (32, 64, 4, 5)), _cfg(16, (32, 256, 4, 3), (32, 32, 4, 3), tma=True)])
    assert len(got) == 1 and got[0]["w13"]["num_stages"] == 3 and "tma" not in got[0]
    assert block_k(got[0]) == (128, 128)


def test_unknown_top_level_keys_are_carried_through():
    _, spec = tune.quant_spec("fp8")
    base = _cfg(64, (128, 128, 4, 4), (128, 128, 4, 4), fp8_acc=64, future_flag=3)
    space = Space(DIMS, torch.bfloat16, spec)
    cands = space.fix_all(prior_configs(1000, base, "fp8", None) + neighbour_configs(base, True, fam="fp8"))
    assert cands and all(c["fp8_acc"] == 64 and c["future_flag"] == 3 for c in cands)
    assert all(c["BLOCK_M"] >= 64 for c in cands)


def test_clamp_and_shared_memory_pruning():
    space = Space((8, 64, 32, 2, True), torch.bfloat16, None, (64, 64))
    got = space.fix(_cfg(16, (256, 64, 4, 3), (256, 64, 4, 3)))
    assert got["w13"]["BN"] == 32 and got["w2"]["BN"] == 64
    big = _cfg(128, (256, 256, 8, 6), (256, 256, 8, 6))
    assert smem_estimate(big, "w13", 2, 2, True) > 232448
    assert Space(DIMS, torch.bfloat16, None, (256, 256)).fix(big) is None


def test_search_stages_and_deadline():
    base = heuristic_config(1, *DIMS[:4], torch.bfloat16)
    fast = []

    def score(cfg):
        fast.append(cfg)
        return 10.0 - cfg["w13"]["BN"] / 64 - 0.1 * bool(cfg.get("tma"))

    compiled = []
    best, times = search(base, 1, Space(DIMS, torch.bfloat16), score, precompile=compiled.append)
    assert len(compiled) in (2, 3) and config_id(fast[0]) == config_id(Space(DIMS, torch.bfloat16).apply(base))
    assert best["w13"]["BN"] >= 128 and len(times) == len(fast) <= 30  # (30: with the gather_pass toggle)
    # a deadline in the past: only the config in use is timed
    clock = iter(range(100)).__next__
    best, times = search(base, 1, Space(DIMS, torch.bfloat16), score, deadline=-1, clock=lambda: clock())
    assert len(times) == 1


class _Spec:
    key, fp8 = "fake", False


def test_tune_point_takes_only_a_checked_faster_winner(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(tune, "precompile", lambda *a, **k: None)
    m = MODELS["qwen3-30b-a3b"].replace(E=4, H=32, I=16, K=2)

    def fake_time(problems, call, cfg, **kw):
        return 100.0 - cfg["w13"]["BN"] / 8 - 10 * bool(cfg.get("tma"))

    monkeypatch.setattr(tune, "time_config", fake_time)
    monkeypatch.setattr(tune_checks, "same_output", lambda *a: True)
    logs = []
    cfg, w, info = tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=logs.append, call=object())
    assert info["best_us"] < info["base_us"] and cfg.get("tma") and len(w) == 4
    monkeypatch.setattr(tune_checks, "same_output", lambda *a: False)
    cfg2, _, info = tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=logs.append, call=object())
    assert info["best_us"] == info["base_us"] and not cfg2.get("tma") and any("FAILED" in s for s in logs)

    # a check that cannot run (round 38: the unswapped reference out of shared memory) keeps the config in use,
    # and says why, instead of ending the whole search
    def raises(*a):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(tune_checks, "same_output", raises)
    logs.clear()
    cfg3, _, info = tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=logs.append, call=object())
    assert info["best_us"] == info["base_us"] and not cfg3.get("tma")
    assert any("FAILED: same_output raised RuntimeError: out of resource" in s for s in logs), logs
    tune_tables.log_summary([("qwen3-30b-a3b", "-", {4: info})], logs.append)
    assert logs[-1].endswith("(0% faster; the best candidate failed same_output)"), logs[-1]


def test_output_checks_name_the_check_that_fails_or_raises(monkeypatch):
    # each check of a winner runs where its switch is stated (swapped tiles: swap_identical, round 38's out-of-memory
    # reference); the first that is false or raises decides, by name, and a raising one never passes
    monkeypatch.setattr(tune_checks, "same_output", lambda *a: True)
    monkeypatch.setattr(tune_checks, "fused_identical", lambda *a: True)
    plain = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    swapped = {**plain, "w2": {**plain["w2"], "SWAP": 1}}
    called = []

    def swap(*a):
        called.append(a[2])
        raise RuntimeError("out of resource: shared memory, Required: 245856")

    monkeypatch.setattr(tune_checks, "swap_identical", swap)
    assert tune_checks.output_checks([], None, plain, plain, 1e-3) == (True, "") and not called
    ok, why = tune_checks.output_checks([], None, swapped, plain, 1e-3)
    assert not ok and why.startswith("swap_identical raised RuntimeError: out of resource") and called == [swapped]
    monkeypatch.setattr(tune_checks, "swap_identical", lambda *a: False)
    assert tune_checks.output_checks([], None, swapped, plain, 1e-3) == (False, "swap_identical")
    monkeypatch.setattr(tune_checks, "fused_identical", lambda *a: False)
    assert tune_checks.output_checks([], None, swapped, plain, 1e-3) == (False, "fused_identical")


def test_merge_entries_keeps_other_shapes_and_buckets(tmp_path):
    path = tmp_path / "NVIDIA_H200.json"
    a, b = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4)), _cfg(32, (64, 128, 4, 4), (64, 128, 4, 4))
    # (shape keys as moekit tune writes them: the reader refuses others since round 65)
    other, k, new = (f"E={e},H=256,I=128,K=2,dtype=bf16,gated=1" for e in (4, 8, 16))
    path.write_text(json.dumps({"device": "NVIDIA H200", "entries": {other: {"1": a}, k: {"1": a, "8": a}}}))
    tune.merge_entries(path, "NVIDIA H200", k, {8: b, 64: b})
    tune.merge_entries(path, "NVIDIA H200", new, {1: a})
    data = json.loads(path.read_text())
    assert data["entries"][other] == {"1": a} and data["entries"][new] == {"1": a}
    assert data["entries"][k] == {"1": a, "8": b, "64": b} and data["device"] == "NVIDIA H200"
    assert [p.name for p in tmp_path.iterdir()] == ["NVIDIA_H200.json"]


def _isolate(tmp_path, monkeypatch, device: str, config_dir=None) -> None:
    """Lookups see only ``config_dir`` (or nothing) and the shipped files; a fake ``device`` with 132 SMs (sm_90)."""
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(config_dir or tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tune, "_device_name", lambda: device)
    monkeypatch.setattr(tune, "_device_traits", lambda: (132, (9, 0)))
    tc.clear_config_cache()


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_run_tune_writes_the_lookup_file_with_progress(tmp_path, monkeypatch, quant):
    """A GPU no folder has a table for: the tuned buckets, and every other bucket of TOKENS filled with the
    heuristic at the shape's BLOCK_K (a lookup runs the nearest bucket: a partial table would run a decode
    tile at T = 16384)."""
    _isolate(tmp_path, monkeypatch, "Fake GPU")
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    seen = []

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, deadline, **kw):
        seen.append((m.name, t, fixed_bk, fixed_arith))
        space = Space((m.E, m.H, m.I, m.K, m.gated), dtype, spec, fixed_bk, fixed_arith)
        cfg = space.apply(heuristic_config(t, m.E, m.H, m.I, m.K, dtype))
        if quant and fixed_arith is None:
            cfg["fp8_acc"] = 96
        return cfg, "w", {"base_us": 10.0, "best_us": 9.0, "timed": 5}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    logs = []
    models = [MODELS["qwen3-30b-a3b"], MODELS["mixtral-8x7b"]]
    path = tune.run_tune([(m, [1, 64, 16384]) for m in models], out=tmp_path, quant=quant, log=logs.append, bar=False)
    assert path == tmp_path / "Fake_GPU.json"
    data = json.loads(path.read_text())
    spec = tune.quant_spec(quant)[1]
    for m in models:
        key = shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, quant=None if spec is None else spec.key)
        table = data["entries"][key]
        assert sorted(table, key=int) == [str(t) for t in TOKENS]
        assert len({(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()}) == 1
        if quant:
            assert {c["fp8_acc"] for c in table.values()} == {96}
    assert sum("not tuned, written with the heuristic" in s for s in logs) == 2
    assert [t for _, t, _, _ in seen[:3]] == [16384, 1, 64] and seen[0][2] is None and seen[1][2] is not None
    lines = [s for s in logs if s.startswith("  [")]
    assert len(lines) == 6 and "[3/3]" in lines[2] and "elapsed" in lines[0] and "ETA" in lines[0]
    assert any(s.startswith("summary qwen3-30b-a3b") for s in logs)


def test_run_tune_starts_from_the_table_in_use(tmp_path, monkeypatch):
    """A shape the shipped file has: the out file (here the folder lookups search first) starts as a copy of
    that table (whole), its BLOCK_K binds every tuned bucket, and each search starts from what lookups gave
    before the run, never from a bucket the run just wrote (T = 12000 is nearest the T = 16384 bucket)."""
    _isolate(tmp_path, monkeypatch, "NVIDIA H200", config_dir=tmp_path)
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    m = MODELS["qwen3-30b-a3b"]
    key = shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated)
    shipped = tc.shape_table("NVIDIA H200", key)[1]
    assert shipped, "the H200 file ships a Qwen3-30B-A3B table"
    shipped_bk = shape_block_k(shipped)
    seen = []

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, before, **kw):
        seen.append((t, fixed_bk))
        space, base = tune.config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith)
        assert "TAG" not in base, (t, base)  # never a bucket this run wrote
        return dict(base, TAG=t), "w", {"base_us": 10.0, "best_us": 9.0, "timed": 5}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    monkeypatch.setattr(tc, "check_config", lambda cfg, where: None)  # the TAG key (the out file is read back)
    logs = []
    path = tune.run_tune([(m, [1, 12000, 16384])], out=tmp_path, log=logs.append, bar=False)
    table = json.loads(path.read_text())["entries"][key]
    assert sorted(table, key=int) == sorted({*shipped, "12000"}, key=int)
    assert table["1"]["TAG"] == 1 and table["12000"]["TAG"] == 12000 and table["16384"]["TAG"] == 16384
    assert {b: c for b, c in table.items() if b not in ("1", "12000", "16384")} == \
        {b: c for b, c in shipped.items() if b not in ("1", "16384")}
    assert [t for t, _ in seen] == [16384, 1, 12000] and all(bk == shipped_bk for _, bk in seen)
    assert any("starts from the table in use" in s for s in logs)


def test_run_tune_tunes_anew_a_shipped_table_that_mixes_block_k(tmp_path, monkeypatch):
    """Round 51: the shipped H100 file predates the one-BLOCK_K rule (its bf16 tables mix 64 and 128); tuning one of
    those shapes on an H100 skipped it and still said "wrote <file>". It is tuned anew now: the largest bucket fixes
    BLOCK_K, the out table is whole at that BLOCK_K (not a copy of the mixed one). A table of the out file itself that
    mixes BLOCK_K is the user's: still skipped, and a run that tuned nothing says so."""
    _isolate(tmp_path, monkeypatch, "NVIDIA H100 80GB HBM3", config_dir=tmp_path)
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    m = MODELS["qwen3-30b-a3b"]
    key = shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated)
    shipped = tc.shape_table("NVIDIA H100 80GB HBM3", key)[1]
    with pytest.raises(ValueError, match="different BLOCK_K"):
        shape_block_k(shipped)  # (the case: the shipped table mixes BLOCK_K)
    seen = []

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, before, **kw):
        seen.append((t, fixed_bk))
        return tune.config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith)[1], "w", \
            {"base_us": 10.0, "best_us": 9.0, "timed": 5}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    logs = []
    path = tune.run_tune([(m, [1, 16384])], out=tmp_path, log=logs.append, bar=False)
    table = json.loads(path.read_text())["entries"][key]
    assert sorted(table, key=int) == [str(t) for t in TOKENS]
    assert len({(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()}) == 1
    assert [t for t, _ in seen] == [16384, 1] and seen[0][1] is None and seen[1][1] is not None
    assert any("tuning the shape anew" in s for s in logs) and logs[-1] == f"wrote {path}"
    # the out file's own mixed table: skipped, nothing tuned, and the log says the file was not written
    data = json.loads(path.read_text())
    data["entries"][key]["1"]["w13"]["BK"] = 16 if data["entries"][key]["1"]["w13"]["BK"] != 16 else 32
    path.write_text(json.dumps(data))
    tc.clear_config_cache()
    logs.clear()
    tune.run_tune([(m, [1])], out=tmp_path, log=logs.append, bar=False)
    assert any(s.startswith("skipping qwen3-30b-a3b") for s in logs) and logs[-1].startswith("nothing tuned")


def test_run_tune_force_block_k(tmp_path, monkeypatch):
    """Round 51: ``force_block_k`` (``moekit tune --block-k``) fixes every bucket's BLOCK_K of an unquantised shape
    instead of the largest bucket's pick (which cost 2-4 % at decode on an H100). A new shape: all buckets at it; a
    shipped table at another BLOCK_K: tuned anew; the out file's own table at another: skipped; quantised: refused."""
    _isolate(tmp_path, monkeypatch, "NVIDIA H200", config_dir=tmp_path)
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    seen = []

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, before, **kw):
        seen.append((m.name, t, fixed_bk))
        return tune.config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith)[1], "w", \
            {"base_us": 10.0, "best_us": 9.0, "timed": 5}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    m = MODELS["qwen3-30b-a3b"]
    key = shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated)
    shipped_bk = shape_block_k(tc.shape_table("NVIDIA H200", key)[1])
    other = 64 if shipped_bk == (128, 128) else 128
    custom = ModelShape("custom", E=16, K=2, H=256, I=128)  # no table anywhere
    logs = []
    path = tune.run_tune([(m, [1, 16384]), (custom, [1, 16384])], out=tmp_path, log=logs.append, bar=False,
                         force_block_k=other)
    data = json.loads(path.read_text())["entries"]
    ckey = shape_key(16, 256, 128, 2, torch.bfloat16, True)
    for k in (key, ckey):
        assert sorted(data[k], key=int) == [str(t) for t in TOKENS]  # whole tables
        assert {(c["w13"]["BK"], c["w2"]["BK"]) for c in data[k].values()} == {(other, other)}
    assert all(bk == (other, other) for _, _, bk in seen)
    assert any("tuning the shape anew at" in s for s in logs)
    # every written config fits (round 51's review: shipped BK-64 tiles at BK 128 overflowed shared memory, and a
    # bucket past the budget kept them); a tiny budget writes every bucket from config_in_use / fill_missing
    space = Space((m.E, m.H, m.I, m.K, m.gated), torch.bfloat16, None, (other, other), None)
    assert all(space.refusal(c) is None for c in data[key].values()), \
        {b: space.refusal(c) for b, c in data[key].items() if space.refusal(c)}
    (tmp_path / "NVIDIA_H200.json").unlink()
    tc.clear_config_cache()
    path = tune.run_tune([(m, [1, 2048, 4096, 16384])], out=tmp_path, log=logs.append, bar=False, force_block_k=128,
                         budget_s=1e-9)
    table = json.loads(path.read_text())["entries"][key]
    space = Space((m.E, m.H, m.I, m.K, m.gated), torch.bfloat16, None, (128, 128), None)
    assert {(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()} == {(128, 128)}
    assert all(space.refusal(c) is None for c in table.values()), \
        {b: space.refusal(c) for b, c in table.items() if space.refusal(c)}
    logs.clear()  # the out file now holds the shape at `other`: asking for the shipped BLOCK_K skips it
    tune.run_tune([(m, [1])], out=tmp_path, log=logs.append, bar=False, force_block_k=shipped_bk[0])
    assert any(s.startswith("skipping qwen3-30b-a3b") and "remove the shape's entries" in s for s in logs)
    with pytest.raises(ValueError, match="force_block_k"):
        tune.run_tune([(m, [1])], out=tmp_path, log=logs.append, bar=False, quant="fp8", force_block_k=128)
    with pytest.raises(ValueError, match="force_block_k"):
        tune.run_tune([(m, [1])], out=tmp_path, log=logs.append, bar=False, force_block_k=96)


def test_pick_block_k_geometric_mean_over_common_buckets():
    """``--block-k auto`` keeps the BLOCK_K whose tuned buckets are faster in geometric mean relative to the fastest
    run per bucket; buckets one run left untimed (NaN) are left out; a tie or nothing common: the first candidate."""
    nan = float("nan")
    runs = {128: {1: {"best_us": 50.0}, 64: {"best_us": 400.0}, 16384: {"best_us": 1100.0}},
            64: {1: {"best_us": 52.0}, 64: {"best_us": 410.0}, 16384: {"best_us": 1000.0}}}
    bk, why = tune_auto.pick_block_k(runs)  # 128: (1, 1, 1.1)^(1/3) = 1.032 vs 64: (1.04, 1.025, 1)^(1/3) = 1.022
    assert bk == 64 and "T=16384: 1100.0 / 1000.0" in why and "128: 1.032" in why and "64: 1.022" in why
    runs[64][1]["best_us"] = 60.0  # decode 20 % slower at 64: 128 wins
    assert tune_auto.pick_block_k(runs)[0] == 128
    runs[128][16384]["best_us"] = nan  # past 128's budget: left out, the other two buckets decide
    bk, why = tune_auto.pick_block_k(runs)
    assert bk == 128 and "T=16384" not in why
    same = {64: {1: {"best_us": 5.0}}, 128: {1: {"best_us": 5.0}}}
    assert tune_auto.pick_block_k(same)[0] == 64  # a tie: the first candidate (the largest bucket's heuristic BK)
    assert tune_auto.pick_block_k({128: {1: {"best_us": nan}}, 64: {1: {"best_us": 3.0}}})[0] == 128


def test_run_tune_block_k_auto(tmp_path, monkeypatch):
    """``run_tune_auto`` (``moekit tune --block-k auto``): a new bf16 shape tuned once per BLOCK_K the heuristic uses
    (128 at decode tiles, 64 above), each with half the budget, and the faster table (geometric mean) merged whole at
    one BLOCK_K; a shape the out file holds is skipped; quantised refused."""
    _isolate(tmp_path, monkeypatch, "Fake GPU", config_dir=tmp_path)
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    seen = []
    fast = {"bk": 128}

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, before, **kw):
        seen.append((t, fixed_bk))
        us = 10.0 if fixed_bk[0] == fast["bk"] else 11.0
        return tune.config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith)[1], "w", \
            {"base_us": 12.0, "best_us": us, "timed": 5}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    custom = ModelShape("custom", E=16, K=2, H=256, I=128)
    assert tune_auto.block_k_candidates(custom, torch.bfloat16, [1, 16384]) == [64, 128]
    logs = []
    path = tune_auto.run_tune_auto([(custom, [1, 16384])], out=tmp_path, log=logs.append, bar=False, budget_s=100.0)
    key = shape_key(16, 256, 128, 2, torch.bfloat16, True)
    table = json.loads(path.read_text())["entries"][key]
    assert sorted(table, key=int) == [str(t) for t in TOKENS]
    assert {(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()} == {(128, 128)}
    assert sorted(seen) == sorted([(16384, (64, 64)), (1, (64, 64)), (16384, (128, 128)), (1, (128, 128))])
    assert any("BLOCK_K 128 kept" in s for s in logs) and any("50 s each" in s for s in logs)
    assert logs[-1] == f"wrote {path}"
    logs.clear()  # the out file holds the shape now: skipped (its BLOCK_K binds)
    tune_auto.run_tune_auto([(custom, [1])], out=tmp_path, log=logs.append, bar=False)
    assert any(s.startswith("skipping custom") for s in logs) and logs[-1].startswith("nothing tuned")
    path.unlink()
    tc.clear_config_cache()
    fast["bk"] = 64
    tune_auto.run_tune_auto([(custom, [1, 16384])], out=tmp_path, log=logs.append, bar=False)
    table = json.loads(path.read_text())["entries"][key]
    assert {(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()} == {(64, 64)}
    with pytest.raises(ValueError, match="auto"):
        tune_auto.run_tune_auto([(custom, [1])], out=tmp_path, log=logs.append, bar=False, quant="fp8")


def test_run_tune_budget_spent_keeps_the_config_in_use(tmp_path, monkeypatch):
    _isolate(tmp_path, monkeypatch, "Fake GPU")
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))
    clock = [0.0]
    monkeypatch.setattr(tune.time, "time", lambda: clock[0])

    def slow_point(m, t, dtype, device, *, deadline, fixed_bk, **kw):
        assert deadline <= 10.0
        clock[0] += 20.0  # overran the whole budget
        cfg = Space((m.E, m.H, m.I, m.K, m.gated), dtype, None, fixed_bk).apply(
            heuristic_config(t, m.E, m.H, m.I, m.K, dtype))
        return cfg, "w", {"base_us": 1.0, "best_us": 1.0, "timed": 1}

    monkeypatch.setattr(tune, "tune_point", slow_point)
    logs = []
    path = tune.run_tune([(MODELS["qwen3-30b-a3b"], [1, 8, 16384])], out=tmp_path, budget_s=10, log=logs.append,
                         bar=False)
    table = next(iter(json.loads(path.read_text())["entries"].values()))
    assert sorted(table, key=int) == [str(t) for t in TOKENS]
    assert len({(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()}) == 1
    assert sum("budget spent" in s for s in logs) == 2 and any("untuned" in s for s in logs)


def test_progress_eta():
    clock = [0.0]
    logs = []
    p = tune.Progress("x", 4, logs.append, budget_s=100, bar=False, clock=lambda: clock[0])
    clock[0] = 10.0
    p.step(1, "ok")
    assert "[1/4]" in logs[0] and "elapsed 10 s" in logs[0] and "ETA 30 s" in logs[0]
    clock[0] = 95.0
    p.step(8, "ok")
    assert "ETA 5 s" in logs[1]
    p.close()


def test_a_split_winner_must_match_the_fused_tiles_bit_for_bit():
    """``fused_identical`` compares a ``w13_split`` config with the same config without the key, and a stated
    ``sum_pass`` with the same config with the other word."""
    seen = []

    def call(pr, cfg):
        seen.append(cfg)
        return torch.full((2,), 1.0 + (0.5 if cfg.get("w13_split") and pr == "odd" else 0.0))

    cfg = _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3), w13_split=True)
    assert tune_checks.fused_identical(["even"], call, cfg)
    assert not tune_checks.fused_identical(["even", "odd"], call, cfg)
    assert any("w13_split" not in c for c in seen)
    # a sum-pass winner (either word) against the other path, never against itself
    seen.clear()
    off = _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3), sum_pass=False)
    assert tune_checks.fused_identical(["odd"], lambda pr, c: seen.append(c) or torch.ones(2), off)
    assert seen[-1] == {**off, "sum_pass": True}
    # neither switch stated: nothing to compare, no call
    assert tune_checks.fused_identical(["odd"], lambda pr, c: 1 / 0, _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3)))
    on = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4), sum_pass=True)
    assert not tune_checks.fused_identical(["odd"], lambda pr, c: torch.full((2,), 2.0 if c["sum_pass"] else 1.0), on)
    # a Gluon winner against the same tiles on the Triton GEMMs (both kernel dicts without the key)
    seen.clear()
    gl = tune_forms.gluon_toggled(_cfg(64, (64, 128, 4, 4), (128, 128, 4, 4)))
    assert gl["w13"]["gluon"] == gl["w2"]["gluon"] == 1
    assert tune_checks.fused_identical(["odd"], lambda pr, c: seen.append(c) or torch.ones(2), gl)
    assert seen[-1] == tune_forms.gluon_toggled(gl) and "gluon" not in seen[-1]["w2"]
    assert not tune_checks.fused_identical(["odd"], lambda pr, c: torch.full((2,), 2.0 if c["w2"].get("gluon") else 1.0), gl)
    # a register-operand 4-bit winner: the reference has no gluon key at all (the Triton GEMMs)
    seen.clear()
    ra = tune_forms.rega_toggled(_cfg(16, (64, 128, 4, 3), (64, 128, 4, 3)))
    assert tune_checks.fused_identical(["odd"], lambda pr, c: seen.append(c) or torch.ones(2), ra)
    assert not any(k.startswith("gluon") for c in seen[1:] for part in ("w13", "w2") for k in c[part])


def test_fp8_neighbours_halve_and_double_the_gluon_w2_column_tiles():
    # a Gluon w2 winner: gluon_nt 2 -> 1 and 4; 8 -> 4 only (at most 8); no Gluon: no gluon_nt candidate; toggling
    # Gluon off drops the key with it
    gl = tune_forms.gluon_toggled(_cfg(64, (64, 128, 4, 4), (128, 128, 4, 4)))
    for nt, want in ((None, {2}), (2, {1, 4}), (8, {4})):
        best = gl if nt is None else {**gl, "w2": {**gl["w2"], "gluon_nt": nt}}
        got = {c["w2"].get("gluon_nt", 1) for c in neighbour_configs(best, False, quick=True, fam="fp8")
               if c["w2"].get("gluon")} - {nt or 1}
        assert got == want, (nt, got)
        assert "gluon_nt" not in tune_forms.gluon_toggled(best)["w2"]
    plain = _cfg(64, (64, 128, 4, 4), (128, 128, 4, 4))
    assert not any("gluon_nt" in c["w2"] for c in neighbour_configs(plain, False, fam="fp8"))


def test_fp8_neighbours_toggle_the_gluon_w13_forms():
    # a Gluon w13 winner: one neighbour each with gate | up stacked into one wgmma ("gluon_stack") and with the
    # warp-specialised w13 ("gluon_ws" 2: two consumers; at BLOCK_M 128 on one tile), and back; without the Gluon
    # w13 neither is offered (the keys mean nothing to the Triton kernel)
    gl = tune_forms.gluon_toggled(_cfg(128, (64, 128, 8, 4), (128, 128, 8, 4)))
    got = [c["w13"] for c in neighbour_configs(gl, False, quick=True, fam="fp8")]
    assert {**gl["w13"], "gluon_stack": 1} in got and {**gl["w13"], "gluon_ws": 2} in got
    on = {**gl, "w13": {**gl["w13"], "gluon_stack": 1, "gluon_ws": 2}}
    got = [c["w13"] for c in neighbour_configs(on, False, quick=True, fam="fp8")]
    assert {**on["w13"], "gluon_stack": 0} in got and {**on["w13"], "gluon_ws": 0} in got
    plain = _cfg(64, (64, 128, 4, 4), (128, 128, 4, 4))
    assert not any({"gluon_stack", "gluon_ws"} & set(c["w13"]) for c in neighbour_configs(plain, False, fam="fp8"))


def test_fp8_neighbours_toggle_the_gluon_decode_w2():
    # a swapped fp8 winner (a decode bucket): one neighbour asks for the Gluon decode w2 ("gluon_dec"), and back;
    # an unswapped winner gets none (the key means nothing to its kernels)
    sw = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 3))
    sw = {**sw, "w13": {**sw["w13"], "SWAP": 1}, "w2": {**sw["w2"], "SWAP": 1}}
    got = [c["w2"] for c in neighbour_configs(sw, False, quick=True, fam="fp8")]
    assert {**sw["w2"], "gluon_dec": 1} in got
    on = {**sw, "w2": {**sw["w2"], "gluon_dec": 1}}
    got_on = [c["w2"] for c in neighbour_configs(on, False, quick=True, fam="fp8")]
    assert {**sw["w2"], "gluon_dec": 0} in got_on
    # with it on, its column tiles per program doubled (round 30: fewer, longer programs); from 2: halved and doubled
    assert {**on["w2"], "gluon_nt": 2} in got_on
    two = {**on, "w2": {**on["w2"], "gluon_nt": 2}}
    got_two = [c["w2"] for c in neighbour_configs(two, False, quick=True, fam="fp8")]
    assert {**on["w2"], "gluon_nt": 1} in got_two and {**on["w2"], "gluon_nt": 4} in got_two
    # the other form (round 31: warp-specialised, "gluon_dec" 2, one column tile per program: gluon_nt dropped), and
    # back; no column-tile neighbours around it
    assert {**on["w2"], "gluon_dec": 2} in got_on and {**on["w2"], "gluon_dec": 2} in got_two
    ws = {**sw, "w2": {**sw["w2"], "gluon_dec": 2}}
    got_ws = [c["w2"] for c in neighbour_configs(ws, False, quick=True, fam="fp8")]
    assert {**sw["w2"], "gluon_dec": 1} in got_ws and {**sw["w2"], "gluon_dec": 0} in got_ws
    assert not any("gluon_nt" in c for c in got_ws)
    # and PDL toggled around a decode-w2 winner even when not asked for (on, and back off), not around the others
    assert any(c.get("pdl") for c in neighbour_configs(on, False, quick=True, fam="fp8"))
    back = neighbour_configs({**on, "pdl": True}, False, quick=True, fam="fp8")
    assert any(c.get("pdl") is False and c["w2"] == on["w2"] for c in back)
    assert not any(c.get("pdl") for c in neighbour_configs(sw, False, quick=True, fam="fp8"))
    plain = _cfg(64, (64, 128, 4, 4), (128, 128, 4, 4))
    assert not any("gluon_dec" in c["w2"] for c in neighbour_configs(plain, False, fam="fp8"))


def test_fp8_neighbours_toggle_the_gluon_decode_w13():
    # a swapped fp8 winner: one neighbour asks for the Gluon decode w13 (w13 "gluon_dec", round 32), and back; PDL is
    # toggled around a decode-w13 winner even when not asked for (its first weight tiles come before its grid wait);
    # an unswapped winner gets neither (the key means nothing to its kernels)
    sw = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 3))
    sw = {**sw, "w13": {**sw["w13"], "SWAP": 1}, "w2": {**sw["w2"], "SWAP": 1}}
    assert {**sw["w13"], "gluon_dec": 1} in [c["w13"] for c in neighbour_configs(sw, False, quick=True, fam="fp8")]
    on = {**sw, "w13": {**sw["w13"], "gluon_dec": 1}}
    got_on = neighbour_configs(on, False, quick=True, fam="fp8")
    assert {**sw["w13"], "gluon_dec": 0} in [c["w13"] for c in got_on]
    assert any(c.get("pdl") and c["w13"] == on["w13"] for c in got_on)
    plain = _cfg(64, (64, 128, 4, 4), (128, 128, 4, 4))
    assert not any("gluon_dec" in c["w13"] for c in neighbour_configs(plain, False, fam="fp8"))


def test_4bit_neighbours_toggle_the_register_operand_gluon_gemms():
    # a swapped 4-bit winner: one neighbour asks for the register-operand Gluon GEMMs on both (with the sum pass
    # and the fused w13 they need); toggling that back gives the winner's tiles without any gluon key; unswapped
    # or non-4-bit winners get no such neighbour
    sw = _cfg(16, (64, 128, 4, 3), (64, 128, 4, 3), w13_split=True)
    sw["w13"]["SWAP"] = sw["w2"]["SWAP"] = 1
    ra = [c for c in neighbour_configs(sw, False, quick=True, fam="4bit") if c["w13"].get("gluon_rega")]
    assert len(ra) == 1 and ra[0]["w2"]["gluon_rega"] == ra[0]["w2"]["gluon"] == 1
    assert ra[0]["sum_pass"] is True and ra[0]["w13_split"] is False
    assert {k: v for k, v in ra[0]["w13"].items() if not k.startswith("gluon")} == sw["w13"]
    back = tune_forms.rega_toggled(ra[0])
    assert back["w13"] == sw["w13"] and back["w2"] == sw["w2"]
    # a register-operand winner: one neighbour runs its w13 gate, then up ("gluon_rega" 2: one fragment live), and
    # from there one goes back to 1; w2 (one fragment) keeps 1
    ser = [c for c in neighbour_configs(ra[0], False, quick=True, fam="4bit") if c["w13"].get("gluon_rega") == 2]
    assert len(ser) == 1 and ser[0]["w2"] == ra[0]["w2"]
    assert {**ser[0]["w13"], "gluon_rega": 1} == ra[0]["w13"]
    assert [c for c in neighbour_configs(ser[0], False, quick=True, fam="4bit")
            if c["w13"].get("gluon_rega") == 1 and c["w2"] == ser[0]["w2"] and c["BLOCK_M"] == 16]
    # and one refills both GEMMs' rings a step earlier ("gluon_early", round 20), from which one goes back
    ear = [c for c in neighbour_configs(ra[0], False, quick=True, fam="4bit") if c["w13"].get("gluon_early")]
    assert len(ear) == 1 and ear[0]["w2"]["gluon_early"] == 1
    assert {**ear[0]["w13"], "gluon_early": 0} == {**ra[0]["w13"], "gluon_early": 0}
    back = [c for c in neighbour_configs(ear[0], False, quick=True, fam="4bit")
            if c["w13"].get("gluon_early") == 0 and c["w2"].get("gluon_early") == 0]
    assert len(back) == 1 and back[0]["BLOCK_M"] == ear[0]["BLOCK_M"]
    plain = _cfg(64, (64, 128, 4, 3), (128, 128, 4, 3))
    assert not any(c["w13"].get("gluon_rega") for c in neighbour_configs(plain, False, fam="4bit"))
    assert not any(c["w13"].get("gluon_rega") for c in neighbour_configs(sw, False, fam="fp8"))


def test_a_swapped_winner_must_match_the_unswapped_tiles_bit_for_bit():
    """``swap_identical`` compares a swapped config with the same tiles unswapped at BLOCK_M >= 64."""
    seen = []

    def call(pr, cfg):
        seen.append(cfg)
        return torch.full((2,), 1.0 + (0.5 if cfg["w2"].get("SWAP") and pr == "odd" else 0.0))

    cfg = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    cfg["w13"]["SWAP"] = cfg["w2"]["SWAP"] = 1
    assert tune_checks.swap_identical(["even"], call, cfg)
    assert not tune_checks.swap_identical(["even", "odd"], call, cfg)
    plain = [c for c in seen if not c["w2"].get("SWAP")]
    assert plain and all(c["BLOCK_M"] == 64 and "SWAP" not in c["w13"] for c in plain)
    assert all(c[p]["num_stages"] == 3 for c in plain for p in ("w13", "w2"))  # the winner's 4, capped
    # the reference keeps at most 3 ring stages (a deep swapped ring at 64 rows may not fit in shared memory; the
    # depth changes no bit), and the winner's own dicts are not touched
    deep = _cfg(16, (128, 128, 8, 6), (64, 128, 4, 2))
    ref = tune_checks.unswapped(deep)
    assert (ref["w13"]["num_stages"], ref["w2"]["num_stages"]) == (3, 2) and deep["w13"]["num_stages"] == 6
    # and the bucket's config in use: a 16-row decode tile whose bits differ fails the check
    base = _cfg(16, (32, 128, 4, 4), (64, 128, 4, 4))

    def call2(pr, c):
        return torch.full((2,), 2.0 if c is base else 1.0)

    assert tune_checks.swap_identical(["even"], call2, cfg) and not tune_checks.swap_identical(["even"], call2, cfg, base)


def test_swapped_fp8_neighbours_vary_block_m_below_64():
    """A swapped fp8 winner (weights on wgmma's 64-row side) may move to BLOCK_M 32; unswapped fp8 may not."""
    best = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4), tma=True)
    best["w13"]["SWAP"] = best["w2"]["SWAP"] = 1
    assert 32 in {c["BLOCK_M"] for c in neighbour_configs(best, False, fam="fp8")}
    plain = _cfg(64, (64, 128, 4, 4), (64, 128, 4, 4), tma=True)
    assert min(c["BLOCK_M"] for c in neighbour_configs(plain, False, fam="fp8")) == 64


def test_fill_never_writes_a_config_the_space_refuses(tmp_path):
    """An output table already at BLOCK_K 128 for a shape whose table in use has 64 (an older run): the fill
    skips the table-in-use's entries (another BLOCK_K) and every config it writes fits (shared memory) and
    keeps the shape's BLOCK_K."""
    from moekit.benchmarking.tune_tables import fill_missing

    m = MODELS["deepseek-v3"]
    key = shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated)
    shipped = tc.shape_table("NVIDIA H200", key)[1]
    assert shape_block_k(shipped) == (64, 64)
    path = tmp_path / "NVIDIA_H200.json"
    tuned = _cfg(16, (64, 128, 4, 4), (64, 128, 4, 4))
    tune.merge_entries(path, "NVIDIA H200", key, {8: tuned})
    fill = fill_missing(m, torch.bfloat16, None, path, key, shipped, (128, 128), {"fp8_acc": None})
    assert sorted(fill) == [t for t in TOKENS if t != 8]
    space = Space((m.E, m.H, m.I, m.K, m.gated), torch.bfloat16, None, (128, 128), {"fp8_acc": None})
    for t, cfg in fill.items():
        assert space.refusal(cfg) is None and block_k(cfg) == (128, 128), (t, cfg)


def test_neighbours_toggle_tail_blocks_where_the_tiles_take_them():
    # unswapped Triton tiles at BLOCK_M 128: tail blocks of 32 and 64 rows (fp8 wgmma: 64 only), and back to none;
    # Gluon tiles get none, nor BLOCK_M 32 (a tail block is shorter than BLOCK_M, and 32 rows is the shortest tried)
    big = _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3))
    assert {c.get("tail_bm", 0) for c in neighbour_configs(big, False, quick=True)} == {0, 32, 64}
    assert {c.get("tail_bm", 0) for c in neighbour_configs(big, False, quick=True, fam="fp8")} == {0, 64}
    on = {**big, "tail_bm": 32}
    assert {c.get("tail_bm", 0) for c in neighbour_configs(on, False)} == {0, 32, 64}
    assert all("tail_bm" not in c for c in neighbour_configs(_cfg(32, (64, 64, 4, 4), (64, 64, 4, 4)), False))
    gl = tune_forms.gluon_toggled({**big, "tail_bm": 64})
    assert all("tail_bm" not in c for c in neighbour_configs(gl, False, fam="fp8") if c["w2"].get("gluon"))
    # the BLOCK_M halving of a tail-64 winner drops the key (64 is not below 64)
    assert all("tail_bm" not in c for c in neighbour_configs({**big, "tail_bm": 64}, False) if c["BLOCK_M"] == 64)
    assert config_id({**big, "tail_bm": 0}) == config_id(big)


def test_a_tail_winner_must_match_the_same_tiles_without_tail_blocks():
    seen = []
    cfg = _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3), tail_bm=32)
    assert tune_checks.fused_identical(["odd"], lambda pr, c: seen.append(c) or torch.ones(2), cfg)
    assert "tail_bm" not in seen[-1] and seen[-1]["BLOCK_M"] == 128
    assert not tune_checks.fused_identical(["odd"], lambda pr, c: torch.full((2,), 2.0 if c.get("tail_bm") else 1.0), cfg)


def test_neighbours_toggle_the_gather_pass_of_unquantised_tma_tiles():
    # bf16 tiles with "tma": the pass on, and off again around a winner that has it; never for fp8 / 4-bit or
    # swapped / pointer-loaded w13 tiles (the launch plan would not run it)
    big = _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3), tma=True)
    assert {c.get("gather_pass", False) for c in neighbour_configs(big, False, quick=True)} == {False, True}
    on = {**big, "gather_pass": True}
    assert {c.get("gather_pass") for c in neighbour_configs(on, False)} == {True, False}
    assert all(not c.get("gather_pass") for c in neighbour_configs(big, False, fam="fp8"))
    assert all(not c.get("gather_pass") for c in neighbour_configs({**big, "tma": False}, False) if not c.get("tma"))
    dec = swap_tiles(_cfg(16, (64, 128, 4, 4), (64, 128, 4, 4), tma=True), 1)
    assert all(not c.get("gather_pass") for c in neighbour_configs(dec, False))
    assert config_id({**big, "gather_pass": False}) == config_id(big)


def test_a_gather_pass_winner_must_match_the_same_tiles_without_it():
    seen = []
    cfg = _cfg(128, (128, 64, 8, 4), (256, 64, 8, 3), tma=True, gather_pass=True)
    assert tune_checks.fused_identical(["odd"], lambda pr, c: seen.append(c) or torch.ones(2), cfg)
    assert "gather_pass" not in seen[-1] and seen[-1]["tma"]
    assert not tune_checks.fused_identical(["odd"], lambda pr, c: torch.full((2,), 2.0 if c.get("gather_pass") else 1.0),
                                    cfg)


def test_priors_keep_the_base_tail_blocks_only_where_their_tiles_take_them():
    # Mixtral's bf16 bucket 1024 runs BLOCK_M 128 with 64-row tail blocks; a BLOCK_M 64 prior carrying "tail_bm": 64
    # is refused by the launch plan (a tail block must be shorter), so the search lost those priors (round 43)
    base = _cfg(128, (128, 64, 8, 4), (128, 64, 8, 4), tma=True, tail_bm=64, gather_pass=True)
    priors = prior_configs(256, base, "bf16", (64, 64))
    assert {c["BLOCK_M"] for c in priors} >= {64, 128}
    for c in priors:
        assert c.get("tail_bm", 0) < c["BLOCK_M"], c
        assert c.get("gather_pass"), c  # the other carried keys stay
    assert any(c.get("tail_bm") == 64 for c in priors if c["BLOCK_M"] == 128)


def test_priors_of_a_base_that_already_splits_w13():
    # round 53's review: a config in use with "w13_split" (a winner an earlier tune kept) at a medium / large bucket
    # gave _cfg two w13_split values (TypeError): a second `moekit tune` of that shape crashed
    base = dict(ts.prior_configs(50000.0, {}, "bf16", (64, 64))[0], w13_split=True)
    for fam in ("bf16", "fp8"):
        priors = ts.prior_configs(50000.0, base, fam, (64, 64))
        assert any(c.get("w13_split") for c in priors)
