"""benchmarks/log_to_json.py reads a cut bench log back into the bench's rows (what compare.py reads)."""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "log_to_json", Path(__file__).resolve().parents[2] / "benchmarks" / "log_to_json.py")
log_to_json = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(log_to_json)

LOG = """\
device NVIDIA H200: copy 2.77 TB/s, read 4.31 TB/s, bf16 matmul 676 TFLOP/s, fp8 matmul 1244 TFLOP/s; formats bf16,fp8
deepseek-v3          T=     1 moekit         bf16       182.8 us   89.5% roofline     3.9 TFLOP/s
deepseek-v3          T=    64 moekit-experts fp8       2139.1 us   96.6% roofline    21.1 TFLOP/s
deepseek-v3     T=    1 eager-layer            host     67.2 us   gpu    183.2 us
deepseek-v3     T=    1 eager-linear           host     35.5 us   gpu     30.6 us   HOST-BOUND
deepseek-v3: 46.5 s (elapsed 48.5 s)
deepseek-v3            T=     8 moekit-experts fp8        627.1 us  x 1.89 vs bf16  92.6% of the fp8 roofline
"""


def test_rows_meta_and_partial():
    rows = log_to_json.parse(LOG)
    assert [(r["impl"], r.get("quant"), r["us"]) for r in rows] == [
        ("moekit", "bf16", 182.8), ("moekit-experts", "fp8", 2139.1), ("eager-layer", None, 183.2),
        ("eager-linear", None, 30.6)]
    assert rows[1]["pct_roofline"] == 96.6 and rows[1]["peak_tflops"] == 1244.0 and rows[0]["peak_tflops"] == 676.0
    assert rows[2]["host_us"] == 67.2 and rows[2]["tokens"] == 1
    meta = rows[0]["meta"]
    assert meta["partial"] is True and meta["quants"] == ["bf16", "fp8"] and meta["read_bw_TBps"] == 4.31
    assert log_to_json.parse(LOG + "wrote /x/NVIDIA_H200-2026-11-30.json in 186 s\n")[0]["meta"]["partial"] is False
