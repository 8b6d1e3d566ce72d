#!/usr/bin/env bash
# Device driver: serving latency with and without a fine-tuning job in one daemon on the H200
# (issue 6's serving_p99_itl_ratio), Mistral-7B shapes with SmolLM2's tokenizer (vocab 49152).
# Runs from the transport folder: stage .devbuild/{scripts/serve-train-run.sh (this file),
# bin/qlorad-serve.xz (stripped `--features qlorad/cuda` qlorad, xz), bench/gen_random_llama.py,
# bench/serve_during_training.py, smoltok/ (SmolLM2's tokenizer files), g64.jsonl (64 Guanaco
# texts as {"text"} lines)}, then on the device: `SHARES="0.5 0.9" bash .devbuild/scripts/serve-train-run.sh`.
set -uo pipefail
D="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" /tmp/stash
python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$D/bin/qlorad-serve.xz" /tmp/stash/qlorad
chmod +x /tmp/stash/qlorad
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 "$D/bench/gen_random_llama.py" --out /tmp/m7 --vocab 49152 >/dev/null 2>&1 || { echo "gen failed"; exit 1; }
cp "$D"/smoltok/* /tmp/m7/
cd /tmp
for share in ${SHARES:-0.5}; do
  timeout 420 python3 "$D/bench/serve_during_training.py" --bin /tmp/stash/qlorad --model /tmp/m7 --model-id m7 \
    --device cuda:0 --requests 16 --max-tokens 64 --train-share $share --data-jsonl "$D/g64.jsonl" \
    --hp '{"n_epochs": 20, "batch_size": 4, "lora_r": 64, "lora_alpha": 16, "max_seq_len": 512}' \
    --out "$OUT/serve-train-share-$share.json" > "$OUT/serve-train-share-$share.log" 2>&1
  echo "share $share rc $?"; tail -25 "$OUT/serve-train-share-$share.log"
done
