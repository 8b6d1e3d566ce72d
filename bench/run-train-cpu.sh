#!/usr/bin/env bash
# CPU QLoRA training benchmark: `qlorad train` vs transformers + peft + bitsandbytes, same model, texts
# and batch shape: plain, with gradient checkpointing, and with the paged optimizer (qlorad
# --paged-optimizer vs bitsandbytes' PagedAdamW32bit; on the CPU both keep the state in host memory
# as plain does, so this row shows what the switch costs there: nothing). Writes bench/results/<date>-train-cpu.json.
#
#   bench/run-train-cpu.sh [--model models/smollm2] [--steps 3] [--batch-size 2] [--max-seq-len 256]
#
# qlorad runs steps+1 optimizer steps; the first is excluded from tokens/s like the reference's
# warm-up step (from the per-step JSON log: tokens and elapsed). Peak RSS from /usr/bin/time.
# Run on a quiet machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL=models/smollm2 STEPS=3 BS=2 LEN=256
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;; --steps) STEPS="$2"; shift 2 ;;
    --batch-size) BS="$2"; shift 2 ;; --max-seq-len) LEN="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
PY="${QLORAD_REF_PYTHON:-/work/venv/bin/python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
N=$(( (STEPS + 1) * BS ))
"$PY" - "$N" "$TMP/data.jsonl" <<'PYEOF'
import json, sys, pyarrow.parquet as pq
n, out = int(sys.argv[1]), sys.argv[2]
t = pq.read_table("../shared/data/guanaco-llama2-1k.parquet").column("text").to_pylist()[:n]
open(out, "w").write("\n".join(json.dumps({"text": x}) for x in t) + "\n")
PYEOF
results=()
for gc in "" "--gradient-checkpointing" "--paged-optimizer"; do
  /usr/bin/time -f "%M" -o "$TMP/rss" target/release/qlorad train --model "$MODEL" --data "$TMP/data.jsonl" \
    --out "$TMP/out" --overwrite --max-steps $((STEPS + 1)) --batch-size "$BS" --max-seq-len "$LEN" \
    --lora-r 16 --lora-alpha 32 --max-grad-norm 0.3 --warmup-ratio 0 --log "$TMP/log.jsonl" $gc 2>/dev/null
  q=$("$PY" - "$TMP/log.jsonl" "$(cat "$TMP/rss")" "$gc" <<'PYEOF'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
tok = steps[-1]["trained_tokens"] - steps[0]["trained_tokens"]
wall = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
print(json.dumps({"impl": "qlorad", "mode": sys.argv[3].lstrip("-") or "plain",
                  "gradient_checkpointing": sys.argv[3] == "--gradient-checkpointing",
                  "steps_timed": len(steps) - 1, "tokens": tok, "wall_s": round(wall, 2),
                  "tokens_per_s": round(tok / wall, 2), "peak_rss_mb": round(int(sys.argv[2]) / 1024, 1),
                  "losses": [s["loss"] for s in steps]}))
PYEOF
)
  r=$("$PY" bench/train_reference.py --model "$MODEL" --data "$TMP/data.jsonl" --steps "$STEPS" \
      --batch-size "$BS" --max-seq-len "$LEN" $gc 2>/dev/null)
  results+=("$q" "$r")
  echo "$q"; echo "$r"
done
mkdir -p bench/results
OUTF="bench/results/$(date +%Y-%m-%d)-train-cpu.json"
printf '%s\n' "${results[@]}" | "$PY" -c "
import json, sys, platform, os
rows = [json.loads(l) for l in sys.stdin if l.strip()]
print(json.dumps({'machine': platform.processor() or platform.machine(), 'cpus': os.cpu_count(),
                  'model': '$MODEL', 'batch_size': $BS, 'max_seq_len': $LEN, 'results': rows}, indent=1))
" > "$OUTF"
echo "wrote $OUTF"
