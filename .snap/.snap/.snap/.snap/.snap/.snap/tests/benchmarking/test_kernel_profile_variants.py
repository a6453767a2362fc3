"""benchmarks/kernel_profile.py: the config variants it times (named ``--patches``, switch suffixes)."""

import pytest

from bench_scripts import bench_script


@pytest.fixture(scope="module")
def kp():
    pytest.importorskip("triton")
    with bench_script("kernel_profile") as mod:
        yield mod


BASE = {"BLOCK_M": 16, "tma": True, "w13": {"BN": 64, "num_warps": 4, "num_stages": 4, "SWAP": 1},
        "w2": {"BN": 64, "num_warps": 4, "num_stages": 4, "SWAP": 1}}


def test_patches_merge_per_kernel(kp, monkeypatch):
    monkeypatch.setattr(kp, "PATCHES", {"w2s6": {"w2": {"num_stages": 6}},
                                        "both": {"BLOCK_M": 64, "w13": {"BN": 128, "num_warps": 8}}})
    got = kp.variant(BASE, "w2s6")
    assert got["w2"] == {**BASE["w2"], "num_stages": 6} and got["w13"] == BASE["w13"]  # w13 untouched
    got = kp.variant(BASE, "both")
    assert got["BLOCK_M"] == 64 and got["w13"] == {**BASE["w13"], "BN": 128, "num_warps": 8}
    assert BASE["w2"]["num_stages"] == 4 and BASE["w13"]["BN"] == 64  # the lookup's config is not mutated


def test_suffixes_stack_on_any_variant(kp, monkeypatch):
    monkeypatch.setattr(kp, "PATCHES", {"w2s6": {"w2": {"num_stages": 6}}})
    assert kp.variant(BASE, "base+sum")["sum_pass"] is True
    assert kp.variant(BASE, "base-sum")["sum_pass"] is False
    got = kp.variant(BASE, "w2s6+pdl")
    assert got["pdl"] is True and got["w2"]["num_stages"] == 6
    assert "SWAP" not in kp.variant(BASE, "bm128")["w13"]  # a named tile set drops the swap


def test_neighbour_variants_take_the_buckets_around_t(kp, monkeypatch):
    # lo / hi (and repeats lo2, hi3) are the shipped table's configs at the nearest buckets below / above T; a T
    # past the table's last bucket has no hi; other names are not neighbour variants
    from types import SimpleNamespace

    from moekit.ops import triton_configs as tc

    table = {"1": {"BLOCK_M": 16}, "1024": {"BLOCK_M": 64}, "4096": {"BLOCK_M": 128}}
    monkeypatch.setattr(tc, "shape_table", lambda name, key: (None, table))
    monkeypatch.setattr(kp.torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    m = SimpleNamespace(E=8, H=64, I=32, K=2, gated=True)
    near = kp.neighbours(None, m, 2048, None)
    assert near == {"lo": {"BLOCK_M": 64}, "hi": {"BLOCK_M": 128}}
    assert kp.variant(BASE, "lo2", near) == {"BLOCK_M": 64} and kp.variant(BASE, "hi", near) == {"BLOCK_M": 128}
    assert kp.neighbours(None, m, 1024, None) == {"lo": {"BLOCK_M": 16}, "hi": {"BLOCK_M": 128}}  # T's own bucket
    assert kp.neighbours(None, m, 16384, None) == {"lo": {"BLOCK_M": 128}}
    assert [kp.neighbour_name(n) for n in ("lo", "hi3", "L64", "base", "hot")] == ["lo", "hi", None, None, None]


def test_each_point_holds_one_model_at_a_time(kp):
    # points of one model in a row share what was made for it; a model met again after another is made again (the
    # previous one is dropped first), and T comes back as an int
    made = []
    got = [(name, t, held) for name, t, m, held in
           kp.each_point("mixtral-8x7b:1,mixtral-8x7b:8,qwen3-30b-a3b:1,mixtral-8x7b:2",
                         lambda m: made.append(m.name) or len(made))]
    assert made == ["mixtral-8x7b", "qwen3-30b-a3b", "mixtral-8x7b"]
    assert got == [("mixtral-8x7b", 1, 1), ("mixtral-8x7b", 8, 1), ("qwen3-30b-a3b", 1, 2), ("mixtral-8x7b", 2, 3)]
