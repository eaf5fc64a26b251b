"""The README's planning table: return and ms/action per planner and horizon on a checkpoint.

Each cell is receding-horizon control in the real env against Ĵ_MB (``mbplan plan``'s loop), with
the same seeds for every cell. Cells are saved one JSON file each as they finish, so the script can
be killed and rerun; finished cells are skipped. Writes ``plan_table.csv`` and ``plan_table.md``.

    python benchmarks/plan_table.py                      # bundled default, 3 episodes × 200 steps
    python benchmarks/plan_table.py --trust 0 1          # without and with the trust region
    python benchmarks/plan_table.py --checkpoint RUN --episodes 3 --max-steps 1000

Cells: iterative (its own N), adam 5 and 50, cem 5 and 50 iterations, direct; each at H = 1, 2, 5
and from two starts (see CONTENDERS; the 50-iteration cells cost seconds per action here, so their
episodes are cut at ``--heavy-max-steps``, default 100; the table states episodes × steps per
cell); then the zero-shot transfer rows (iterative optimizer fitted on the model-free objective,
planning against Ĵ_MB at H = 5). ``--trust`` is ``mbplan plan``'s η (default the same); every cell
is kept per η, and the table lists the requested ones. The cheap cells run first.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from mbplan.checkpoint import run_or_default
from mbplan.envs import make_env
from mbplan.fast.malloc import tune_malloc
from mbplan.mpc import (
    DEFAULT_TRUST,
    MPC,
    PlanSettings,
    check_trust,
    load_setup,
    model_objective,
    planner_for,
)

#: (label, planner, iterations (None = the planner's default), where each plan starts: ``prior`` =
#: the planner's fixed λ_0, ``previous`` = the previous step's λ (the usual MPC warm start; from the
#: fixed λ_0 = (μ 0, σ 0.5), 5 Adam steps barely move the mean and the cheetah stands still),
#: ``policy`` = the direct policy's λ = f(s), which the planner refines; ``mbplan plan``'s default;
#: short: episodes cut at --heavy-max-steps)
CONTENDERS = [
    ("iterative", "iterative", None, "prior", False),
    ("iterative (from policy)", "iterative", None, "policy", False),
    ("adam 5 (warm)", "adam", 5, "previous", False),
    ("adam 5 (from policy)", "adam", 5, "policy", False),
    ("adam 50 (warm)", "adam", 50, "previous", True),
    ("adam 50 (from policy)", "adam", 50, "policy", True),
    ("cem 5 (warm)", "cem", 5, "previous", False),
    ("cem 5 (from policy)", "cem", 5, "policy", False),
    ("cem 50 (warm)", "cem", 50, "previous", True),
    ("cem 50 (from policy)", "cem", 50, "policy", True),
    ("direct", "direct", None, "prior", False),
    ("direct (short)", "direct", None, "prior", True),  # as long as the 50-iteration cells
]
#: The zero-shot transfer rows: the optimizer fitted on the model-free objective, on Ĵ_MB.
TRANSFER = [
    ("iterative (model-free, zero-shot)", "transfer", None, "prior", False),
    ("iterative (model-free, zero-shot, from policy)", "transfer", None, "policy", False),
]


def run_cell(
    setup, planner, horizon: int, iters: int | None, init: str, max_steps: int, trust: float, args
) -> dict:
    """Return mean ± std, ms/action and Ĵ improvement of one planner at one horizon."""
    objective, _ = model_objective(setup, horizon)
    env = make_env(setup.config["env"], seed=args.seed)
    start = time.perf_counter()
    mpc = MPC(setup, planner, objective, PlanSettings(iters, init, trust), args.seed)
    stats = mpc.run(env, args.episodes, max_steps or None)
    return {
        "trust": trust,
        "horizon": horizon,
        "iters": iters if iters is not None else planner.default_iters,
        "init": init,
        "episodes": len(stats.returns),
        "steps_per_episode": max_steps or 1000,
        "return_mean": statistics.fmean(stats.returns),
        "return_std": statistics.pstdev(stats.returns),
        "returns": stats.returns,
        "ms_per_action": stats.ms_per_action,
        "improvement": stats.improvement,
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="", help="run folder (default: the bundled default)")
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=200, help="steps per episode (0 = env limit)")
    p.add_argument(
        "--heavy-max-steps",
        type=int,
        default=100,
        help="steps per episode of the 50-iteration cells (seconds per action on a CPU)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="compute only the cells of these planners (iterative adam cem direct transfer); "
        "the table still lists every finished cell",
    )
    p.add_argument(
        "--trust",
        type=float,
        nargs="+",
        default=[DEFAULT_TRUST],
        help="trust-region η of the cells (mbplan plan --trust; direct ignores it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/plan_table")
    args = p.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    setup = load_setup(run_or_default(args.checkpoint))
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)

    cells = [(*c, H, eta) for eta in args.trust for H in args.horizons for c in CONTENDERS]
    cells += [(*c, max(args.horizons), eta) for eta in args.trust for c in TRANSFER]
    order = sorted(range(len(cells)), key=lambda i: cells[i][4])  # the cheap cells first
    rows: dict[int, dict] = {}
    seen = set()
    for i in order:
        label, name, iters, init, short, H, eta = cells[i]
        eta = check_trust(eta, name)  # direct: 0 (one cell serves every η)
        stem = f"{label.replace(' ', '_').replace(',', '')}-H{H}"
        path = out / "cells" / f"{stem}-trust{eta:g}.json"
        if path in seen:
            continue
        seen.add(path)
        if path.exists():
            row = {"init": init, **json.loads(path.read_text())}
        elif args.only is not None and name not in args.only:
            continue
        else:
            if name == "transfer":
                if "model-free" not in setup.optimizers:
                    continue
                planner = setup.optimizers["model-free"]
            else:
                planner = planner_for(setup, name, "model")
            steps = args.heavy_max_steps if short else args.max_steps
            row = {"planner": label, **run_cell(setup, planner, H, iters, init, steps, eta, args)}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row, indent=1))
            tmp.replace(path)
        rows[i] = row
        print(f"{label:34s} H={H} η={eta:g}  return {row['return_mean']:8.1f} ± "
              f"{row['return_std']:6.1f}  {row['ms_per_action']:8.1f} ms/action  "
              f"ΔĴ {row['improvement']:7.3f}", flush=True)  # fmt: skip
    rows = [rows[i] for i in sorted(rows)]  # the table keeps the listed order

    fields = ["planner", "init", "trust", "horizon", "iters", "episodes", "steps_per_episode",
              "return_mean", "return_std", "ms_per_action", "improvement",
              "wall_seconds"]  # fmt: skip
    with open(out / "plan_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| planner | start | trust η | iters | H | episodes × steps | return (mean ± std) "
        "| ms/action | Ĵ(λ_I) − Ĵ(λ_0) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['planner']} | {r['init']} | {r['trust']:g} | {r['iters']} | "
                     f"{r['horizon']} | "
                     f"{r['episodes']} × {r['steps_per_episode']} | "
                     f"{r['return_mean']:.1f} ± {r['return_std']:.1f} | "
                     f"{r['ms_per_action']:.1f} | {r['improvement']:.3f} |")  # fmt: skip
    (out / "plan_table.md").write_text("\n".join(lines) + "\n")
    print(f"written {out / 'plan_table.csv'} and {out / 'plan_table.md'}")


if __name__ == "__main__":
    main()
