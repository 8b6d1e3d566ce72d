#!/usr/bin/env bash
# Peak RSS and wall time of promoting an adapter: `qlorad merge` (bf16 and f32, original; bf16,
# dequantized) and, side by side, the transformers + peft flow (bench/merge_reference.py: load fp32,
# merge_and_unload, save bf16), each under /usr/bin/time (GNU time's %M: peak resident set, which
# counts the memory-mapped pages of the base a process has touched).
#
#   bench/merge-rss.sh [MODEL_DIR] [ADAPTER_DIR]
#
# Defaults: models/smollm2 (SmolLM2-135M-Instruct, 538 MB f32) and tests/fixtures/lora/smollm2-r8-qv.
# Each command runs once as a warm-up (so the base is in the page cache for every run), then R times
# (env R, default 3); the median is printed. Writes bench/results/<YYYY-MM-DD>-merge-rss.txt.
# The reference runs under ${QLORAD_REF_PYTHON:-/work/venv/bin/python} (torch, transformers, peft).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-models/smollm2}"
ADAPTER="${2:-tests/fixtures/lora/smollm2-r8-qv}"
R="${R:-3}"
PY="${QLORAD_REF_PYTHON:-/work/venv/bin/python}"
BIN=target/release/qlorad
[ -x "$BIN" ] || { echo "build first: cargo build --release -p qlorad" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
RESULT="bench/results/$(date -u +%F)-merge-rss.txt"

# Runs "$@" R+1 times (the first is a warm-up), each into a fresh output folder; prints
# "median_rss_MB median_wall_s".
measure() {
  local rss=() wall=()
  for i in $(seq 0 "$R"); do
    rm -rf "$TMP/out"
    /usr/bin/time -f "%M %e" -o "$TMP/time" "$@" >/dev/null 2>"$TMP/err" || { cat "$TMP/err" >&2; exit 1; }
    [ "$i" -eq 0 ] && continue
    read -r kb s <"$TMP/time"
    rss+=("$kb"); wall+=("$s")
  done
  local mid=$(( R / 2 ))
  local kb s
  kb=$(printf '%s\n' "${rss[@]}" | sort -n | sed -n "$((mid + 1))p")
  s=$(printf '%s\n' "${wall[@]}" | sort -n | sed -n "$((mid + 1))p")
  awk -v kb="$kb" -v s="$s" 'BEGIN { printf "%.1f %.2f\n", kb / 1024, s }'
}

{
  echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, git $(git rev-parse --short HEAD)"
  echo "# model $MODEL ($(stat -c %s "$MODEL"/*.safetensors | awk '{ s += $1 } END { printf "%.0f MB", s / 1e6 }') of safetensors), adapter $ADAPTER, median of $R after a warm-up"
  echo "| command | peak RSS MB | wall s |"
  echo "|---|---:|---:|"
  for args in "--dtype bf16" "--dtype f32" "--dtype bf16 --merge-into dequantized"; do
    read -r mb s < <(measure "$BIN" merge --model "$MODEL" --adapter "$ADAPTER" --out "$TMP/out" $args)
    echo "| \`qlorad merge $args\` | $mb | $s |"
  done
  read -r mb s < <(measure "$PY" bench/merge_reference.py "$MODEL" "$ADAPTER" "$TMP/out")
  echo "| transformers + peft (\`bench/merge_reference.py\`, bf16) | $mb | $s |"
} | tee "$RESULT"
