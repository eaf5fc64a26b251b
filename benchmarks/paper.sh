#!/usr/bin/env bash
# The paper's agent-level experiments (issue 19), one `mbplan sweep` each, at CPU scale by default.
# Each keeps its eval curves and lean final checkpoints in benchmarks/results/paper/<name>/ (commit
# them as each finishes). A user with a cluster reruns one at the paper's scale by changing STEPS,
# SEEDS, BACKEND (and THREADS):
#
#   bash benchmarks/paper.sh controls          # item 1: the gallery with the fair controls
#   bash benchmarks/paper.sh fig5              # iterative ≥ direct: 2 more iterative seeds
#   python benchmarks/paper_fig5.py            # its report (and paper_fig7.py for fig7)
#   DRY=1 bash benchmarks/paper.sh all         # print every sweep's estimated cost, run nothing
#   STEPS=1000000 SEEDS=0-4 BACKEND="--backend ray --address auto" bash benchmarks/paper.sh fig7
#
# Costs below are `mbplan sweep --dry-run` estimates at one thread per trial on this 2-core CPU
# (rough, ±2×), from benchmarks/train_throughput.py's per-update figures.
set -euo pipefail
STORAGE=${STORAGE:-runs/paper}
KEEP=${KEEP:-benchmarks/results/paper}
THREADS=${THREADS:-1}
BACKEND=${BACKEND:-}
DRY=${DRY:+--dry-run}
EVAL=(--eval-interval 5000 --eval-episodes 5 --checkpoint-interval 5000)

sweep() {
  local name=$1; shift
  echo "+ mbplan sweep --name $name $*"
  # shellcheck disable=SC2086
  mbplan sweep --name "$name" --storage "$STORAGE" --keep "$KEEP" --threads-per-trial "$THREADS" \
    $BACKEND $DRY "$@"
}

case "${1:-}" in
  controls)  # item 1 (~50 min on one thread): the gallery, with the fair controls as defaults
    bash benchmarks/reproduce.sh ;;
  fig5)  # item 2: two more iterative seeds (β = 2.5, as seed 0's learning run) beside the direct seeds
    sweep fig5 --agent iterative --beta 2.5 --seeds "${SEEDS:-1-2}" --steps "${STEPS:-50000}" \
      "${EVAL[@]}" ;;
  fig7)  # item 3: iterations during training N ∈ {1, 2, 5} (β = 2.5), 30k steps, 2 seeds
    # (ITERS=1,2 STEPS=20000 runs the cells that fig5's N = 5 agents at 20k steps lack)
    sweep fig7 --agent iterative --beta 2.5 --set iters="${ITERS:-1,2,5}" --seeds "${SEEDS:-0-1}" \
      --steps "${STEPS:-30000}" "${EVAL[@]}" ;;
  fig8a)  # item 4: model-based value H = 2 on Pendulum-v1 (direct 0.4 h, iterative 3.5 h each)
    sweep fig8a --env Pendulum-v1 --agent direct iterative --value model --horizon 2 \
      --seeds "${SEEDS:-0-1}" --steps "${STEPS:-10000}" --eval-interval 1000 --eval-episodes 5 \
      --checkpoint-interval 1000
    sweep fig8a-mf --env Pendulum-v1 --agent direct iterative --seeds "${SEEDS:-0-1}" \
      --steps "${STEPS:-10000}" --eval-interval 1000 --eval-episodes 5 --checkpoint-interval 1000 ;;
  fig8a-paper)  # item 4 at the paper's scale (GPU or cluster): HalfCheetah, model-based H = 2
    sweep fig8a-hc --agent direct iterative --value model --horizon 2 --seeds "${SEEDS:-0-3}" \
      --steps "${STEPS:-1000000}" "${EVAL[@]}" ;;
  fig3)  # item 5: value bias vs β; policy_kl is logged at every evaluation (30k steps)
    sweep fig3 --agent iterative --set beta=1 --seeds "${SEEDS:-0-1}" --steps "${STEPS:-30000}" \
      "${EVAL[@]}"
    DRY=$DRY bash "$0" fig3-direct ;;
  fig3-direct)  # its direct cells alone (~10 min each): also the direct side of item 6
    sweep fig3-direct --agent direct --set beta=1 --seeds "${SEEDS:-0-1}" \
      --steps "${STEPS:-30000}" "${EVAL[@]}" ;;
  agents)  # item 6: amortization gap, value bias and modes of every trained agent kept above
    # (iterative: fig5, fig7, fig3; direct: fig3-direct; ~3 min an agent at one thread); an agent
    # whose bench-gap.csv exists is skipped (FORCE=1 measures it again)
    for run in "$KEEP"/{fig5,fig7,fig3,fig3-direct}/*/final; do
      [ -d "$run" ] || continue
      name=$(basename "$(dirname "$run")")
      out="$KEEP/agents/$name"
      [ -z "${FORCE:-}" ] && [ -f "$out/bench-gap.csv" ] && continue
      case $name in *iterative*) planners=iterative ;; *) planners=direct ;; esac
      [ -n "$DRY" ] && { echo "would measure $name ($planners) into $out"; continue; }
      echo "+ $name"
      # shellcheck disable=SC2086
      mbplan bench gap --checkpoint "$run" --planners $planners --threads "$THREADS" --out "$out"
      mbplan bench value-bias --checkpoint "$run" --threads "$THREADS" --out "$out"
      if [ "$planners" = iterative ]; then
        mbplan bench modes --checkpoint "$run" --threads "$THREADS" --out "$out"
      fi
    done ;;
  all)
    for e in fig5 fig7 fig8a fig3; do DRY=$DRY bash "$0" "$e"; done ;;
  *)
    echo "usage: bash benchmarks/paper.sh {controls|fig5|fig7|fig8a|fig8a-paper|fig3|fig3-direct|agents|all}" >&2
    exit 2 ;;
esac
