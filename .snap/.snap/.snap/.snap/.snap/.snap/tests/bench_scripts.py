"""A script of ``benchmarks/`` loaded as a module in a test: the folder is on ``sys.path`` while the module is in
use (the scripts import their sibling probes, e.g. ``quant_probe``), and taken off after."""

import contextlib
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def bench_script(name: str):
    """Yields ``benchmarks/<name>.py`` executed as a module named ``name``."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))
