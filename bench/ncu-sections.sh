#!/usr/bin/env bash
# ncu's throughput, occupancy, scheduler and memory sections for one decode layer's grouped GEMVs
# (four launches), base and with the r=64 adapter, on the GPU machine (ncu at
# /usr/local/cuda/bin/ncu there). What bounds a kernel (DRAM, L1, issue), where bench/ncu-decode.sh
# gives only times.
#
#   QLORAD_BENCH=path/to/qlorad-bench OUT=/tmp/out bench/ncu-sections.sh [base] [adapter]
#   → $OUT/ncu-sections-{base,adapter}.txt
# REGEX: another kernel-name regex (e.g. one launch kind: 'nf4_gemv_t4g_bf16_m1'); NCU_EXTRA: more
# ncu options (e.g. "--section MemoryWorkloadAnalysis_Tables --section InstructionStats
# --metrics breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed": what keeps L1 busy).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=ncu-setup.sh
source "$HERE/ncu-setup.sh"
modes=("$@")
[[ ${#modes[@]} -gt 0 ]] || modes=(base adapter)
for mode in "${modes[@]}"; do
  case "$mode" in
    base) regex='nf4_gemv_t4g_bf16|nf4_gemv_tcg_bf16'; args=() ;;
    adapter) regex='nf4_gemv_t4g_lora|nf4_gemv_tcg_lora'; args=(--adapter "$WORK/lora64") ;;
    *) echo "ncu-sections.sh: unknown mode $mode (base | adapter)" >&2; exit 2 ;;
  esac
  regex="${REGEX:-$regex}"
  # shellcheck disable=SC2086 # NCU_EXTRA is a list of options
  timeout "${TIMEOUT:-150}" "$NCU" ${NCU_EXTRA:-} --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --kernel-name-base function --kernel-name "regex:$regex" --launch-skip "${SKIP:-300}" \
    --launch-count "${COUNT:-4}" "$BIN" gpu-bench --model "$WORK/m7b" "${args[@]}" --repeats 1 \
    --multi 0 --batch 0 --ttft-tokens 16 --decode-tokens 16 > "$OUT/ncu-sections-$mode.txt" 2>&1
  echo "== $mode (rc=$?)"
  grep -E "^  [a-z_0-9]+ \(|Duration|DRAM Throughput|L1/TEX Cache Throughput|Issued Warp|Eligible Warps" \
    "$OUT/ncu-sections-$mode.txt"
done
