#!/usr/bin/env bash
# Sets up and runs qlorad on the embedded default model (SmolLM2-135M-Instruct, CPU, NF4):
# builds, fetches and imports the model, then answers a chat prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p qlorad
scripts/fetch-model.sh
PROMPT=${1:-"What is the capital of France?"}
exec target/release/qlorad generate --model models/smollm2 --chat --prompt "$PROMPT" --temperature 0 --stats
