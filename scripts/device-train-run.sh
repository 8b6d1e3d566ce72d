#!/usr/bin/env bash
# Device driver for issue 6 (carried as .devbuild/scripts/train-run.sh with bin/qlorad-bench-train.xz,
# bin/qlorad-train.xz, bnb.tar.xz, bench/{gen_random_llama.py,run-gpu-train.sh,gpu_train_reference.py},
# smoltok/ (SmolLM2 tokenizer files) and g64.jsonl (first 64 Guanaco texts)):
#   bash .devbuild/scripts/train-run.sh [check] [e2e] [bench]
# check: qlorad-bench gpu-check (kernels, greedy, training step vs CPU); bench: bench/run-gpu-train.sh;
# e2e: qlorad train on cuda:0 vs cpu, checkpointed, and resumed.
set -uo pipefail
D="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
S=/tmp/stash
mkdir -p "$OUT" "$S" /tmp/site
log() { echo "== $(date +%T) $*"; }
unxz_py() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
unxz_py "$D/bin/qlorad-bench-train.xz" "$S/qlorad-bench" && chmod +x "$S/qlorad-bench"
[[ -f "$D/bin/qlorad-train.xz" ]] && unxz_py "$D/bin/qlorad-train.xz" "$S/qlorad" && chmod +x "$S/qlorad"
python3 -c 'import tarfile,sys; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$D/bnb.tar.xz" /tmp/site
export QLORAD_BENCH="$S/qlorad-bench" PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv || true
for step in "$@"; do
  case "$step" in
    check) log "gpu-check"; "$QLORAD_BENCH" gpu-check ${CHECK_ARGS:-} --json-out "$OUT/gpu-check.json" 2>&1 | tail -n 30 | tee "$OUT/gpu-check.log" ;;
    bench) log "run-gpu-train"; bash "$D/bench/run-gpu-train.sh" ;;
    e2e)
      # qlorad train end to end on cuda:0 vs cpu: an 8-layer random model with SmolLM2's shapes and
      # tokenizer, the first 64 Guanaco texts; plain, checkpointed, and a resume from step 2.
      log "e2e qlorad train"
      python3 "$D/bench/gen_random_llama.py" --out /tmp/smolr --hidden 576 --layers 8 --heads 9 --kv-heads 3 \
        --intermediate 1536 --vocab 49152 --rope-theta 100000 --max-pos 8192 >/dev/null
      cp "$D"/smoltok/* /tmp/smolr/
      c=(train --model /tmp/smolr --data "$D/g64.jsonl" --max-steps 4 --batch-size 2 --max-seq-len 256
         --lora-r 16 --lora-alpha 32 --warmup-ratio 0 --overwrite --seed 7)
      run() { local name=$1; shift; echo "--- $name: $*"; /usr/bin/time -f "$name wall %es" "$S/qlorad" "${c[@]}" "$@" --log "/tmp/$name.jsonl" 2>&1 | tr '\r' '\n' | grep -v "^step\|^$" | tail -4
        python3 -c 'import json,sys; [print(sys.argv[2], json.dumps({k: r[k] for k in ("step","loss","grad_norm","tokens_per_s") if k in r})) for r in map(json.loads, open(sys.argv[1]))]' "/tmp/$name.jsonl" "$name"; }
      {
        run cuda --device cuda:0 --out /tmp/o-cuda
        run cpu --device cpu --out /tmp/o-cpu
        run cuda-gc --device cuda:0 --gradient-checkpointing --out /tmp/o-gc
        run cuda-ckpt --device cuda:0 --save-every 2 --checkpoint-dir /tmp/ck --out /tmp/o-ck
        run cuda-resume --device cuda:0 --resume /tmp/ck/checkpoint-2 --out /tmp/o-rs
        cmp /tmp/o-cuda/adapter_model.safetensors /tmp/o-rs/adapter_model.safetensors && echo "resumed adapter == uninterrupted (bytes)"
      } > "$OUT/e2e.log" 2>&1
      cat "$OUT/e2e.log" ;;
  esac
done
log "done"
