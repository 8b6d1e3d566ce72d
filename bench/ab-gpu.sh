#!/usr/bin/env bash
# Same-call A/B of batch-1 decode on the GPU machine: runs bench/run-gpu.sh (qlorad only, no batch
# or multi-adapter runs) alternately under two settings, ROUNDS times each, and prints each run's
# batch-1 lines. Lent machines differ by up to ~10 % from call to call, so a change is measured
# against its baseline inside one call (BENCHMARKS.md).
#
#   A="QLORAD_NORM_SHRINK=1" B="QLORAD_NORM_SHRINK=0" bash bench/ab-gpu.sh
#   A_BIN=/tmp/stash/qlorad-bench B_BIN=/tmp/stash/qlorad-bench-main bash bench/ab-gpu.sh
#
# A, B: environment assignments (space-separated) for each side; A_BIN, B_BIN: the qlorad-bench
# binaries (default $QLORAD_BENCH); OUT: where the logs go (ab_{a,b}_<round>.log); ROUNDS (2);
# AB_ARGS: more gpu-bench arguments for both sides (e.g. "--prompt-tokens 1024").
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/out}"
BIN="${QLORAD_BENCH:-$HERE/../target/release/qlorad-bench}"
mkdir -p "$OUT"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in a b; do
    if [[ $side == a ]]; then envs="${A:-}" bin="${A_BIN:-$BIN}"; else envs="${B:-}" bin="${B_BIN:-$BIN}"; fi
    log="$OUT/ab_${side}_$r.log"
    env $envs QLORAD_BENCH_ARGS="--multi 0 --batch 0 ${AB_ARGS:-}" SKIP_REFERENCE=1 QLORAD_BENCH="$bin" \
      OUT=/tmp/ab-scratch timeout "${TIMEOUT:-120}" bash "$HERE/run-gpu.sh" > "$log" 2>&1
    echo "$side $r ($envs $(basename "$bin")):"
    grep -h "decode batch 1\|decode graphs" "$log" | sed 's/(runs.*//; s/^/  /'
  done
done
