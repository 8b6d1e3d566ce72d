#!/usr/bin/env bash
# GPU training benchmark (issue 6): `qlorad-bench gpu-train-bench` vs transformers+peft+bitsandbytes
# (bench/gpu_train_reference.py) on a Mistral-7B-shaped random model, NF4 + double quant, bf16
# compute, LoRA r=64 alpha=16 on all 7 projections, batch 4 x 512 random tokens, clip 0.3, plain and
# with gradient checkpointing. Runs on the GPU machine; writes qlorad-train.json, the reference's
# JSON and the merged results JSON ($RESULT) under $OUT.
#
#   bench/run-gpu-train.sh             # from a checkout with target/release/qlorad-bench (cuda build)
#   QLORAD_BENCH=path/to/qlorad-bench PYTHONPATH=<bitsandbytes dir> bench/run-gpu-train.sh
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${QLORAD_BENCH:-$ROOT/target/release/qlorad-bench}"
OUT="${OUT:-$ROOT/bench/results}"
WORK="${WORK:-/tmp/qlorad-gpu-bench}"
RESULT="${RESULT:-2026-11-28-h200-train.json}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
[[ -f "$WORK/m7b/config.json" ]] || python3 "$HERE/gen_random_llama.py" --out "$WORK/m7b" || exit 1
# CURVE_STEPS=N adds a loss curve of N steps from one saved init over saved batches, on both sides.
curve=()
[[ -n "${CURVE_STEPS:-}" ]] && curve=(--curve-steps "$CURVE_STEPS" --curve-dir "$WORK/curve")
"$BIN" gpu-train-bench --model "$WORK/m7b" --json-out "$OUT/qlorad-train.json" "${curve[@]}" ${QLORAD_TRAIN_BENCH_ARGS:-} 2>&1 |
  tee "$OUT/qlorad-train.log"
ours=${PIPESTATUS[0]}
refs=()
if [[ "${SKIP_REFERENCE:-0}" != 1 ]]; then
  for gc in "" "--gradient-checkpointing"; do
    f="$OUT/reference-train${gc:+-gc}.json"
    timeout "${REFERENCE_TIMEOUT:-150}" python3 "$HERE/gpu_train_reference.py" --model "$WORK/m7b" $gc \
      --json-out "$f" 2>&1 | tail -3 | tee -a "$OUT/reference-train.log"
    refs+=("$f")
  done
  if [[ -n "${CURVE_STEPS:-}" ]]; then
    f="$OUT/reference-curve.json"
    timeout "${REFERENCE_TIMEOUT:-150}" python3 "$HERE/gpu_train_reference.py" --model "$WORK/m7b" \
      --curve "$WORK/curve" --steps "$CURVE_STEPS" --json-out "$f" 2>&1 | tail -3 | tee -a "$OUT/reference-train.log"
    refs+=("$f")
  fi
fi
python3 - "$OUT/qlorad-train.json" "$OUT/$RESULT" "${refs[@]}" <<'PYEOF'
import json, os, sys
out = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
for f in sys.argv[3:]:
    if os.path.exists(f):
        out.update({f"reference_{k}": v for k, v in json.load(open(f)).items()})
ours, ref = out.get("curve_losses"), out.get("reference_curve_losses")
if ours and ref:
    out["loss_curve_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}, indent=1))
PYEOF
exit "$ours"
