"""moekit's benchmark harness: one timer, one registry of model shapes, ``moekit bench``, ``moekit tune``.

- :mod:`.timer`: :func:`time_graph` (CUDA-graph replay median, µs) and :func:`time_events` (CUDA-event
  median, ms; ``perf_counter`` on CPU).
- :mod:`.shapes`: :data:`MODELS`, the read-only registry of :class:`ModelShape` (DeepSeek-V3,
  Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-120b, LongCat-Flash: the benchmark sweep) and :data:`EXTRA_MODELS`
  (more shapes with shipped tuned configs).
- :mod:`.bench`: ``moekit bench`` (whole layer and experts step per weight format (:mod:`.bench_quant`) vs a
  ``torch._grouped_mm`` MoE (:mod:`.baseline`), roofline; plots in :mod:`.plot`).
- :mod:`.tune`: ``moekit tune`` (Triton kernel configs, written where the config lookup finds them).

``benchmarks/bench_parallel.py`` and ``benchmarks/bench_transformers.py`` (scripts that need
``torchrun`` or transformers) import the timer and the shapes from here.
"""

from .shapes import EXTRA_MODELS, MODELS, TOKENS, ModelShape, get_shape
from .timer import time_events, time_graph

__all__ = ["EXTRA_MODELS", "MODELS", "TOKENS", "ModelShape", "get_shape", "time_events", "time_graph"]
