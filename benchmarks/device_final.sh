#!/bin/bash
# Final single-GPU validation in one device call: every gpu-marked test, the demo on CUDA, the
# transformers benchmark. Logs under $OUT.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout ${TEST_TIMEOUT:-300} python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee $OUT/pytest_gpu_all.log | tail -15
timeout 120 python -m moekit.cli demo 2>&1 | tee $OUT/demo_cuda.log
timeout ${BENCH_TIMEOUT:-200} python benchmarks/bench_transformers.py --out-dir $OUT 2>&1 | tee $OUT/bench_transformers.log | tail -25
ls $OUT
