#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds, fetches the default model, runs every test.
# CPU only. GPU kernels are tested on the device with scripts/gpu-test.sh (not here).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
cargo build --release --workspace --all-targets
scripts/fetch-model.sh
export QLORAD_TEST_MODEL=${QLORAD_TEST_MODEL:-$PWD/models/smollm2}
export QLORAD_REQUIRE_MODEL=1
cargo test --release --workspace -- --test-threads=2
