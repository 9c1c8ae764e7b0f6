#!/usr/bin/env bash
# CPU speed tables for the README: fp32 inference, batch 32, 2 intra-op threads (the pit.md section 4 protocol).
#  1. ours vs timm's implementation of the same architecture, measured interleaved in one process
#     (deit-ti/s vs timm deit_*_patch16_224, pit-* vs timm pit_*_224 once the PiT configs exist);
#  2. HVT against the DeiT it shrinks (hvt-s-1 vs deit-s, hvt-ti-1 and scale-hvt-ti-4 vs deit-ti);
#  3. every config (--all) and the GMACs-vs-img/s plot.
# Results: benchmarks/results/cpu/*.json, the markdown tables on stdout (benchmarks/table.py).
# Knobs (environment): PY, OUT, THREADS, BATCH, ITERS, REPEATS, WARMUP, BIG=1 adds deit-b / pit-b (slow on CPU).
# Run it on an otherwise idle machine: the "clean" columns keep only iterations whose process CPU time / wall time
# reached 0.9 x THREADS, i.e. iterations that had all their cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/cpu}
THREADS=${THREADS:-2}
BATCH=${BATCH:-32}
ITERS=${ITERS:-5}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-2}
mkdir -p "$OUT"
COMMON=(--device cpu --mode infer --batch-size "$BATCH" --threads "$THREADS" --warmup "$WARMUP" --iters "$ITERS"
        --repeats "$REPEATS" --json)

vs() {  # vs CONFIG_NAME REFERENCE
    local cfg=config/$1.json tag=$1_vs_${2//[:\/]/_}
    if [[ ! -f $cfg ]]; then echo "skip $1 (no $cfg)" >&2; return 0; fi
    echo "measuring $1 vs $2" >&2
    "$PY" benchmark.py --config "$cfg" --vs "$2" "${COMMON[@]}" > "$OUT/${tag%.json}.json"
}

vs deit-ti timm:deit_tiny_patch16_224
vs deit-s timm:deit_small_patch16_224
vs pit-ti timm:pit_ti_224
vs pit-xs timm:pit_xs_224
vs pit-s timm:pit_s_224
vs hvt-s-1 config/deit-s.json
vs hvt-ti-1 config/deit-ti.json
vs scale-hvt-ti-4 config/deit-ti.json
if [[ ${BIG:-0} == 1 ]]; then
    vs deit-b timm:deit_base_patch16_224
    vs pit-b timm:pit_b_224
fi
echo "measuring every config" >&2
"$PY" benchmark.py --all "${COMMON[@]}" > "$OUT/all.json" || true
"$PY" benchmarks/table.py "$OUT"/*_vs_*.json "$OUT/all.json" --plot "$OUT/gmacs_vs_imgs.png"
