#!/usr/bin/env bash
# Device driver: one epoch of Guanaco-1k at `qlorad train`'s default settings (LoRA r 16, alpha 32
# on all 7 projections, batch 4, max length 512, lr 2e-4 constant after 3 % warmup, clip 0.3) on
# a Mistral-7B-shaped NF4 base (random weights, SmolLM2's tokenizer, vocab 49,152), then the same
# batches through transformers + peft + bitsandbytes (bench/gpu_epoch_reference.py, from the plan
# qlorad wrote). Issue 6's epoch_guanaco_s. Stage .devbuild/{scripts/ (this file), bin/qlorad.xz
# (stripped `--features qlorad/cuda` build), bench/gen_random_llama.py, bench/gpu_epoch_reference.py,
# smoltok/, guanaco.parquet (../shared/data), bnb.tar.xz}, then on the device:
#   bash .devbuild/scripts/device-epoch-run.sh        # → $OUT/epoch.json
set -uo pipefail
D="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
S=/tmp/stash
mkdir -p "$OUT" "$S" /tmp/site
unxz_py() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
unxz_py "$D/bin/qlorad.xz" "$S/qlorad" && chmod +x "$S/qlorad"
[[ -f "$D/bnb.tar.xz" ]] && python3 -c 'import tarfile,sys; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$D/bnb.tar.xz" /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
M=/tmp/m7e
if [[ ! -f "$M/config.json" ]]; then
  python3 "$D/bench/gen_random_llama.py" --out "$M" --vocab 49152 >/dev/null || { echo "gen failed"; exit 1; }
  cp "$D"/smoltok/* "$M"/
fi
# Device memory in use (total - free, CUDA context included) every 100 ms, for both sides alike.
sample() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" & echo $!; }
p=$(sample "$OUT/mem-qlorad.txt")
"$S/qlorad" train --model "$M" --data "$D/guanaco.parquet" --device cuda:0 --out /tmp/epoch-out --overwrite \
  --log "$OUT/epoch-qlorad.jsonl" --dump-plan /tmp/plan.jsonl ${QLORAD_EPOCH_ARGS:-} 2>&1 | tr '\r' '\n' | tail -4
kill "$p"
p=$(sample "$OUT/mem-reference.txt")
timeout "${REFERENCE_TIMEOUT:-300}" python3 "$D/bench/gpu_epoch_reference.py" --model "$M" --plan /tmp/plan.jsonl \
  --json-out "$OUT/epoch-reference.json" 2>&1 | tail -2
kill "$p"
python3 - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
steps = [json.loads(l) for l in open(os.path.join(out, "epoch-qlorad.jsonl")) if l.strip()]
mem = lambda f: max((int(x) for x in open(os.path.join(out, f)) if x.strip().isdigit()), default=0) / 1024
r = {"epoch_guanaco_s": steps[-1]["elapsed_s"], "epoch_steps": steps[-1]["step"],
     "epoch_tokens": steps[-1]["trained_tokens"], "epoch_final_loss": steps[-1]["loss"],
     "epoch_device_used_peak_gb": mem("mem-qlorad.txt") * 1.073741824}
ref = os.path.join(out, "epoch-reference.json")
if os.path.exists(ref):
    x = json.load(open(ref))
    r.update({"reference_epoch_guanaco_s": x["epoch_s"], "reference_epoch_tokens": x["epoch_tokens"],
              "reference_epoch_peak_gb": x["epoch_peak_gb"], "reference_epoch_final_loss": x["epoch_losses"][-1],
              "reference_epoch_device_used_peak_gb": mem("mem-reference.txt") * 1.073741824})
    ours = [s["loss"] for s in steps]
    r["epoch_loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours, x["epoch_losses"]))
json.dump(r, open(os.path.join(out, "epoch.json"), "w"), indent=1)
print(json.dumps(r, indent=1))
PYEOF
