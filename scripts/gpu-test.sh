#!/usr/bin/env bash
# The GPU test suite, one command, run on the GPU machine (CI has no GPU): every CUDA kernel
# against its CPU reference, GPU (bf16) vs CPU (f32) greedy decoding, and one QLoRA training step
# (loss, LoRA gradients, a short loss curve) GPU vs CPU, via `qlorad-bench
# gpu-check` (bounds and method in bench/src/gpu_check.rs). Exit status: non-zero if any check fails.
#
#   scripts/gpu-test.sh [MODEL_DIR]      # MODEL_DIR: a real model (e.g. SmolLM2) for the greedy check
#   QLORAD_BENCH=path/to/qlorad-bench scripts/gpu-test.sh    # a carried binary
#
# Build (on a machine with the CUDA toolkit, see ../shared/gpu/README.md):
#   cargo build --release -p qlorad -p qlorad-bench --features qlorad/cuda,qlorad-bench/cuda
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${QLORAD_BENCH:-$ROOT/target/release/qlorad-bench}"
OUT="${OUT:-/tmp}"
args=(gpu-check --tokens "${TOKENS:-32}" --json-out "$OUT/gpu-check.json")
if [[ $# -ge 1 && -d "$1" ]]; then
  args+=(--model "$1")
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
"$BIN" "${args[@]}" 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
