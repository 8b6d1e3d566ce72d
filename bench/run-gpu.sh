#!/usr/bin/env bash
# GPU benchmark (issue 5): qlorad vs transformers+peft+bitsandbytes on a Mistral-7B-shaped random
# model, NF4 + double quant, bf16 compute, one r=64 adapter on all 7 projections. Runs on the GPU
# machine; writes qlorad-gpu.json, reference-gpu.json and the merged results JSON under $OUT.
#
#   bench/run-gpu.sh                  # from a checkout with target/release/qlorad-bench (cuda build)
#   QLORAD_BENCH=path/to/qlorad-bench PYTHONPATH=<bitsandbytes dir> bench/run-gpu.sh
#
# Steps: generate the model on the GPU (bench/gen_random_llama.py, bf16 safetensors), write the
# adapter (qlorad-bench write-adapter), qlorad-bench gpu-bench, bench/gpu_reference.py, merge.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${QLORAD_BENCH:-$ROOT/target/release/qlorad-bench}"
OUT="${OUT:-$ROOT/bench/results}"
WORK="${WORK:-/tmp/qlorad-gpu-bench}"
RESULT="${RESULT:-2026-11-28-h200.json}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
python3 "$HERE/gen_random_llama.py" --out "$WORK/m7b" || exit 1
[[ -f "$WORK/lora64/adapter_model.safetensors" ]] ||
  "$BIN" write-adapter --model "$WORK/m7b" --out "$WORK/lora64" --rank 64 || exit 1
"$BIN" gpu-bench --model "$WORK/m7b" --adapter "$WORK/lora64" --json-out "$OUT/qlorad-gpu.json" \
  ${QLORAD_BENCH_ARGS:-} 2>&1 | tee "$OUT/qlorad-gpu.log"
ours=${PIPESTATUS[0]}
if [[ "${SKIP_REFERENCE:-0}" != 1 ]]; then
  timeout "${REFERENCE_TIMEOUT:-400}" python3 "$HERE/gpu_reference.py" --model "$WORK/m7b" \
    --adapter "$WORK/lora64" --json-out "$OUT/reference-gpu.json" ${REFERENCE_ARGS:-} 2>&1 |
    tee "$OUT/reference-gpu.log"
fi
python3 "$HERE/merge_gpu_results.py" "$OUT/qlorad-gpu.json" "$OUT/reference-gpu.json" "$OUT/$RESULT"
exit "$ours"
