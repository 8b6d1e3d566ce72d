#!/usr/bin/env bash
# Same-call A/B of batch-1 decode on the GPU machine: runs bench/run-gpu.sh (qlorad only, no batch,
# multi-adapter, gather or general-path runs: gpu-bench --quick) alternately under two settings,
# ROUNDS times each, and prints each run's batch-1 lines. Lent machines differ by up to ~10 % from
# call to call, so a change is measured against its baseline inside one call (BENCHMARKS.md). With
# CONFIGS, a sweep instead: each of several settings in turn, round robin.
#
#   A="QLORAD_NORM_SHRINK=1" B="QLORAD_NORM_SHRINK=0" bash bench/ab-gpu.sh
#   A_BIN=/tmp/stash/qlorad-bench B_BIN=/tmp/stash/qlorad-bench-main bash bench/ab-gpu.sh
#   CONFIGS="QLORAD_X=default QLORAD_FUSED_SHRINK=0 QLORAD_NORM_SHRINK=0" bash bench/ab-gpu.sh
#
# A, B: environment assignments (space-separated) for each side; A_BIN, B_BIN: the qlorad-bench
# binaries (default $QLORAD_BENCH); CONFIGS: space-separated VAR=VALUE settings, one per side
# (QLORAD_X=default: the defaults; A=1,B=2: two settings on one side), all with $QLORAD_BENCH; OUT: where the logs go
# (ab_<side>_<round>.log); ROUNDS (2); AB_ARGS: more gpu-bench arguments for every side (e.g.
# "--prompt-tokens 1024"); TIMEOUT per run (120 s).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/out}"
BIN="${QLORAD_BENCH:-$HERE/../target/release/qlorad-bench}"
mkdir -p "$OUT"
if [[ -n "${CONFIGS:-}" ]]; then
  read -r -a sides <<< "$CONFIGS"
else
  sides=(a b)
fi
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in "${sides[@]}"; do
    case "$side" in
      a) envs="${A:-}" bin="${A_BIN:-$BIN}" name=a ;;
      b) envs="${B:-}" bin="${B_BIN:-$BIN}" name=b ;;
      *) envs="${side//,/ }" bin="$BIN" name="${side//[^A-Za-z0-9_.-]/_}" ;;
    esac
    log="$OUT/ab_${name}_$r.log"
    env $envs QLORAD_BENCH_ARGS="--multi 0 --batch 0 --quick ${AB_ARGS:-}" SKIP_REFERENCE=1 QLORAD_BENCH="$bin" \
      OUT=/tmp/ab-scratch timeout "${TIMEOUT:-120}" bash "$HERE/run-gpu.sh" > "$log" 2>&1
    echo "$name $r ($envs $(basename "$bin")):"
    grep -h "decode batch 1\|decode graphs" "$log" | sed 's/(runs.*//; s/^/  /'
  done
done
