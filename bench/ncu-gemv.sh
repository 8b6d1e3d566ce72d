#!/usr/bin/env bash
# ncu sections (speed of light, occupancy, warp states, instruction and memory statistics) of the
# NF4 GEMV kernels during batch-1 decode, one profile per QLORAD_NF4_GEMV value, on the GPU
# machine (ncu at /usr/local/cuda/bin/ncu there). ncu pins the SM clock near its base (~1.35 GHz
# on the H200), so its durations are longer than a run's; compare kernels within one profile.
#
#   QLORAD_BENCH=path/to/qlorad-bench KERNELS="lut16 tc3" OUT=/tmp/out bench/ncu-gemv.sh
#   REGEX='nf4_gemv_tcg_bf16_m1' COUNT=7: which launches (after the first SKIP=200) to profile
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${QLORAD_BENCH:-$HERE/../target/release/qlorad-bench}"
OUT="${OUT:-/tmp/out}"
MODEL="${MODEL:-/tmp/qlorad-gpu-bench/m7b}"
NCU="${NCU:-/usr/local/cuda/bin/ncu}"
mkdir -p "$OUT"
[[ -f "$MODEL/config.json" ]] || python3 "$HERE/gen_random_llama.py" --out "$MODEL" > /dev/null || exit 1
for k in ${KERNELS:-lut16 tc3}; do
  QLORAD_NF4_GEMV=$k timeout 200 "$NCU" --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    --section InstructionStats --section MemoryWorkloadAnalysis \
    --kernel-name regex:"${REGEX:-nf4_gemv}" --launch-skip "${SKIP:-200}" --launch-count "${COUNT:-7}" \
    "$BIN" gpu-bench --model "$MODEL" --repeats 1 --multi 0 --batch 0 \
    --ttft-tokens 16 --decode-tokens 16 > "$OUT/ncu-$k.txt" 2>&1
  echo "$k rc=$?"
done
