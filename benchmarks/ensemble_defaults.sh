#!/usr/bin/env bash
# Measures the ensemble's default propagation and pessimism κ (issue 17): the main command's
# planner (iterative, H = 5, from the policy) WITHOUT the trust region, where the model is exploited
# most, on the bundled ensemble default; full 1000-step HalfCheetah-v5 episodes, 3 seeds × 1
# episode per setting (benchmarks/head_to_head.py, resumable). One folder per setting under
# benchmarks/results/ensemble_defaults/.
#
#   bash benchmarks/ensemble_defaults.sh          # ~60–80 s per episode on one thread
set -euo pipefail
OUT=${OUT:-benchmarks/results/ensemble_defaults}
for setting in "fixed 0" "mean 0" "fixed 1" "fixed 3" "mean 1" "mean 3"; do
  read -r prop kappa <<< "$setting"
  python benchmarks/head_to_head.py --models ensemble= --only iterative --trust 0 \
    --propagation "$prop" --kappa "$kappa" --seeds 3 --episodes 1 --threads 1 \
    --out "$OUT/$prop-kappa$kappa"
done
