#!/usr/bin/env bash
# The README's main command on the bundled default, timed end to end on one thread: uncompiled and
# with --compile, alternating (this VM drifts by 10–30 %). Each run plans 200 steps of one episode
# and prints its ms/action (planning only; the env steps and the untimed Ĵ bookkeeping excluded).
#
#   bash benchmarks/main_command_latency.sh | tee benchmarks/results/main_command_latency.txt
set -euo pipefail
ROUNDS=${ROUNDS:-2}
for r in $(seq "$ROUNDS"); do
  for flag in --no-compile --compile; do
    echo "+ round $r: mbplan plan --planner iterative --horizon 5 $flag --episodes 1 --max-steps 200 --threads 1"
    mbplan plan --planner iterative --horizon 5 "$flag" --episodes 1 --max-steps 200 --threads 1 \
      2>&1 | grep -v "it/s\|step/s"
  done
done
