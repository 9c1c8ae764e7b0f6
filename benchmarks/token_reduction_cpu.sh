#!/usr/bin/env bash
# CPU speed-ups of the token-reduction methods over the plain model (issue tables in README "Token reduction"):
# benchmark.py --token-reduction SPEC --vs plain, SWAG ViT-L/16 at 512 px (random weights), batch 1, fp32, 2 threads,
# the reduced and the plain model timed interleaved in one process. One JSON per setting in $OUT; the ratio is
# reduced img/s / plain img/s (`vs.ratio` in the JSON), to compare with the GFLOPs ratio of the Expedit-SWAG tables
# (data/published.json) or with `vs.mac_ratio` (our own GMACs count).
# Knobs (environment): PY, OUT, CONFIG, THREADS, BATCH, ITERS, REPEATS, WARMUP, DEVICE (cpu | cuda), AMP (none |
# bf16 | fp16), ONLY (a method name). On a GPU: DEVICE=cuda BATCH=256 AMP=bf16 (and BATCH=1 for FPS).
# Run it on an otherwise idle machine (a plain L/16 forward at 512 is ~365 GFLOPs: seconds per image on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/token_reduction_cpu}
CONFIG=${CONFIG:-config/swag-vit-l16.json}
THREADS=${THREADS:-2}
BATCH=${BATCH:-1}
ITERS=${ITERS:-1}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
DEVICE=${DEVICE:-cpu}
AMP=${AMP:-none}
mkdir -p "$OUT"
SETTINGS=(
  'tome_r40|{"method": "tome", "r": 40}'
  'hourglass_8_256|{"method": "hourglass", "location": 8, "num_clusters": 256}'
  'evit_0.5|{"method": "evit", "keep_rate": 0.5}'
  'evo_vit_8_0.4|{"method": "evo_vit", "location": 8, "keep_ratio": 0.4}'
  'ats_16|{"method": "ats", "locations": [16], "num_tokens": 1025}'
  'act_q32|{"method": "act", "q_hashes": 32}'
  'smyrf_12_64|{"method": "smyrf", "location": 12, "n_hashes": 32, "q_cluster_size": 64, "k_cluster_size": 64}'
)
for item in "${SETTINGS[@]}"; do
  tag=${item%%|*}; spec=${item#*|}
  [[ -n ${ONLY:-} && $tag != ${ONLY}* ]] && continue
  echo "measuring $tag: $spec" >&2
  "$PY" benchmark.py --config "$CONFIG" --token-reduction "$spec" --vs plain --device "$DEVICE" --amp "$AMP" --mode infer \
      --batch-size "$BATCH" --threads "$THREADS" --warmup "$WARMUP" --iters "$ITERS" --repeats "$REPEATS" \
      --json > "$OUT/$tag.json"
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); v=r['vs']; print(sys.argv[2], 'speed-up', round(v['ratio'], 3), 'GMACs', r['gmacs'], 'vs', v['gmacs'])" \
      "$OUT/$tag.json" "$tag"
done
