#!/usr/bin/env bash
# Regenerates every figure of docs/figures.md from the bundled default checkpoint (or CKPT=RUN),
# with mbplan's own subcommands, on this 2-core CPU in about 20 minutes (1192 s with one thread
# beside one other 1-thread job, on the ensemble default; each step's time from that run is in the
# comment above it). Each step prints its wall time; the data files (CSV/JSON) land beside the
# figures. `bench iterations` (the longest step) keeps every finished episode in
# $OUT/iterations/bench-iterations-episodes.json: rerunning the script after an interruption
# skips the episodes already there.
#
#   bash benchmarks/reproduce.sh                 # into docs/figures
#   OUT=/tmp/figs THREADS=2 bash benchmarks/reproduce.sh
#
# Sizes are chosen for the CPU budget and are stated in docs/figures.md; the model-based runs use
# fewer states than the model-free ones because one Ĵ_MB evaluation (H = 5) costs ~10× more.
# Fair controls (the defaults of the bench commands): every state set is spread over 5 episodes
# (--state-episodes 5); Adam's step size is swept over {0.01, 0.03, 0.1, 0.3, 1, 3}; the direct
# policy's gap is also measured after fine-tuning it on the same frozen Ĵ; the test-time
# iterations run 10 episodes of 1000 steps per contender.
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
# 66 s.
step bench planners --objective model-free --states 100 --iters 250 --out "$OUT/planners-mf"
# 85 s.
step bench planners --objective model --horizon 5 --states 20 --iters 100 --sweep-states 10 \
  --sweep-iters 50 --out "$OUT/planners-mb"
# Fig. 6 / 17b: amortization gap of direct, direct fine-tuned on the measured Ĵ, and iterative.
# 142 s, with the fine-tuning: 3000 steps × batch 256 (make_default.sh's fit budget of the
# model-free optimizer).
step bench gap --objective model-free --states 100 --out "$OUT/gap-mf"
# 330 s: fine-tuning on Ĵ_MB costs ~0.4 s a step at batch 256 (3000 steps would take ~20 min),
# so 1000 steps at batch 64.
step bench gap --objective model --horizon 5 --states 20 --finetune-steps 1000 \
  --finetune-batch 64 --out "$OUT/gap-mb"
# Fig. 15 / 16: extra test-time iterations, 10 episodes × 1000 steps per contender.
# 507 s, resumable per episode.
step bench iterations --objective model-free --episodes 10 --max-steps 1000 --out "$OUT/iterations"
# Fig. 3: value bias. ≤ 70 s.
step bench value-bias --betas 0 1 2.5 --episodes 3 --out "$OUT/value-bias"
# Fig. 2 / 18: multiple estimates (states from 5 episodes). ≤ 70 s.
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
