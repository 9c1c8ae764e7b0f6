#!/usr/bin/env bash
# Training speed of the seven token-reduction methods over the plain model: benchmark.py --mode train --token-reduction
# SPEC --vs plain on config/deit-s.json (deit_small at 224, random weights), fp32, batch 32, 2 CPU threads; the reduced
# and the plain model are timed interleaved in one process (forward, cross-entropy, backward, AdamW step). Each record
# holds both models' img/s, the speed-up (vs.ratio), the MAC ratio plain / reduced (vs.mac_ratio; forward + backward
# counted as 3 x the forward GMACs of framework/counting, fvcore convention) and the speed-up as a fraction of it.
# Settings: ToMe r=13 (the ToMe paper's DeiT-S setting), EViT keep rate 0.7 at blocks 3, 6, 9 with inattentive-token
# fusion and the class-token score (the EViT paper's DeiT-S setting), Hourglass at block 4 with 8x8 clusters, Evo-ViT
# half the patch tokens from block 4, ATS at block 3 with a budget of 99 tokens (half), ACT with 32 query hashes in
# every block, SMYRF from block 6 with 2 hashes and clusters of 32.
# Output: $OUT/<setting>.json (one record each), $OUT/train_speed.jsonl (all records, one a line) and
# $OUT/train_speed.md (the markdown table, also printed).
# Knobs (environment): PY, OUT, CONFIG, DEVICE (cpu | cuda), AMP (none | bf16 | fp16), BATCH, THREADS (CPU only),
# ITERS, REPEATS, WARMUP, ONLY (a setting name prefix). GPU: DEVICE=cuda AMP=bf16 BATCH=256 benchmarks/train_speed.sh
# On a machine shared with other jobs use THREADS=1 and read the "speed-up per CPU second" column.
# Run it on an otherwise idle machine: the "clean" columns keep only CPU iterations that had all their cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-benchmarks/results/train_speed_$DEVICE}
CONFIG=${CONFIG:-config/deit-s.json}
AMP=${AMP:-none}
BATCH=${BATCH:-32}
THREADS=${THREADS:-2}
ITERS=${ITERS:-3}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-2}
mkdir -p "$OUT"
COMMON=(--config "$CONFIG" --mode train --vs plain --device "$DEVICE" --amp "$AMP" --batch-size "$BATCH"
        --warmup "$WARMUP" --iters "$ITERS" --repeats "$REPEATS" --json)
[[ $DEVICE == cpu ]] && COMMON+=(--threads "$THREADS")
SETTINGS=(
  'tome_r13|{"method": "tome", "r": 13}'
  'evit_0.7|{"method": "evit", "keep_rate": 0.7, "locations": [3, 6, 9], "fuse": true, "score": "cls"}'
  'hourglass_4_8x8|{"method": "hourglass", "location": 4, "num_clusters": 64}'
  'evo_vit_4_0.5|{"method": "evo_vit", "location": 4, "keep_ratio": 0.5}'
  'ats_3_99|{"method": "ats", "locations": [3], "num_tokens": 99}'
  'act_q32|{"method": "act", "q_hashes": 32}'
  'smyrf_6_2x32|{"method": "smyrf", "location": 6, "n_hashes": 2, "q_cluster_size": 32, "k_cluster_size": 32}'
)
: > "$OUT/train_speed.jsonl"
for item in "${SETTINGS[@]}"; do
  tag=${item%%|*}; spec=${item#*|}
  [[ -n ${ONLY:-} && $tag != ${ONLY}* ]] && continue
  echo "measuring $tag: $spec" >&2
  "$PY" benchmark.py "${COMMON[@]}" --token-reduction "$spec" > "$OUT/$tag.json"
  "$PY" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$OUT/$tag.json" \
      >> "$OUT/train_speed.jsonl"
done
"$PY" benchmarks/table.py "$OUT/train_speed.jsonl" | tee "$OUT/train_speed.md"
