#!/usr/bin/env bash
# Device driver (issue 10): serving throughput of one `qlorad serve` on one GPU against the same
# daemon on every GPU of the machine (`--device cuda:0,cuda:1,...`: one engine per GPU behind one
# API), Mistral-7B shapes (random weights, SmolLM2's tokenizer), the base model and two r 16
# adapters in turn, 128 concurrent clients (bench/serve_scaling.py); as a control, one daemon per
# GPU in separate processes, the clients split between them. Stage .devbuild as
# scripts/device-serve-train-run.sh says (bin/qlorad-serve.xz, bin/qlorad-bench.xz,
# bench/gen_random_llama.py, bench/serve_scaling.py, smoltok/), then on nvidia-h200-x2:
#   bash .devbuild/scripts/device-serve-scale-run.sh      # → $OUT/serve-scaling.json
set -uo pipefail
D="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
S=/tmp/stash
mkdir -p "$OUT" "$S"
for b in qlorad-serve qlorad-bench; do
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$D/bin/$b.xz" "$S/$b" && chmod +x "$S/$b"
done
N=${GPUS:-$(nvidia-smi -L | wc -l)}
M=/tmp/m7e
if [[ ! -f "$M/config.json" ]]; then
  python3 "$D/bench/gen_random_llama.py" --out "$M" --vocab 49152 >/dev/null || { echo "gen failed"; exit 1; }
  cp "$D"/smoltok/* "$M"/
fi
[[ -f /tmp/lora16/adapter_model.safetensors ]] ||
  "$S/qlorad-bench" write-adapter --model "$M" --out /tmp/lora16 --rank 16 || exit 1
export CUDA_CACHE_PATH=/tmp/cuda-cache
devs=$(seq -s, -f "cuda:%g" 0 $((N - 1)))
python3 "$D/bench/serve_scaling.py" --bin "$S/qlorad-serve" --model "$M" --model-id m7 \
  --devices cuda:0 "$devs" "${devs//,/|}" --lora a0=/tmp/lora16 --lora a1=/tmp/lora16 \
  --clients "${CLIENTS:-128}" --requests "${REQUESTS:-2}" --max-tokens "${MAX_TOKENS:-128}" \
  --logdir "$OUT" --out "$OUT/serve-scaling.json"
