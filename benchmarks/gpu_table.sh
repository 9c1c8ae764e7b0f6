#!/usr/bin/env bash
# GPU speed tables: inference at batch 128 (the PiT README measured one V100 at batch 128; precision unstated) and
# training steps, ours vs timm interleaved, then every config and the plot.
# Knobs (environment): PY, OUT, DEVICE (cuda), AMP (bf16 | fp16 | none), BATCH (128), ITERS, REPEATS, WARMUP,
# COMPILE=1 adds --compile, MODE (infer | train).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
BATCH=${BATCH:-128}
ITERS=${ITERS:-50}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-10}
MODE=${MODE:-infer}
mkdir -p "$OUT"
COMMON=(--device "$DEVICE" --mode "$MODE" --amp "$AMP" --batch-size "$BATCH" --warmup "$WARMUP" --iters "$ITERS"
        --repeats "$REPEATS" --json)
[[ ${COMPILE:-0} == 1 ]] && COMMON+=(--compile)

vs() {
    local cfg=config/$1.json tag=$1_vs_${2//[:\/]/_}
    if [[ ! -f $cfg ]]; then echo "skip $1 (no $cfg)" >&2; return 0; fi
    echo "measuring $1 vs $2" >&2
    "$PY" benchmark.py --config "$cfg" --vs "$2" "${COMMON[@]}" > "$OUT/${tag%.json}_${MODE}.json"
}

vs deit-ti timm:deit_tiny_patch16_224
vs deit-s timm:deit_small_patch16_224
vs deit-b timm:deit_base_patch16_224
vs pit-ti timm:pit_ti_224
vs pit-xs timm:pit_xs_224
vs pit-s timm:pit_s_224
vs pit-b timm:pit_b_224
vs hvt-s-1 config/deit-s.json
vs hvt-ti-1 config/deit-ti.json
echo "measuring every config" >&2
"$PY" benchmark.py --all "${COMMON[@]}" > "$OUT/all_${MODE}.json" || true
"$PY" benchmarks/table.py "$OUT"/*_vs_*_"${MODE}".json "$OUT/all_${MODE}.json" --plot "$OUT/gmacs_vs_imgs_${MODE}.png"
