#!/usr/bin/env bash
# Driver for the lent GPU machine (the device tool copies /work/main plus carried .devbuild/):
# unpacks the carried binaries and the trimmed bitsandbytes, then runs the committed one-command
# scripts — scripts/gpu-test.sh (kernel + greedy checks) and bench/run-gpu.sh (benchmark + Python
# reference) — writing logs and JSON under $OUT. Files carried in .devbuild/ (see BENCHMARKS.md):
#   bin/*.xz (stripped CUDA builds), bnb.tar.xz, scripts/, bench/, smol.part* (SmolLM2, in parts
#   that may arrive over two calls: parts are kept in /tmp/stash while the machine stays warm).
#
#   bash .devbuild/scripts/device-run.sh [check] [graph] [cluster] [clustercap] [lora] [chunks] [bench] [train] [smol]
set -uo pipefail
D="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
S=/tmp/stash
mkdir -p "$OUT" "$S" /tmp/site
log() { echo "== $(date +%T) $*"; }
# Same-call A/B of switch VAR (=1 against =0) into $OUT/ab-NAME.log; more gpu-bench arguments in
# AB_ARGS.
ab() {
  log "A/B${AB_ARGS:+ ($AB_ARGS)}: $2=1 vs 0"
  A="$2=1" B="$2=0" OUT="/tmp/ab-$1" bash "$D/bench/ab-gpu.sh" 2>&1 | tee "$OUT/ab-$1.log"
}
unxz_py() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
for f in "$D"/bin/*.xz; do
  [[ -f "$f" ]] || continue
  b="$S/$(basename "$f" .xz)"
  unxz_py "$f" "$b" && chmod +x "$b"
done
if [[ -f "$D/bnb.tar.xz" ]]; then
  python3 -c 'import tarfile,sys; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$D/bnb.tar.xz" /tmp/site
fi
cp -n "$D"/smol.part* "$S"/ 2>/dev/null || true
export QLORAD_BENCH="$S/qlorad-bench" PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT
# NCCL for gpu-check's collective checks: PyTorch's nvidia-nccl wheel (opened at run time by
# qlorad); NVLink multicast stays off.
export NCCL_NVLS_ENABLE=0
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
[[ -n "$nccl" ]] && export LD_LIBRARY_PATH="$nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "stash: $(ls $S | tr '\n' ' ')"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true
smol=""
if [[ -f "$S/smol.part0" && -f "$S/smol.part1" ]]; then
  [[ -d /tmp/smollm2-nf4 ]] || python3 "$D/bench/device_pack.py" unpack "$S/smol.part0" "$S/smol.part1" --out /tmp/smollm2-nf4
  smol=/tmp/smollm2-nf4
fi
for step in "$@"; do
  case "$step" in
    check) log "gpu-test"; bash "$D/scripts/gpu-test.sh" $smol ;;
    smol)
      if [[ -n "$smol" ]]; then
        log "gpu-test, SmolLM2 only"
        OUT="$OUT" "$QLORAD_BENCH" gpu-check --skip-kernels --model "$smol" --tokens "${TOKENS:-32}" \
          --json-out "$OUT/gpu-check-smollm2.json" 2>&1 | tee "$OUT/gpu-check-smollm2.log"
        log "qlorad generate on cuda:0 vs cpu"
        for dev in cuda:0 cpu; do
          "$S/qlorad" generate --model "$smol" --device "$dev" --chat --temperature 0 --max-tokens 48 \
            --stats --prompt "What is the capital of France?" 2>&1 | tee -a "$OUT/gpu-check-smollm2.log"
        done
      else
        log "SmolLM2 parts missing (fresh machine?): skipped"
      fi ;;
    pick)
      # Decode with the fastest GEMV kernel that passed its checks in this run's gpu-check.
      best=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["extra"].get("best_gemv_kernel", ""))' "$OUT/gpu-check.json" 2>/dev/null)
      if [[ -n "$best" ]]; then
        export QLORAD_NF4_GEMV="$best"
        log "QLORAD_NF4_GEMV=$best: greedy checks again with it"
        "$QLORAD_BENCH" gpu-check --skip-kernels --tokens "${TOKENS:-32}" --json-out /tmp/gpu-check-best.json
      fi ;;
    graph)
      # Captured decode steps (model/src/llama_graph.rs, on by default): every greedy, fused and
      # training check again on the legacy default stream with graphs off (QLORAD_DECODE_GRAPH=0,
      # the opt-out), then same-call A/B of batch-1 decode with graphs on and off.
      log "gpu-check with QLORAD_DECODE_GRAPH=0"
      QLORAD_DECODE_GRAPH=0 timeout "${CHECK_TIMEOUT:-240}" "$QLORAD_BENCH" gpu-check --skip-kernels --tokens "${TOKENS:-32}" \
        --json-out "$OUT/gpu-check-eager.json" 2>&1 | tee "$OUT/gpu-check-eager.log"
      ab graph QLORAD_DECODE_GRAPH ;;
    cluster)
      # The attention's splits merged in a thread-block cluster (kernels/cuda/decode.cu, CL; the
      # default): gpu-check's fused cases compare it with the combine launch bit for bit; here
      # its speed.
      ab cluster QLORAD_ATT_CLUSTER ;;
    clustercap)
      # Long contexts' splits capped at one cluster (QLORAD_ATT_CLUSTER_CAP, the default): batch-1
      # decode after a 1,024-token prompt, where the default takes 32 splits and a combine launch.
      AB_ARGS="--prompt-tokens 1024" ab clustercap QLORAD_ATT_CLUSTER_CAP ;;
    lora)
      # The adapter path's switches again now that decode steps replay as graphs (their extra
      # launches no longer cost host time): the shrinks' placements and the expand's.
      log "sweep of the LoRA switches"
      CONFIGS="QLORAD_X=default QLORAD_FUSED_SHRINK=0 QLORAD_NORM_SHRINK=0 QLORAD_LORA_EPILOGUE=0" \
        OUT=/tmp/sweep-lora bash "$D/bench/ab-gpu.sh" 2>&1 | tee "$OUT/sweep-lora.log" ;;
    chunks)
      # The adapter path's shrink chunking: the norm launches' dots in k-chunk partials
      # (QLORAD_NORM_SHRINK_PARTS, default 4) and the o / down GEMVs' in-launch shrink units
      # (QLORAD_SHRINK_CHUNK values each, default 2048).
      log "sweep of the shrink chunking"
      CONFIGS="QLORAD_X=default QLORAD_NORM_SHRINK_PARTS=1 QLORAD_NORM_SHRINK_PARTS=2 QLORAD_NORM_SHRINK_PARTS=8 QLORAD_SHRINK_CHUNK=1024 QLORAD_SHRINK_CHUNK=512" \
        OUT=/tmp/sweep-chunks bash "$D/bench/ab-gpu.sh" 2>&1 | tee "$OUT/sweep-chunks.log" ;;
    bench) log "run-gpu (QLORAD_NF4_GEMV=${QLORAD_NF4_GEMV:-default})"; bash "$D/bench/run-gpu.sh" ;;
    # Training tokens/s and peak memory (reuses the bench step's model when it ran first).
    train) log "run-gpu-train (${QLORAD_TRAIN_BENCH_ARGS:-default modes})"; RESULT="${TRAIN_RESULT:-h200-train.json}" bash "$D/bench/run-gpu-train.sh" ;;
  esac
done
log "done"
