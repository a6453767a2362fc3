#!/bin/bash
# One device call: GPU tests, then the benchmark sweep. Logs and results under $OUT.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
MODE=${1:-all}
if [ "$MODE" != "bench" ]; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q -x tests/ops/test_triton_experts.py tests/ops/test_triton_routing.py \
    tests/test_compile_gpu.py -p no:cacheprovider 2>&1 | tee $OUT/pytest_gpu.log | tail -15
fi
if [ "$MODE" != "tests" ]; then
  if [ -n "$TUNE" ]; then timeout ${TUNE_TIMEOUT:-200} python -m moekit.tuning --all-bench-shapes --out $OUT $TUNE_ARGS 2>&1 | tee $OUT/tune.log | grep -v "it/s\|s/it" | tail -40; fi
  MOEKIT_CONFIG_DIR=${CONFIG_DIR:-} timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_moe.py --out $OUT $BENCH_ARGS 2>&1 | tee $OUT/bench.log | grep -v "^ " | tail -60
fi
