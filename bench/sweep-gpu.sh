#!/usr/bin/env bash
# Same-call sweep of batch-1 decode on the GPU machine over several settings: bench/run-gpu.sh
# (qlorad only, no batch or multi-adapter runs) under each setting in turn, ROUNDS times round
# robin, printing each run's batch-1 lines. bench/ab-gpu.sh is the two-setting case; lent
# machines differ by up to ~10 % from call to call, so settings are compared inside one call.
#
#   CONFIGS="QLORAD_X=default QLORAD_FUSED_SHRINK=0 QLORAD_NORM_SHRINK=0" bash bench/sweep-gpu.sh
#
# CONFIGS: space-separated settings, each one VAR=VALUE (QLORAD_X=default: the defaults);
# ROUNDS (2); AB_ARGS: more gpu-bench arguments (e.g. "--prompt-tokens 1024"); OUT: the logs
# (sweep_<VAR>_<VALUE>_<round>.log); TIMEOUT per run (120 s).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/out}"
BIN="${QLORAD_BENCH:-$HERE/../target/release/qlorad-bench}"
mkdir -p "$OUT"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for cfg in ${CONFIGS:-QLORAD_X=default}; do
    log="$OUT/sweep_${cfg%%=*}_${cfg#*=}_$r.log"
    env "$cfg" QLORAD_BENCH_ARGS="--multi 0 --batch 0 ${AB_ARGS:-}" SKIP_REFERENCE=1 \
      QLORAD_BENCH="$BIN" OUT=/tmp/sweep-scratch timeout "${TIMEOUT:-120}" bash "$HERE/run-gpu.sh" \
      > "$log" 2>&1
    echo "$r $cfg:"
    grep -h "decode batch 1\|decode graphs" "$log" | sed 's/(runs.*//; s/^/  /'
  done
done
