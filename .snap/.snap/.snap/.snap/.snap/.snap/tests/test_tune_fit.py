"""``moekit tune`` where the config in use does not fit at the shape's BLOCK_K (round 57, an H100: ``--block-k auto``
on gpt-oss-20b stopped at T = 16384 with Triton's OutOfResources — the heuristic's tile at BLOCK_K 128 needed 294 KB).

The shared-memory estimate against Triton's own sm_90 compiles (a ring of ``num_stages`` tiles under wgmma,
``num_stages - 1`` under mma.sync), a start made to fit (:meth:`Space.fit`), a bucket whose start cannot run (the
fastest candidate that ran, checked against the twin; an error naming the bucket where none ran), and ``--block-k
auto`` leaving out a BLOCK_K none of whose tiles ran."""

import json

import pytest
import torch

from compile_check import run_compiled
from moekit.benchmarking import tune, tune_auto, tune_checks, tune_tables
from moekit.benchmarking.shapes import EXTRA_MODELS, MODELS, ModelShape
from moekit.benchmarking.tune_space import SMEM_BYTES, Space, _cfg, config_id, smem_estimate
from moekit.ops.triton_configs import shape_key

OSS20 = (32, 2880, 2880, 4, True)  # gpt-oss-20b (E, H, I, K, gated)

# (config, which GEMM, elt, w_elt, shared bytes of Triton 3.6's sm_90 compile): measured on CPU this round
MEASURED = [
    (_cfg(128, (128, 128, 8, 3), (256, 128, 8, 3), tma=True), "w13", 2, 2, 294968),  # the H100 failure: 3 stages
    (_cfg(128, (128, 128, 8, 3), (256, 128, 8, 3)), "w2", 2, 2, 294912),  # w2 BN 256, no TMA: the same ring
    (_cfg(64, (64, 64, 8, 2), (64, 64, 8, 2)), "w13", 2, 2, 49152),  # wgmma at BLOCK_M 64: two tiles for 2 stages
    (_cfg(32, (64, 256, 4, 3), (64, 256, 4, 3)), "w13", 2, 2, 163840),  # mma.sync at BLOCK_M 32: stages - 1
    (_cfg(16, (64, 128, 4, 3), (64, 128, 4, 3)), "w13", 2, 2, 147456 // 2),  # BLOCK_M 16 (mma.sync), BN 64 BK 128
    ({**_cfg(16, (64, 128, 4, 3), (64, 128, 4, 3)), "w13": {"BN": 64, "BK": 128, "GROUP_M": 8, "num_warps": 4,
                                                            "num_stages": 3, "SWAP": 1}}, "w13", 2, 2, 110592),
    (_cfg(64, (128, 128, 4, 2), (128, 128, 4, 2)), "w13", 1, 1, 82432),  # fp8 block: a little scale memory more
    (_cfg(128, (128, 64, 8, 3), (128, 64, 8, 3), tma=True), "w13", 4, 4, 196608),  # fp32: FMA dots, stages - 1
]


@pytest.mark.parametrize("cfg,which,elt,w_elt,real", MEASURED)
def test_smem_estimate_matches_the_compiled_kernels(cfg, which, elt, w_elt, real):
    # never above what the compiler allocates (a tile that fits is never refused), and within 1 KiB of it for the
    # bf16 / fp8 GEMMs (the ring's own bytes; 4-bit adds scales and staging: a lower bound there)
    est = smem_estimate(cfg, which, elt, w_elt, True)
    assert real - 1024 <= est <= real


def test_smem_estimate_against_the_sm90_compiler(tmp_path):
    # the same rule against Triton's real compiler (no GPU): a change of Triton's pipeliner shows up here
    run_compiled("""
import torch
import compile_sm90 as c
from moekit.benchmarking.tune_space import _cfg, smem_estimate
shape = (8, 2, 512, 256, "silu", False)
compared = 0
for dt, cfg in ((torch.bfloat16, _cfg(128, (128, 128, 8, 3), (128, 128, 8, 2), tma=True)),
                (torch.bfloat16, _cfg(32, (64, 128, 4, 3), (64, 128, 4, 3))),
                (torch.float16, _cfg(64, (64, 64, 4, 4), (128, 64, 4, 2))),
                (torch.float32, _cfg(128, (64, 32, 8, 3), (128, 32, 8, 3), tma=True))):
    elt = dt.itemsize
    for kf, a, kw in c.launches(None, 256, shape, dtype=dt, config=cfg):
        if kf.__name__ in ("w13_kernel", "w2_kernel"):
            which = kf.__name__[:-7]
            real = c.compile_launch(kf, a, kw).metadata.shared
            est = smem_estimate(cfg, which, elt, elt, True)
            assert real - 1024 <= est <= real, (dt, cfg, which, real, est)
            compared += 1
assert compared == 8, compared  # both GEMMs of every config (a renamed kernel would compare nothing)
print("ok")
""", tmp_path)


def test_fit_drops_stages_then_narrows_bn():
    space = Space(OSS20, torch.bfloat16, None, (128, 128))
    big = space.apply(_cfg(128, (128, 64, 8, 3), (256, 64, 8, 3), tma=True))  # the heuristic's T = 16384 tile
    assert space.refusal(big) == "shared memory"
    got = space.fit(big)
    assert space.refusal(got) is None and got["w13"]["BK"] == got["w2"]["BK"] == 128
    assert got["w13"]["num_stages"] == got["w2"]["num_stages"] == 2 and got["w2"]["BN"] == 256
    huge = space.apply(_cfg(128, (256, 64, 8, 2), (256, 64, 8, 2)))  # 2 stages already: BN halves
    got = space.fit(huge)
    assert space.refusal(got) is None and got["w13"]["BN"] == 128 and got["w13"]["num_stages"] == 2
    fits = space.apply(_cfg(64, (64, 64, 4, 3), (64, 64, 4, 3)))
    assert space.fit(fits) == fits  # a tile that fits is left alone
    # quantised: the format's rules apply after each step (fp8: BLOCK_M >= 64, w2 BN <= 128), and a step they undo
    # ends the loop instead of spinning
    _, fp8 = tune.quant_spec("fp8")
    qspace = Space(OSS20, torch.bfloat16, fp8, (128, 128))
    got = qspace.fit(_cfg(128, (128, 128, 8, 6), (128, 128, 8, 6)))
    assert qspace.refusal(got) is None and got["w13"]["num_stages"] < 6
    _, mx = tune.quant_spec("mxfp4")
    wspace = Space(OSS20, torch.bfloat16, mx, (128, 128))
    tiny = wspace.apply(_cfg(16, (64, 128, 4, 3), (64, 128, 4, 3)))
    assert wspace.fit(tiny) == tiny


def test_config_in_use_fits_at_a_new_block_k():
    # no table (gpt-oss-20b bf16 has none on this fake GPU): the heuristic's T = 16384 tile at BLOCK_K 128 is the
    # start, and it must fit, or the search times a tile that fails at launch
    m = EXTRA_MODELS["gpt-oss-20b"]
    space, cfg = tune.config_in_use(m, 16384, torch.bfloat16, {}, None, (128, 128), None, 132, (9, 0))
    assert space.refusal(cfg) is None and cfg["w13"]["BK"] == 128
    assert max(smem_estimate(cfg, w, 2, 2, True) for w in ("w13", "w2")) <= SMEM_BYTES
    _, same = tune.config_in_use(m, 16384, torch.bfloat16, {}, None, (64, 64), None, 132, (9, 0))
    assert same["w13"]["BK"] == 64 and same["w13"]["num_stages"] == 3  # the heuristic's own BLOCK_K: unchanged


def _fake_point_env(monkeypatch, fail):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(tune, "precompile", lambda *a, **k: None)

    def fake_time(problems, call, cfg, **kw):
        if fail(cfg):
            raise RuntimeError("out of resource: shared memory")
        return 100.0 - cfg["w13"]["BN"] / 8 - 10 * bool(cfg.get("tma"))

    monkeypatch.setattr(tune, "time_config", fake_time)


def test_tune_point_whose_start_cannot_run(monkeypatch):
    m = MODELS["qwen3-30b-a3b"].replace(E=4, H=32, I=16, K=2)
    _, base = tune.config_in_use(m, 4, torch.float32, {}, None, None, None, 132, None)
    _fake_point_env(monkeypatch, lambda cfg: config_id(cfg) == config_id(base))
    monkeypatch.setattr(tune_checks, "twin_output", lambda *a: True)
    monkeypatch.setattr(tune_checks, "fused_identical", lambda *a: True)
    monkeypatch.setattr(tune_checks, "same_output", lambda *a: pytest.fail("no config in use to compare with"))
    logs = []
    cfg, _, info = tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=logs.append, call=object(),
                                   before={})
    assert config_id(cfg) != config_id(base) and info["base_failed"]
    assert info["best_us"] == 100.0 - cfg["w13"]["BN"] / 8 - 10 * bool(cfg.get("tma"))
    assert any("does not run here (RuntimeError" in s and "take" in s for s in logs), logs
    tune_tables.log_summary([("qwen3-30b-a3b", "-", {4: info})], logs.append)
    assert "(the config in use does not run here)" in logs[-1]
    # the twin disagrees: the bucket is not written with an unchecked tile
    monkeypatch.setattr(tune_checks, "twin_output", lambda *a: False)
    with pytest.raises(RuntimeError, match="T=4.*failed twin_output"):
        tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=logs.append, call=object(), before={})
    # nothing ran at all
    _fake_point_env(monkeypatch, lambda cfg: True)
    with pytest.raises(RuntimeError, match="none of the .* candidates ran"):
        tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=logs.append, call=object(), before={})


def test_a_pdl_winner_of_a_failed_start_is_bit_checked(monkeypatch):
    # round 57's review: the twin-checked answer of a bucket whose start cannot run kept output_checks' bit checks
    # (here PDL: "kept only if bit-identical")
    m = MODELS["qwen3-30b-a3b"].replace(E=4, H=32, I=16, K=2)
    _, base = tune.config_in_use(m, 4, torch.float32, {}, None, None, None, 132, None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(tune, "precompile", lambda *a, **k: None)

    def fake_time(problems, call, cfg, **kw):
        if config_id(cfg) == config_id(base):
            raise RuntimeError("out of resource: shared memory")
        return 50.0 if cfg.get("pdl") else 90.0

    monkeypatch.setattr(tune, "time_config", fake_time)
    monkeypatch.setattr(tune_checks, "twin_output", lambda *a: True)
    monkeypatch.setattr(tune_checks, "fused_identical", lambda *a: True)
    called = []
    monkeypatch.setattr(tune_checks, "pdl_identical", lambda *a: called.append(a[2]) or False)
    with pytest.raises(RuntimeError, match="failed pdl_identical"):
        tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=lambda s: None, call=object(), before={},
                        pdl=True)
    assert called and called[0].get("pdl")
    monkeypatch.setattr(tune_checks, "pdl_identical", lambda *a: True)
    cfg, _, info = tune.tune_point(m, 4, torch.float32, "cpu", rotations=2, log=lambda s: None, call=object(),
                                   before={}, pdl=True)
    assert cfg.get("pdl") and info["best_us"] == 50.0


def test_twin_output_compares_with_the_torch_twin():
    # the reference of a bucket whose start cannot run: the unquantised twin, relative RMS
    m = ModelShape("tiny", E=4, K=2, H=32, I=16)
    problems = [tune.make_problem(5, m.E, m.H, m.I, m.K, torch.float32, "silu", False, "cpu", seed=s) for s in (0, 1)]
    from moekit.ops.experts import fused_experts_torch

    class Call:
        act = "silu"

        def __init__(self, scale):
            self.scale = scale

        def __call__(self, pr, cfg):
            x, w1, w2, w, ids, b1, b2 = pr
            return fused_experts_torch(x, w1, w2, w, ids) * self.scale

    assert tune_checks.twin_output(problems, Call(1.0), {}, 1e-2)
    assert not tune_checks.twin_output(problems, Call(1.05), {}, 1e-2)  # 5 % off


def test_block_k_auto_leaves_out_a_block_k_that_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CONFIG_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tune, "_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(tune, "_device_traits", lambda: (132, (9, 0)))
    monkeypatch.setattr(tune, "make_call", lambda *a: ("call", "w"))

    def fake_point(m, t, dtype, device, *, spec, fixed_bk, fixed_arith, before, **kw):
        if fixed_bk[0] == 128 and t == 16384:
            raise tune_checks.BucketNotTuned("moekit tune: custom at T=16384: none of the 3 candidates ran")
        return tune.config_in_use(m, t, dtype, before, spec, fixed_bk, fixed_arith)[1], "w", \
            {"base_us": 12.0, "best_us": 11.0, "timed": 5}

    monkeypatch.setattr(tune, "tune_point", fake_point)
    custom = ModelShape("custom", E=16, K=2, H=256, I=128)
    logs = []
    path = tune_auto.run_tune_auto([(custom, [1, 16384])], out=tmp_path, log=logs.append, bar=False, budget_s=10.0)
    table = json.loads(path.read_text())["entries"][shape_key(16, 256, 128, 2, torch.bfloat16, True)]
    assert {(c["w13"]["BK"], c["w2"]["BK"]) for c in table.values()} == {(64, 64)}
    assert any(s.startswith("custom: BLOCK_K 128 left out: moekit tune: custom at T=16384") for s in logs), logs
    # another error (e.g. CUDA out of memory) is not a BLOCK_K to leave out: it ends the run
    monkeypatch.setattr(tune, "tune_point", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    path.unlink()
    with pytest.raises(RuntimeError, match="CUDA error"):
        tune_auto.run_tune_auto([(custom, [1])], out=tmp_path, log=logs.append, bar=False, budget_s=10.0)
