#!/usr/bin/env bash
# Sets up and runs the qlorad daemon on the embedded default model (SmolLM2-135M-Instruct, CPU, NF4):
# builds, fetches and imports the model, then serves the OpenAI API on http://127.0.0.1:8000.
#   curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
#     -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}]}'
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p qlorad
scripts/fetch-model.sh
# State (uploaded files, fine-tuning jobs, checkpoints, fine-tuned adapters, exports) survives
# restarts under state/ (QLORAD_STATE_DIR to move it).
exec target/release/qlorad serve --model models/smollm2 --model-id smollm2 \
  --state-dir "${QLORAD_STATE_DIR:-state}" "$@"
