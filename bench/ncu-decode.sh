#!/usr/bin/env bash
# GPU time per kernel of batch-1 decode on the Mistral-7B-shaped model (ncu, time only), on the GPU
# machine (ncu at /usr/local/cuda/bin/ncu there): `base` takes the decode step's kernels from the
# base runs; `adapter` only the LoRA kernels (grouped GEMVs with the LoRA epilogue and the BGMV
# launches), which the base runs never launch, so every captured launch is an adapter step's.
# Compare an adapter step's GEMVs with the base's to see where the adapter's time goes. `step`
# and `adapter-step` take every kernel of the measured decode runs (base, then one r=64 adapter):
# their launches are skipped past the warm-up (SKIP, default 3000), and for `adapter-step` the
# summary starts at the first LoRA launch. By default ncu pins the SM clock near its base (~1.35
# GHz on the H200) and flushes caches between kernels, so its times are longer than a run's:
# compare kernels within one profile; NCU_CLOCKS=run profiles at the run's clocks and warm caches
# (--clock-control none --cache-control none), closer to what a decode step sees (programmatic
# launch overlap aside: ncu serializes the kernels).
#
#   QLORAD_BENCH=path/to/qlorad-bench OUT=/tmp/out bench/ncu-decode.sh base adapter
#   → $OUT/ncu-decode-{base,adapter}.csv and their bench/ncu_summary.py tables on stdout
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=ncu-setup.sh
source "$HERE/ncu-setup.sh"
clocks=()
[[ "${NCU_CLOCKS:-}" == run ]] && clocks=(--clock-control none --cache-control none)
step='nf4_gemv_t4g|nf4_gemv_tcg|decode_attention|add_rms_norm|silu_mul|attention_combine|lora_bgmv'
for mode in "${@:-base}"; do
  skip="${SKIP:-300}" from=""
  case "$mode" in
    base)
      regex='nf4_gemv_t4g_bf16|nf4_gemv_tcg_bf16|decode_attention|add_rms_norm|silu_mul|attention_combine'
      args=() ;;
    adapter)
      regex='nf4_gemv_t4g_lora|nf4_gemv_tcg_lora|lora_bgmv'
      args=(--adapter "$WORK/lora64") ;;
    step)
      regex="$step" skip="${SKIP:-3000}"
      args=() ;;
    adapter-step)
      # The base runs come first (~290 launches per token): skip them, start at the first LoRA
      # launch of the adapter's measured run.
      regex="$step" skip="${SKIP:-9000}" from=lora
      args=(--adapter "$WORK/lora64") ;;
    *) echo "ncu-decode.sh: unknown mode $mode (base | adapter | step | adapter-step)" >&2; exit 2 ;;
  esac
  timeout "${TIMEOUT:-250}" "$NCU" "${clocks[@]}" --metrics gpu__time_duration.sum \
    --kernel-name-base function --kernel-name "regex:$regex" --launch-skip "$skip" \
    --launch-count "${COUNT:-330}" --csv \
    "$BIN" gpu-bench --model "$WORK/m7b" "${args[@]}" --repeats 1 --multi 0 --batch 0 \
    --ttft-tokens 16 --decode-tokens "${TOKENS:-16}" > "$OUT/ncu-decode-$mode.csv" 2>&1
  echo "== $mode (rc=$?)"
  python3 "$HERE/ncu_summary.py" "$OUT/ncu-decode-$mode.csv" $from
done
