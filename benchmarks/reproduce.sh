#!/usr/bin/env bash
# Regenerates every figure of docs/figures.md from the bundled default checkpoint (or CKPT=RUN),
# with mbplan's own subcommands, on this 2-core CPU in under 30 minutes. Each step prints its wall
# time; the data files (CSV/JSON) land beside the figures.
#
#   bash benchmarks/reproduce.sh                 # into docs/figures
#   OUT=/tmp/figs THREADS=2 bash benchmarks/reproduce.sh
#
# Sizes are chosen for the CPU budget and are stated in docs/figures.md; the model-based runs use
# fewer states than the model-free ones because one Ĵ_MB evaluation (H = 5) costs ~10× more.
set -euo pipefail
OUT=${OUT:-docs/figures}
THREADS=${THREADS:-1}
CKPT_ARGS=()
if [[ -n "${CKPT:-}" ]]; then CKPT_ARGS=(--checkpoint "$CKPT"); fi
T0=$SECONDS

step() {
  echo "+ mbplan $*"
  local t0=$SECONDS
  mbplan "$@" "${CKPT_ARGS[@]}" --threads "$THREADS"
  echo "  ($((SECONDS - t0)) s)"
}

mkdir -p "$OUT"
# Fig. 4c / 13: planner efficiency on the same frozen objectives.
step bench planners --objective model-free --states 100 --iters 250 --out "$OUT/planners-mf"
step bench planners --objective model --horizon 5 --states 20 --iters 100 --sweep-states 10 \
  --sweep-iters 50 --out "$OUT/planners-mb"
# Fig. 6 / 17b: amortization gap.
step bench gap --objective model-free --states 100 --out "$OUT/gap-mf"
step bench gap --objective model --horizon 5 --states 20 --out "$OUT/gap-mb"
# Fig. 15 / 16: extra test-time iterations.
step bench iterations --objective model-free --episodes 2 --max-steps 200 --out "$OUT/iterations"
# Fig. 3: value bias.
step bench value-bias --betas 0 1 2.5 --episodes 3 --out "$OUT/value-bias"
# Fig. 2 / 18: multiple estimates.
step bench modes --objective model-free --states 100 --out "$OUT/modes"
# Fig. 8b, c: planned trajectories; Fig. 1 / 14: the objective surface.
step viz plan --planner iterative --horizon 5 --out "$OUT/plan"
step viz surface --objective model-free --out "$OUT/surface-mf"
step viz surface --objective model --horizon 5 --grid 25 --out "$OUT/surface-mb"
# Fig. 4a, b: λ over iterations along an episode.
step viz lambda --objective model --horizon 5 --steps 50 --out "$OUT/lambda"
# Fig. 5, 7, 12: the default's training curve and its optimizers' fit curves.
echo "+ mbplan viz training"
mbplan viz training ${CKPT:+--runs "$CKPT"} --out "$OUT/training"
# A video of a planned episode beside the model's predicted rollout.
step viz video --planner iterative --horizon 5 --max-steps 150 --out "$OUT/video"
echo "all figures in $OUT ($((SECONDS - T0)) s)"
