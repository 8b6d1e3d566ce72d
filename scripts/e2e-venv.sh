#!/usr/bin/env bash
# Creates (once) and updates the Python venv of the end-to-end and reliability suites, with the
# pinned official `openai` client (which brings httpx, as `httpx2`), pytest and PyYAML. Prints the
# venv's folder. Used by scripts/test.sh and tests/reliability/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-e2e}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check openai==3.57.0 pytest==9.2.0 \
  pyyaml==6.0.3 >&2
echo "$VENV"
