# Sourced by the bench/ncu-*.sh scripts (GPU machine): the qlorad-bench binary, output folder and
# ncu path, and the random Mistral-7B-shaped model and r=64 adapter they profile (made once).
#   sets HERE BIN OUT WORK NCU; needs HERE set by the caller to bench/
BIN="${QLORAD_BENCH:-$HERE/../target/release/qlorad-bench}"
OUT="${OUT:-/tmp/out}"
WORK="${WORK:-/tmp/qlorad-gpu-bench}"
NCU="${NCU:-/usr/local/cuda/bin/ncu}"
mkdir -p "$OUT" "$WORK"
[[ -f "$WORK/m7b/config.json" ]] || python3 "$HERE/gen_random_llama.py" --out "$WORK/m7b" > /dev/null || exit 1
[[ -f "$WORK/lora64/adapter_model.safetensors" ]] ||
  "$BIN" write-adapter --model "$WORK/m7b" --out "$WORK/lora64" --rank 64 > /dev/null || exit 1
