#!/usr/bin/env bash
# Builds the bundled default checkpoint (mbplan/data/default) from a HalfCheetah-v5 direct run of
# >= 100k env steps, with mbplan's own commands only. Each step prints its wall time.
#
#   RUN=runs/learning/HalfCheetah-v5-direct-s0 bash benchmarks/make_default.sh
#
# The run itself: python benchmarks/learning.py --suite halfcheetah --agents direct --seeds 0
# (= mbplan train --env HalfCheetah-v5 --agent direct --steps 100000 --seed 0 ...).
set -euo pipefail
RUN=${RUN:-runs/learning/HalfCheetah-v5-direct-s0}
OUT=${OUT:-mbplan/data/default}
THREADS=${THREADS:-0}

step() { echo "+ $*"; local t0=$SECONDS; "$@"; echo "  ($((SECONDS - t0)) s)"; }

step mbplan fit-model --checkpoint "$RUN" --steps 20000 --horizon 5 --threads "$THREADS"
step mbplan fit-optimizer --checkpoint "$RUN" --objective model-free --steps 3000 --threads "$THREADS"
step mbplan fit-optimizer --checkpoint "$RUN" --objective model --horizon 2 --steps 2000 \
  --batch-size 128 --threads "$THREADS"
rm -rf "$OUT"
step mbplan export --checkpoint "$RUN" --out "$OUT"
step mbplan plan --planner iterative --horizon 5 --episodes 1 --max-steps 200 --threads "$THREADS"
