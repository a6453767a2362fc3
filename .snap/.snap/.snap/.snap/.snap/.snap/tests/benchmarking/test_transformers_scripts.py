"""The transformers block benchmarks run end to end at tiny widths on CPU (the scripts themselves: argument
handling, model building, patching, the JSON they write); their numbers come from the H200 runs."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_transformers  # noqa: E402
import eager_ab  # noqa: E402


def test_bench_transformers_gpt_oss_tiny(tmp_path):
    # gpt-oss: its adapter runs the gate and passes the logits. (Agreement with transformers is tested in
    # tests/integrations; here random bf16 weights at tiny widths can flip a near-tied expert choice, so only
    # the recorded difference's presence and finiteness are checked.)
    torch.manual_seed(0)
    out = tmp_path / "tf.json"
    assert bench_transformers.main(["--tiny", "--models", "gpt_oss_120b", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["models"]["gpt_oss_120b"]
    assert "error" not in res, res.get("error")
    patched = res["variants"]["patched"]
    assert set(patched) == {"1x1", "8x1", "64x1", "1x64"}
    assert all(math.isfinite(row["max_rel_logit_diff_vs_grouped_mm"]) for row in patched.values())


def test_eager_ab_tiny(tmp_path):
    out = tmp_path / "ab.json"
    assert eager_ab.main(["--tiny", "--models", "qwen3_moe_30b_a3b", "--shapes", "8x1,1x16", "--rounds", "2",
                          "--iters", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["qwen3_moe_30b_a3b"]
    assert set(rows) == {"8x1", "1x16"}
    for row in rows.values():
        assert row["grouped_mm_ms"] > 0 and len(row["direct_ms"]) == len(row["checked_ms"]) == 2
