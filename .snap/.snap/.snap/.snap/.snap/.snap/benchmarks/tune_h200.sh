#!/usr/bin/env bash
# Tune moekit's Triton configs for the benchmark shapes on one H200, inside a 540 s wall budget.
#
#   benchmarks/tune_h200.sh OUT_DIR        # -> OUT_DIR/NVIDIA_H200.json (+ one log per section)
#
# Sections (each bounded by what is left of the 540 s, and guarded: a failure or a timeout does not
# stop the next one; every finished token bucket is already merged into the JSON):
#   bf16   the five benchmark shapes, 55 s per shape
#   fp8    128x128 blocks for DeepSeek-V3, Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-120b (--quick, 40 s each)
# (the run that made configs/NVIDIA_H200.json; 4-bit and w13_split tuning: benchmarks/h200_session.sh)
# Copy the JSON to src/moekit/configs/ to ship it, or point MOEKIT_CONFIG_DIR at OUT_DIR.
set -u
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
END=$((SECONDS + 540))
STATUS=()

section() {  # section NAME ARGS...: run `moekit tune ARGS --out OUT` with what is left of the budget
  local name=$1; shift
  local left=$((END - SECONDS))
  if [ "$left" -lt 20 ]; then
    STATUS+=("$name: skipped (wall budget spent)"); return
  fi
  echo "== $name ($left s left) =="
  timeout --signal=TERM --kill-after=10 "$left" python -m moekit tune "$@" --out "$OUT" 2>&1 | tee "$OUT/tune-$name.log"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) STATUS+=("$name: ok") ;;
    124|137) STATUS+=("$name: stopped by the wall budget (finished buckets are kept)") ;;
    *) STATUS+=("$name: failed (exit $rc), see $OUT/tune-$name.log") ;;
  esac
}

section bf16 --models deepseek-v3,qwen3-30b-a3b,mixtral-8x7b,gpt-oss-120b,longcat-flash --budget-s 55
section fp8 --models deepseek-v3,qwen3-30b-a3b,mixtral-8x7b,gpt-oss-120b --quant fp8 --quick --budget-s 40

echo "== summary ($SECONDS s) =="
for s in "${STATUS[@]}"; do echo "  $s"; done
grep -h '^summary ' "$OUT"/tune-*.log 2>/dev/null
python - "$OUT" <<'PY' || true
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    entries = json.loads(f.read_text()).get("entries", {})
    print(f"{f}: {len(entries)} shapes")
    for key, table in sorted(entries.items()):
        print(f"  {key}: buckets {','.join(sorted(table, key=int))}")
PY
