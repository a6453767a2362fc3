"""``benchmarks/triton_ab.py``: two bench JSONs side by side (the round-41 Triton 3.6 / 3.9 comparison)."""

import json
import math

from bench_scripts import bench_script


def _rows(scale: float, drop: bool = False) -> list[dict]:
    rows = [
        {"model": "qwen3-30b-a3b", "tokens": 1, "impl": "moekit", "quant": "bf16", "us": 30.0 * scale},
        {"model": "qwen3-30b-a3b", "tokens": 1, "impl": "moekit-experts", "quant": "fp8", "us": 20.0 * scale},
        {"model": "qwen3-30b-a3b", "tokens": 1, "impl": "eager-layer", "quant": "bf16", "us": 31.0,
         "host_us": 10.0 * scale},
        # a baseline row: not a moekit row, never compared
        {"model": "qwen3-30b-a3b", "tokens": 1, "impl": "grouped_mm", "quant": "bf16", "us": 99.0},
    ]
    if not drop:
        rows.append({"model": "mixtral-8x7b", "tokens": 64, "impl": "moekit", "quant": "mxfp4", "us": 400.0})
    return rows


def test_ratios_geomean_and_missing_points(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_rows(1.0)))
    new.write_text(json.dumps(_rows(1.5, drop=True)))  # every shared point 1.5x slower, one point missing
    with bench_script("triton_ab") as ab:
        a, b = ab.load(str(old)), ab.load(str(new))
        assert ("grouped_mm", "qwen3-30b-a3b", "bf16", 1) not in a  # only moekit and eager rows
        assert a[("moekit-experts", "qwen3-30b-a3b", "fp8", 1)] == 20.0
        out = ab.table(a, b, ("3.6", "3.9"))
        # the missing point is listed with dashes, not dropped or compared
        assert "| moekit | mixtral-8x7b | mxfp4 | 64 | 400.0 | - | - |" in out
        assert "| moekit | qwen3-30b-a3b | bf16 | 1 | 30.0 | 45.0 | 1.500 |" in out
        assert "moekit: geometric mean 3.9 / 3.6 = 1.500 over 1 points" in out
        # host_us: the eager rows' host time only
        h = ab.load(str(new), "host_us")
        assert list(h) == [("eager-layer", "qwen3-30b-a3b", "bf16", 1)]
        assert math.isclose(h[("eager-layer", "qwen3-30b-a3b", "bf16", 1)], 15.0)


def test_main_writes_markdown_and_checks_labels(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_rows(1.0)))
    new.write_text(json.dumps(_rows(0.5)))
    with bench_script("triton_ab") as ab:
        assert ab.main([str(old), str(new), "--labels", "a,b", "--md", str(tmp_path / "t.md")]) == 0
        assert "b / a = 0.500" in (tmp_path / "t.md").read_text()
        try:
            ab.main([str(old), str(new), "--labels", "only-one"])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError("--labels with one name was accepted")
    assert "--labels: expected two comma-separated names" in capsys.readouterr().err
