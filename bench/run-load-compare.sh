#!/usr/bin/env bash
# Serving under load, side by side on the same machine in the same run: qlorad serve (SmolLM2,
# NF4, CPU) driven by tests/reliability/load.py, then transformers serve (transformers' OpenAI
# server with continuous batching, f32) driven by the same clients (bench/load_reference.py).
# Every client streams chat completions back to back; the admission limit equals the client count,
# so qlorad refuses nothing and both servers see the same offered load. Writes both reports and
# RESULT (merged) under OUT.
#
#   bench/run-load-compare.sh       # CLIENTS=64 DURATION=60 MAX_TOKENS=32 [QLORAD_ARGS="--max-running 64"]
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv-e2e/bin/python}"
C="${CLIENTS:-64}" D="${DURATION:-60}" T="${MAX_TOKENS:-32}"
OUT="${OUT:-$ROOT/bench/results}"
RESULT="${RESULT:-load-compare.json}"
mkdir -p "$OUT"
"$PY" tests/reliability/load.py --clients "$C" --duration "$D" --max-inflight "$C" \
  --max-tokens "$T" --daemon-args "${QLORAD_ARGS:-}" --json-out "$OUT/load-qlorad.json" > /dev/null
ours=$?
"$PY" bench/load_reference.py --clients "$C" --duration "$D" --max-tokens "$T" \
  --json-out "$OUT/load-reference.json" ${REFERENCE_ARGS:-} > /dev/null
python3 - "$OUT/load-qlorad.json" "$OUT/load-reference.json" "$OUT/$RESULT" <<'PYEOF'
import json, sys
q, r = (json.load(open(p)) for p in sys.argv[1:3])
keys = ["requests", "completed", "refused_429", "http_5xx", "lost_streams", "tokens_per_s",
        "completed_per_s", "ttft_s", "itl_s", "e2e_s", "rss", "cpu_seconds"]
out = {"qlorad": {k: q.get(k) for k in keys}, "reference": {k: r.get(k) for k in keys},
       "clients": q["clients"], "duration_s": q["duration_s"], "max_tokens": q["max_tokens"]}
out["ratio_tokens_per_s"] = round(q["tokens_per_s"] / r["tokens_per_s"], 2) if r["tokens_per_s"] else None
json.dump(out, open(sys.argv[3], "w"), indent=1)
print(json.dumps(out, indent=1))
PYEOF
exit "$ours"
