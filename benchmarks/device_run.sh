#!/bin/bash
# One device call: GPU tests, optional tuning, then the benchmark sweep. Logs and results under $OUT.
#   MODE=all|tests|bench  TESTS="pytest paths"  TUNE=1 TUNE_ARGS=...  CONFIG_DIR=dir of tuned JSON
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
MODE=${1:-all}
TESTS=${TESTS:-tests/ops/test_triton_experts.py tests/ops/test_triton_routing.py tests/test_compile_gpu.py}
if [ "$MODE" != "bench" ]; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q $TESTS -p no:cacheprovider 2>&1 | tee $OUT/pytest_gpu.log | tail -8
fi
if [ "$MODE" != "tests" ]; then
  if [ -n "$TUNE" ]; then
    timeout ${TUNE_TIMEOUT:-200} python -m moekit.tuning --all-bench-shapes --out $OUT $TUNE_ARGS 2>&1 \
      | tee $OUT/tune.log | grep -v "it/s\|s/it" | tail -45
  fi
  MOEKIT_CONFIG_DIR=${CONFIG_DIR:-} timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_moe.py --out $OUT $BENCH_ARGS \
    2>&1 | tee $OUT/bench.log | grep -v "^ \|it/s" | grep -v " us  .*roofline " | tail -60
fi
