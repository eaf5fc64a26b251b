"""Paper Fig. 5 at CPU scale: iterative vs direct agents at equal env steps and equal wall-clock.

Reads the committed eval curves, so it runs without the run folders:

* direct seeds 0–2 and iterative seed 0 from ``benchmarks/results/learning/halfcheetah/evals/``
  (``python benchmarks/learning.py --suite halfcheetah``: direct to 100k steps, iterative to 50k);
* the iterative seeds of ``bash benchmarks/paper.sh fig5`` from their ``--keep`` copies
  (``benchmarks/results/paper/fig5/<trial>/eval_curve.json``).

All iterative runs use β = 2.5, the direct ones β = 1 (the reference's settings). Each agent is
scored at ``--steps`` (default: the most env steps every iterative seed reached) and, for equal
wall-clock, at the iterative seeds' mean ``train_seconds`` there: each direct seed's last
evaluation within that time. ± is the SD over seeds (n − 1). Writes ``fig5.json``, ``fig5.md``
and ``fig5.png`` into ``--out``.

    python benchmarks/paper_fig5.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mbplan.checkpoint import atomic_path, atomic_write_text
from mbplan.sweep import read_evals

LEARNING = Path("benchmarks/results/learning/halfcheetah/evals")
FIG5 = Path("benchmarks/results/paper/fig5")


def curves(learning: Path, fig5: Path) -> dict[str, dict[str, list[dict]]]:
    """agent → trial id → eval rows (step order), from the committed files."""
    out: dict[str, dict[str, list[dict]]] = {"direct": {}, "iterative": {}}
    for path in sorted(learning.glob("HalfCheetah-v5-*.jsonl")):
        agent = "iterative" if "-iterative-" in path.name else "direct"
        out[agent][path.stem] = read_evals(path)
    for path in sorted(fig5.glob("*/eval_curve.json")):
        out["iterative"][path.parent.name] = json.loads(path.read_text())
    return out


def at_step(rows: list[dict], step: int) -> dict | None:
    """The evaluation at exactly ``step`` env steps, or None."""
    return next((r for r in rows if r["step"] == step), None)


def within_seconds(rows: list[dict], seconds: float) -> dict:
    """The last evaluation with ``train_seconds`` ≤ ``seconds`` (the first one if none)."""
    done = [r for r in rows if (r.get("train_seconds") or 0.0) <= seconds]
    return done[-1] if done else rows[0]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def summarize(runs: dict[str, dict[str, list[dict]]], steps: int | None) -> dict:
    """Returns per agent at equal steps and at the iterative agents' wall-clock there."""
    if steps is None:
        steps = min(rows[-1]["step"] for rows in runs["iterative"].values())
    result: dict = {"steps": steps, "equal_steps": {}, "equal_wall_clock": {}}
    for agent, trials in runs.items():
        points = {tid: at_step(rows, steps) for tid, rows in trials.items()}
        points = {tid: p for tid, p in points.items() if p is not None}
        returns = [p["eval_return_mean"] for p in points.values()]
        seconds = [p["train_seconds"] for p in points.values()]
        m, sd = mean_sd(returns)
        result["equal_steps"][agent] = {
            "seeds": len(returns),
            "trials": sorted(points),
            "return_mean": m,
            "return_sd": sd,
            "returns": returns,
            "train_seconds_mean": statistics.fmean(seconds),
        }
    budget = result["equal_steps"]["iterative"]["train_seconds_mean"]
    direct = [within_seconds(rows, budget) for rows in runs["direct"].values()]
    m, sd = mean_sd([r["eval_return_mean"] for r in direct])
    result["equal_wall_clock"] = {
        "seconds": budget,
        "direct_steps": [r["step"] for r in direct],
        "direct_return_mean": m,
        "direct_return_sd": sd,
        "iterative_return_mean": result["equal_steps"]["iterative"]["return_mean"],
        "iterative_return_sd": result["equal_steps"]["iterative"]["return_sd"],
    }
    return result


def markdown(result: dict) -> str:
    s, w = result["equal_steps"], result["equal_wall_clock"]
    lines = [
        "HalfCheetah-v5, eval return (5 episodes per evaluation), mean ± SD over seeds (n − 1); "
        "direct β = 1, iterative β = 2.5.",
        "",
        "| comparison | direct | iterative |",
        "|---|---:|---:|",
        f"| equal env steps ({result['steps']:,}) | {s['direct']['return_mean']:.1f} ± "
        f"{s['direct']['return_sd']:.1f} ({s['direct']['seeds']} seeds) | "
        f"{s['iterative']['return_mean']:.1f} ± {s['iterative']['return_sd']:.1f} "
        f"({s['iterative']['seeds']} seeds) |",
        f"| equal wall-clock ({w['seconds'] / 3600:.2f} h of training; direct at "
        f"{', '.join(f'{x:,}' for x in w['direct_steps'])} steps) | "
        f"{w['direct_return_mean']:.1f} ± "
        f"{w['direct_return_sd']:.1f} | {w['iterative_return_mean']:.1f} ± "
        f"{w['iterative_return_sd']:.1f} |",
    ]
    per_seed = ", ".join(
        f"{a} " + " / ".join(f"{x:.0f}" for x in s[a]["returns"]) for a in ("direct", "iterative")
    )
    lines += ["", f"Per seed at {result['steps']:,} steps: {per_seed}."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, list[dict]]], result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"direct": "tab:blue", "iterative": "tab:orange"}
    for agent, trials in runs.items():
        for i, rows in enumerate(trials.values()):
            label = agent if i == 0 else None
            x = [r["step"] for r in rows]
            hours = [(r.get("train_seconds") or 0.0) / 3600 for r in rows]
            y = [r["eval_return_mean"] for r in rows]
            axes[0].plot(x, y, color=colors[agent], alpha=0.7, label=label)
            axes[1].plot(hours, y, color=colors[agent], alpha=0.7, label=label)
    axes[0].axvline(result["steps"], color="grey", ls=":")
    axes[1].axvline(result["equal_wall_clock"]["seconds"] / 3600, color="grey", ls=":")
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("training wall-clock (h)")
    for ax in axes:
        ax.set_ylabel("eval return")
        ax.legend()
    fig.suptitle("Fig. 5 at CPU scale: one line per seed (HalfCheetah-v5)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="env steps to compare at")
    p.add_argument("--learning", default=str(LEARNING))
    p.add_argument("--fig5", default=str(FIG5), help="the fig5 sweep's --keep folder")
    p.add_argument("--out", default="benchmarks/results/paper")
    args = p.parse_args()
    runs = curves(Path(args.learning), Path(args.fig5))
    result = summarize(runs, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fig5.json", json.dumps(result, indent=1))
    text = markdown(result)
    atomic_write_text(out / "fig5.md", text)
    plot(runs, result, out / "fig5.png")
    print(text, end="")
    print(f"written {out / 'fig5.json'}, fig5.md, fig5.png")


if __name__ == "__main__":
    main()
