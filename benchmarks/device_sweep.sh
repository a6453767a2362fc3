#!/bin/bash
# One device call: optional per-kernel profile (PROFILE=1), targeted config sweep
# (benchmarks/sweep_buckets.py), then `moekit bench` with each config variant in VARIANTS
# (shipped = the package's JSON; cfg_nopdl / cfg = the sweep's winners without / with PDL), then the
# GPU tests if TESTS is set. At most 8 files come back: run.log, sweep.json, cfg*/<device>.json,
# bench_*.json, pytest_gpu.log.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
LOG=$OUT/run.log
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $LOG
if [ -n "$PROFILE" ]; then
  timeout 60 python benchmarks/profile_decode.py 1 >> $LOG 2>&1
fi
if [ -z "$NO_SWEEP" ]; then
  timeout ${SWEEP_TIMEOUT:-150} python benchmarks/sweep_buckets.py --out $OUT --budget-s ${SWEEP_BUDGET:-120} \
    ${POINTS:+--points $POINTS} 2>&1 | grep -v "^  precompile" >> $LOG
fi
BA=${BENCH_ARGS:-"--models qwen3-30b-a3b,gpt-oss-120b --tokens 1,256,1024 --no-baseline --no-routing"}
VARIANTS=${VARIANTS:-shipped cfg_nopdl cfg}
for v in $VARIANTS; do
  if [ "$v" = cfg ] && [[ " $VARIANTS " == *" cfg_nopdl "* ]] && cmp -s $OUT/cfg/*.json $OUT/cfg_nopdl/*.json; then
    continue
  fi
  dir=""; [ "$v" != shipped ] && dir=$OUT/$v
  echo "== bench $v" >> $LOG
  MOEKIT_CONFIG_DIR=$dir timeout ${BENCH_TIMEOUT:-60} python benchmarks/bench_moe.py --out $OUT/b_$v $BA >> $LOG 2>&1
  mv $OUT/b_$v/*.json $OUT/bench_$v.json 2>/dev/null; rm -rf $OUT/b_$v
done
if [ -n "$TESTS" ]; then
  timeout ${TEST_TIMEOUT:-200} python -m pytest -q $TESTS -p no:cacheprovider > $OUT/pytest_gpu.log 2>&1
  tail -4 $OUT/pytest_gpu.log
fi
grep -E "SWEEP|^  => |== bench|T=.*us |^device|Error|^   [a-z_0-9]+ +x|^T=|^[a-z]+: \{" $LOG | grep -v "it/s" | tail -60
