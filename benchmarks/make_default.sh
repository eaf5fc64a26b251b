#!/usr/bin/env bash
# Builds the bundled default checkpoint (mbplan/data/default) with mbplan's own commands only:
# a HalfCheetah-v5 direct agent (SAC's K = 1 sample per state), an ensemble of E = 5 dynamics and
# reward models fitted on its replay, and an iterative optimizer fitted on each of its frozen
# objectives (model-free, and model-based on the ensemble). Beside it, the single-model variant
# (`fit-model --ensemble 1`, its own model-based optimizer, the same agent and model-free
# optimizer) goes to a second lean bundle for the single-vs-ensemble comparison
# (benchmarks/head_to_head.py). Each step prints its wall time; docs/default-checkpoint.md
# records them.
#
#   bash benchmarks/make_default.sh                 # trains the run too (skipped if it is done)
#   RUN=runs/my-direct-run bash benchmarks/make_default.sh
#
# Finished steps are skipped, so the script can be killed and rerun. A run folder takes one writer
# at a time (its lock), so the side chain (model-free optimizer, single model, its optimizer) works
# on a copy of the trained run, one thread each beside the main chain on this 2-core CPU.
set -euo pipefail
RUN=${RUN:-runs/default/hc-direct-k1-s0}
SIDE=${SIDE:-$RUN-single}
OUT=${OUT:-mbplan/data/default}
OUT_SINGLE=${OUT_SINGLE:-benchmarks/results/head_to_head/bundle-single}
ENSEMBLE=${ENSEMBLE:-5}
THREADS=${THREADS:-1}
T0=$SECONDS

step() { echo "+ $*"; local t0=$SECONDS; "$@"; echo "  ($((SECONDS - t0)) s: $1 $2)"; }
missing() { [[ ! -f "$1/meta.json" ]]; }  # a fitted model or optimizer folder is complete

if [[ ! -d "$RUN/ckpt-000100000" ]]; then
  if [[ -d "$RUN" ]]; then
    step mbplan train --resume "$RUN" --threads "$THREADS"
  else
    step mbplan train --env HalfCheetah-v5 --agent direct --samples 1 --steps 100000 --seed 0 \
      --eval-interval 10000 --eval-episodes 5 --checkpoint-interval 10000 --threads "$THREADS" \
      --out "$RUN"
  fi
fi
if [[ ! -d "$SIDE" ]]; then
  cp -r "$RUN" "$SIDE.tmp" && rm -rf "$SIDE.tmp/model" "$SIDE.tmp/optimizers" && mv "$SIDE.tmp" "$SIDE"
fi

side() {
  if missing "$SIDE/optimizers/model-free"; then
    step mbplan fit-optimizer --checkpoint "$SIDE" --objective model-free --steps 3000 \
      --threads "$THREADS"
  fi
  if missing "$SIDE/model"; then
    step mbplan fit-model --checkpoint "$SIDE" --ensemble 1 --steps 20000 --horizon 5 \
      --threads "$THREADS"
  fi
  if missing "$SIDE/optimizers/model"; then
    step mbplan fit-optimizer --checkpoint "$SIDE" --objective model --horizon 2 --steps 2000 \
      --batch-size 128 --threads "$THREADS"
  fi
}
side > "$SIDE.log" 2>&1 &
SIDE_PID=$!
if missing "$RUN/model"; then
  step mbplan fit-model --checkpoint "$RUN" --ensemble "$ENSEMBLE" --steps 20000 --horizon 5 \
    --threads "$THREADS"
fi
if missing "$RUN/optimizers/model"; then
  step mbplan fit-optimizer --checkpoint "$RUN" --objective model --horizon 2 --steps 2000 \
    --batch-size 128 --threads "$THREADS"
fi
wait "$SIDE_PID"
grep -v "it/s\|step/s" "$SIDE.log" || true
if missing "$RUN/optimizers/model-free"; then  # the agent is the same: one model-free fit serves both
  mkdir -p "$RUN/optimizers"
  cp -r "$SIDE/optimizers/model-free" "$RUN/optimizers/model-free.tmp"
  mv "$RUN/optimizers/model-free.tmp" "$RUN/optimizers/model-free"
fi
rm -rf "$OUT" "$OUT_SINGLE"
step mbplan export --checkpoint "$RUN" --out "$OUT"
step mbplan export --checkpoint "$SIDE" --out "$OUT_SINGLE"
step mbplan plan --checkpoint "$OUT" --planner iterative --horizon 5 --episodes 1 --max-steps 200 \
  --threads "$THREADS"
echo "default bundle built in $((SECONDS - T0)) s"
