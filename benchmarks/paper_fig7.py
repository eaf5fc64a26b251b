"""Paper Fig. 7/17 at CPU scale: iterations during training N vs return and amortization gap.

Reads committed files only, so it runs without the run folders:

* N = 1 and 2 from ``bash benchmarks/paper.sh fig7`` (``ITERS=1,2``), kept in
  ``benchmarks/results/paper/fig7/<trial>/eval_curve.json``;
* N = 5 from the fig5 agents (``benchmarks/results/paper/fig5/``) and the learning suite's
  iterative seed 0 (``benchmarks/results/learning/halfcheetah/evals/``);
* each agent's amortization gap from ``bash benchmarks/paper.sh agents``
  (``benchmarks/results/paper/agents/<trial>/bench-gap.csv``: the gap of its own iterative
  optimizer on the frozen model-free objective, mean over the bench's states).

All agents are iterative, β = 2.5. Each is scored at ``--steps`` (default: the most env steps every
agent reached). ± is the SD over seeds (n − 1); a per-seed gap is the mean over that bench's
states. Writes ``fig7.json``, ``fig7.md`` and ``fig7.png`` into ``--out``.

    python benchmarks/paper_fig7.py
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from paper_fig5 import at_step, mean_sd

from mbplan.checkpoint import atomic_path, atomic_write_text
from mbplan.sweep import read_evals

PAPER = Path("benchmarks/results/paper")
LEARNING = Path("benchmarks/results/learning/halfcheetah/evals")


def iterations_of(trial: str) -> int:
    """Training iterations N from a trial id (``...-iters=2-s0``); the default 5 without it."""
    match = re.search(r"-iters=(\d+)-", trial)
    return int(match.group(1)) if match else 5


def curves(paper: Path, learning: Path) -> dict[int, dict[str, list[dict]]]:
    """N → trial id → eval rows (step order), from the committed files."""
    out: dict[int, dict[str, list[dict]]] = {}
    for path in sorted(learning.glob("HalfCheetah-v5-iterative-*.jsonl")):
        out.setdefault(5, {})[path.stem] = read_evals(path)
    for sweep in ("fig5", "fig7"):
        for path in sorted((paper / sweep).glob("*/eval_curve.json")):
            trial = path.parent.name
            out.setdefault(iterations_of(trial), {})[trial] = json.loads(path.read_text())
    return dict(sorted(out.items()))


def gap_of(agents: Path, trial: str) -> float | None:
    """Mean amortization gap of the trial's own iterative optimizer, or None if not measured."""
    path = agents / trial / "bench-gap.csv"
    if not path.exists():
        return None
    with path.open() as f:
        gaps = [float(r["gap"]) for r in csv.DictReader(f) if r["planner"] == "iterative"]
    return statistics.fmean(gaps) if gaps else None


def summarize(runs: dict[int, dict[str, list[dict]]], agents: Path, steps: int | None) -> dict:
    """Per N: return at ``steps`` and the gap of each seed that has one, with mean and SD."""
    if steps is None:
        steps = min(rows[-1]["step"] for trials in runs.values() for rows in trials.values())
    result: dict = {"steps": steps, "by_iterations": {}}
    for n, trials in runs.items():
        points = {tid: at_step(rows, steps) for tid, rows in trials.items()}
        points = {tid: p for tid, p in points.items() if p is not None}
        returns = [p["eval_return_mean"] for p in points.values()]
        gaps = {tid: g for tid in points if (g := gap_of(agents, tid)) is not None}
        r_mean, r_sd = mean_sd(returns)
        g_mean, g_sd = mean_sd(list(gaps.values())) if gaps else (float("nan"), float("nan"))
        result["by_iterations"][str(n)] = {
            "trials": sorted(points),
            "returns": returns,
            "return_mean": r_mean,
            "return_sd": r_sd,
            "train_hours_mean": statistics.fmean(p["train_seconds"] for p in points.values())
            / 3600,
            "gaps": gaps,
            "gap_mean": g_mean,
            "gap_sd": g_sd,
        }
    return result


def markdown(result: dict) -> str:
    lines = [
        f"HalfCheetah-v5, iterative agents (β = 2.5) at {result['steps']:,} env steps: eval return "
        "(5 episodes per evaluation) and amortization gap (model-free Ĵ, mean over the bench's "
        "states); ± is the SD over seeds (n − 1).",
        "",
        "| N (training iterations) | seeds | return (mean ± SD) | per seed | gap (mean ± SD) | "
        "gap seeds | training h |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for n, row in result["by_iterations"].items():
        per_seed = " / ".join(f"{x:.0f}" for x in row["returns"])
        gap = f"{row['gap_mean']:.3f} ± {row['gap_sd']:.3f}" if row["gaps"] else "—"
        lines.append(
            f"| {n} | {len(row['returns'])} | {row['return_mean']:.1f} ± {row['return_sd']:.1f} "
            f"| {per_seed} | {gap} | {len(row['gaps'])} | {row['train_hours_mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[int, dict[str, list[dict]]], result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    cmap = plt.get_cmap("viridis")
    ns = list(runs)
    for i, (n, trials) in enumerate(runs.items()):
        color = cmap(i / max(len(ns) - 1, 1))
        for j, rows in enumerate(trials.values()):
            x = [r["step"] for r in rows if r["step"] <= result["steps"]]
            y = [r["eval_return_mean"] for r in rows if r["step"] <= result["steps"]]
            axes[0].plot(x, y, color=color, alpha=0.8, label=f"N = {n}" if j == 0 else None)
    rows = result["by_iterations"]
    for n, row in rows.items():
        axes[1].scatter([int(n)] * len(row["gaps"]), list(row["gaps"].values()), color="k", s=12)
    axes[0].set_xlabel("env steps")
    axes[0].set_ylabel("eval return")
    axes[0].legend()
    axes[1].set_xlabel("training iterations N")
    axes[1].set_ylabel("amortization gap (one dot per seed)")
    axes[1].set_xticks([int(n) for n in rows])
    fig.suptitle("Fig. 7/17 at CPU scale: iterations during training (HalfCheetah-v5)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="env steps to compare at")
    p.add_argument("--paper", default=str(PAPER), help="paper.sh's --keep folder")
    p.add_argument("--learning", default=str(LEARNING))
    p.add_argument("--out", default=str(PAPER))
    args = p.parse_args()
    paper = Path(args.paper)
    runs = curves(paper, Path(args.learning))
    result = summarize(runs, paper / "agents", args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fig7.json", json.dumps(result, indent=1))
    text = markdown(result)
    atomic_write_text(out / "fig7.md", text)
    plot(runs, result, out / "fig7.png")
    print(text, end="")
    print(f"written {out / 'fig7.json'}, fig7.md, fig7.png")


if __name__ == "__main__":
    main()
