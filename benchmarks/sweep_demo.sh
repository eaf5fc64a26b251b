#!/usr/bin/env bash
# The same small grid (2 envs × 2 agents × 2 seeds, 1000 steps each, one thread per trial) run
# three ways: one trial at a time, the local backend (cores ÷ 1 at a time) and Ray Tune on a local
# instance. Prints each sweep's wall-clock and keeps each sweep's report and lean results under
# benchmarks/results/sweep_demo/<way>/ (issue 18's closing check).
#
#   bash benchmarks/sweep_demo.sh            # ~4 min per way on a 2-core CPU
set -euo pipefail
STORAGE=${STORAGE:-$(mktemp -d)}
KEEP=${KEEP:-benchmarks/results/sweep_demo}
GRID=(--env InvertedPendulum-v5 Pendulum-v1 --agent direct iterative --seeds 0-1
      --steps 1000 --warmup 200 --batch-size 64 --eval-interval 500 --eval-episodes 3
      --checkpoint-interval 500 --threads-per-trial 1 --no-compile)
run() {
  local name=$1; shift
  local t0=$SECONDS
  mbplan sweep --name "$name" --storage "$STORAGE" "${GRID[@]}" --keep "$KEEP/$name" "$@"
  echo "$name: $((SECONDS - t0)) s wall-clock"
}
run sequential --workers 1
run local
run ray --backend ray --cpus 2
