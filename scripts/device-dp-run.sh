#!/usr/bin/env bash
# Device driver (issue 10): data-parallel `qlorad train` on the GPUs of one host against one GPU
# accumulating the same global batch. A Mistral-7B-shaped NF4 base (random weights, SmolLM2's
# tokenizer), Guanaco-1k at `qlorad train`'s defaults (r 16 on all 7 projections, batch 4 × ≤512,
# clip 0.3) unless QLORAD_DP_ARGS adds to them, STEPS optimizer steps (default 30):
#   1 GPU:  --device cuda:0 --grad-accum N        N GPUs: --device cuda:0,...,cuda:N-1
# (one process per GPU, qlorad's default; QLORAD_DP=threads for one thread each).
# Both runs log every step; the summary compares losses step by step (loss-curve equality) and
# tokens/s after the first step (scaling efficiency = tok/s(N) / (N · tok/s(1))). Stage as
# scripts/device-epoch-run.sh says, then on an nvidia-h200-x2 (or -x4) machine:
#   bash .devbuild/scripts/device-dp-run.sh          # → $OUT/dp.json
# NCCL comes from PyTorch's nvidia-nccl wheel there; NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
D="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
S=/tmp/stash
mkdir -p "$OUT" "$S"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
[[ -n "$nccl" ]] && export LD_LIBRARY_PATH="$nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
  "$D/bin/qlorad.xz" "$S/qlorad" && chmod +x "$S/qlorad"
N=${GPUS:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-30}
M=/tmp/m7e
if [[ ! -f "$M/config.json" ]]; then
  python3 "$D/bench/gen_random_llama.py" --out "$M" --vocab 49152 >/dev/null || { echo "gen failed"; exit 1; }
  cp "$D"/smoltok/* "$M"/
fi
devs=$(seq -s, -f "cuda:%g" 0 $((N - 1)))
run() {  # name, extra args...
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$S/qlorad" train --model "$M" --data "$D/guanaco.parquet" --out "/tmp/dp-$name" --overwrite \
    --max-steps "$STEPS" --log "$OUT/dp-$name.jsonl" ${QLORAD_DP_ARGS:-} "$@" 2>&1 | tr '\r' '\n' | grep -v '^step ' | tail -4
  echo "$name: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s wall"
}
run one --device cuda:0 --grad-accum "$N"
run many --device "$devs"
python3 - "$OUT" "$N" <<'PYEOF'
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
load = lambda f: [json.loads(l) for l in open(os.path.join(out, f)) if l.strip()]
one, many = load("dp-one.jsonl"), load("dp-many.jsonl")
def rate(steps):  # tokens/s after the first step (which includes one-time warm-up)
    return (steps[-1]["trained_tokens"] - steps[0]["trained_tokens"]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
r1, rn = rate(one), rate(many)
r = {"dp_gpus": n, "dp_steps": len(many), "dp_tok_s_1gpu": r1, "dp_tok_s": rn,
     "dp_scaling_efficiency": rn / (n * r1),
     "dp_first_step_s_1gpu": one[0]["elapsed_s"], "dp_first_step_s": many[0]["elapsed_s"],
     "dp_loss_max_rel_diff": max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, many)),
     "dp_losses_1gpu": [s["loss"] for s in one], "dp_losses": [s["loss"] for s in many]}
json.dump(r, open(os.path.join(out, "dp.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in r.items() if not k.startswith("dp_losses")}, indent=1))
PYEOF
