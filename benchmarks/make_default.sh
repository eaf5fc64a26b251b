#!/usr/bin/env bash
# Builds the bundled default checkpoint (mbplan/data/default) with mbplan's own commands only:
# a HalfCheetah-v5 direct agent (SAC's K = 1 sample per state: ~45 env steps/s on one thread),
# a model fitted on its replay, and an iterative optimizer fitted on each of its frozen objectives.
# Each step prints its wall time; README "Bundled default" records them.
#
#   bash benchmarks/make_default.sh                 # trains the run too (skipped if it is done)
#   RUN=runs/my-direct-run bash benchmarks/make_default.sh
#
# The model-free optimizer does not need the model, so it is fitted beside fit-model (one thread
# each on this 2-core CPU).
set -euo pipefail
RUN=${RUN:-runs/default/hc-direct-k1-s0}
OUT=${OUT:-mbplan/data/default}
THREADS=${THREADS:-1}
T0=$SECONDS

step() { echo "+ $*"; local t0=$SECONDS; "$@"; echo "  ($((SECONDS - t0)) s: $1 $2)"; }

if [[ ! -d "$RUN/ckpt-000100000" ]]; then
  if [[ -d "$RUN" ]]; then
    step mbplan train --resume "$RUN" --threads "$THREADS"
  else
    step mbplan train --env HalfCheetah-v5 --agent direct --samples 1 --steps 100000 --seed 0 \
      --eval-interval 10000 --eval-episodes 5 --checkpoint-interval 10000 --threads "$THREADS" \
      --out "$RUN"
  fi
fi
step mbplan fit-optimizer --checkpoint "$RUN" --objective model-free --steps 3000 \
  --threads "$THREADS" > "$RUN/fit-model-free.log" 2>&1 &
MF=$!
step mbplan fit-model --checkpoint "$RUN" --steps 20000 --horizon 5 --threads "$THREADS"
step mbplan fit-optimizer --checkpoint "$RUN" --objective model --horizon 2 --steps 2000 \
  --batch-size 128 --threads "$THREADS"
wait "$MF"
grep -v "it/s\|step/s" "$RUN/fit-model-free.log" || true
rm -rf "$OUT"
step mbplan export --checkpoint "$RUN" --out "$OUT"
step mbplan plan --planner iterative --horizon 5 --episodes 1 --max-steps 200 --threads "$THREADS"
echo "default bundle built in $((SECONDS - T0)) s"
