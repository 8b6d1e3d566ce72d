#!/usr/bin/env bash
# GPU time per kernel of batch-1 decode on the Mistral-7B-shaped model (ncu, time only), on the GPU
# machine (ncu at /usr/local/cuda/bin/ncu there): `base` takes the decode step's kernels from the
# base runs; `adapter` only the LoRA kernels (grouped GEMVs with the LoRA epilogue and the BGMV
# launches), which the base runs never launch, so every captured launch is an adapter step's.
# Compare an adapter step's GEMVs with the base's to see where the adapter's time goes. ncu pins
# the SM clock near its base (~1.35 GHz on the H200) and flushes caches between kernels, so its
# times are longer than a run's: compare kernels within one profile.
#
#   QLORAD_BENCH=path/to/qlorad-bench OUT=/tmp/out bench/ncu-decode.sh base adapter
#   → $OUT/ncu-decode-{base,adapter}.csv and their bench/ncu_summary.py tables on stdout
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=ncu-setup.sh
source "$HERE/ncu-setup.sh"
for mode in "${@:-base}"; do
  case "$mode" in
    base)
      regex='nf4_gemv_t4g_bf16|nf4_gemv_tcg_bf16|decode_attention|add_rms_norm|silu_mul|attention_combine'
      args=() ;;
    adapter)
      regex='nf4_gemv_t4g_lora|nf4_gemv_tcg_lora|lora_bgmv'
      args=(--adapter "$WORK/lora64") ;;
    *) echo "ncu-decode.sh: unknown mode $mode (base | adapter)" >&2; exit 2 ;;
  esac
  timeout "${TIMEOUT:-250}" "$NCU" --metrics gpu__time_duration.sum --kernel-name-base function \
    --kernel-name "regex:$regex" --launch-skip "${SKIP:-300}" --launch-count "${COUNT:-330}" --csv \
    "$BIN" gpu-bench --model "$WORK/m7b" "${args[@]}" --repeats 1 --multi 0 --batch 0 \
    --ttft-tokens 16 --decode-tokens 16 > "$OUT/ncu-decode-$mode.csv" 2>&1
  echo "== $mode (rc=$?)"
  python3 "$HERE/ncu_summary.py" "$OUT/ncu-decode-$mode.csv"
done
