"""benchmarks/power_probe.py: the NVML reason masks decode to names, and a window's summary takes only its samples."""

import power_probe as pp  # benchmarks/ (on the test path)


def test_decode_reasons():
    assert pp.decode_reasons(0) == []
    # the power cap and a hardware slowdown together (the compute-bound H200 case the probe looks for)
    assert pp.decode_reasons(0x4 | 0x8) == ["sw-power-cap", "hw-slowdown"]
    # an unknown bit is kept, in hex, after the known names
    assert pp.decode_reasons(0x1 | 0x1000) == ["idle", "0x1000"]


def test_summarise_window():
    samples = [dict(t=float(i), sm=1000 + 100 * i, w=500.0 + i, c=40 + i, reasons=0x4 if i % 2 else 0)
               for i in range(10)]
    s = pp.summarise(samples, 2.0, 5.0)  # samples 2, 3, 4, 5
    assert s["samples"] == 4
    assert s["sm_mhz"] == 1350 and s["sm_min"] == 1200
    assert s["reasons"] == {"sw-power-cap": 50.0}
    assert pp.summarise(samples, 20.0, 30.0) == dict(samples=0)
