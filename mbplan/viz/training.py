"""Learning curves and the iterative optimizer's per-step improvement (Fig. 5, 7, 12).

Reads run folders (``config.json`` + ``metrics.jsonl``, as written by ``mbplan train``) and groups
them by (env, agent), plus the value when it is ``model``; the runs of a group are its seeds.

* ``kind = eval``: the deterministic evaluation return (the ``eval_return_mean`` of each eval
  line), mean and std over the group's seeds at each env step.
* ``kind = improvement``: Ĵ(λ_N) − Ĵ(λ_0) of the iterative optimizer at training batches (the
  ``improvement`` field of the training-metric lines; iterative runs only), same aggregation.

The std is over seeds (population std, 0 with one seed); ``n_seeds`` says how many runs had a value
at that step (a run still training may be shorter). ``seconds`` is the mean over those seeds of
``train_seconds`` (eval lines; interpolated in step for improvement lines): with ``--x seconds``
the curves are drawn against it.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbplan.checkpoint import default_bundle
from mbplan.errors import UserError
from mbplan.options import option
from mbplan.report import format_table, new_figure, out_path, save_figure, write_csv

COLUMNS = ("kind", "group", "step", "seconds", "mean", "std", "n_seeds")
KINDS = ("eval", "improvement")


@dataclass
class TrainingOptions:
    """Options of ``mbplan viz training``."""

    runs: list[str] = option(
        None,
        "run folders (config.json + metrics.jsonl), each with the improvement curves of its "
        "fitted optimizers (RUN/optimizers/*); default: the bundled default's history",
        default_factory=list,
    )
    x: str = option(
        "steps", "x axis: env steps or training wall-clock seconds", choices=["steps", "seconds"]
    )
    out: str = option("mbplan-results", "folder for the data file and the figure")
    svg: bool = option(False, "also write the figure as SVG")


@dataclass
class RunCurves:
    """One run's series, each as (env step, value, train seconds) rows sorted by step.

    Attributes:
        group: Its group label, e.g. ``"Pendulum-v1 iterative"``.
        env: Its env id.
        series: ``kind`` → array [T, 3].
    """

    group: str
    env: str
    series: dict[str, np.ndarray]


def group_label(config: dict) -> str:
    """``"<env> <agent>"``, with ``" (model)"`` for a model-based value."""
    label = f"{config.get('env', '?')} {config.get('agent', '?')}"
    return label + (" (model)" if config.get("value") == "model" else "")


def read_run(folder: str | Path) -> RunCurves:
    """Parse one run folder's config and metrics (a torn last line of a live run is skipped).

    Raises:
        UserError: No such folder, no config.json, or no metrics.jsonl.
    """
    run = Path(folder)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    for name in ("config.json", "metrics.jsonl"):
        if not (run / name).is_file():
            raise UserError(f"not a run folder (no {name}): {run}")
    try:
        config = json.loads((run / "config.json").read_text())
    except ValueError:
        raise UserError(f"corrupt config.json in {run}") from None
    evals, improvements = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if "eval_return_mean" in rec:
            evals.append((rec["step"], rec["eval_return_mean"], rec.get("train_seconds", np.nan)))
        if "improvement" in rec:
            improvements.append((rec["step"], rec["improvement"], np.nan))
    series = {}
    if evals:
        series["eval"] = np.array(sorted(evals), dtype=float)  # (T, 3)
    if improvements:
        imp = np.array(sorted(improvements), dtype=float)  # (T, 3)
        if evals and np.isfinite(series["eval"][:, 2]).any():
            ev = series["eval"]
            ok = np.isfinite(ev[:, 2])
            imp[:, 2] = np.interp(imp[:, 0], ev[ok, 0], ev[ok, 2])
        series["improvement"] = imp
    return RunCurves(group_label(config), str(config.get("env", "?")), series)


def read_optimizers(folder: str | Path) -> list[RunCurves]:
    """Improvement curves of a run's fitted optimizers (``mbplan fit-optimizer`` history).

    Their x axis is the fit step (not env steps): each is its own group,
    ``"<env> fit-optimizer (<objective>)"``.
    """
    run = Path(folder)
    env = "?"
    if (run / "config.json").is_file():
        with contextlib.suppress(ValueError):
            env = str(json.loads((run / "config.json").read_text()).get("env", "?"))
    curves = []
    for meta_path in sorted(run.glob("optimizers/*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            continue
        history = meta.get("history")
        if not history:
            continue
        arr = np.array(history, dtype=float)  # (T, 4): step, improvement, loss, seconds
        series = {"improvement": arr[:, [0, 1, 3]]}
        group = f"{env} fit-optimizer ({meta.get('objective', meta_path.parent.name)})"
        curves.append(RunCurves(group, env, series))
    return curves


def aggregate(runs: list[RunCurves]) -> list[dict]:
    """CSV rows: per (kind, group, step) the mean and std over the runs that have that step."""
    by_key: dict[tuple[str, str], dict[float, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        for kind, arr in run.series.items():
            for step, value, seconds in arr:
                by_key[(kind, run.group)][step].append((value, seconds))
    rows = []
    for (kind, group), steps in sorted(
        by_key.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])
    ):
        for step in sorted(steps):
            values = np.array([v for v, _ in steps[step]])
            seconds = np.array([s for _, s in steps[step]])
            rows.append(
                {
                    "kind": kind,
                    "group": group,
                    "step": int(step),
                    "seconds": float(np.nanmean(seconds)) if np.isfinite(seconds).any() else "",
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                    "n_seeds": len(values),
                }
            )
    return rows


@dataclass
class CurveRow:
    """Summary of one group's final point."""

    group: str
    seeds: int
    last_step: int  # of its evaluations, else (an optimizer fit) of its improvement lines
    eval_mean: float | str  # "-" without evaluations
    eval_std: float | str
    improvement: str


def run(opts: TrainingOptions) -> None:
    """Read the runs, write ``training.csv`` and ``training.png``, print the last points."""
    folders = list(opts.runs)
    if not folders:
        folders = [str(default_bundle())]
    runs = [read_run(r) for r in folders]
    empty = [r for r, c in zip(folders, runs) if not c.series]
    runs += [c for r in folders for c in read_optimizers(r)]
    if not any(c.series for c in runs):
        raise UserError(f"no eval or improvement lines in the metrics of {', '.join(folders)}")
    rows = aggregate(runs)
    if opts.x == "seconds" and not any(r["seconds"] != "" for r in rows):
        raise UserError("no train_seconds in these runs' eval lines: use --x steps")
    csv_path = write_csv(out_path(opts, "training", ".csv"), rows, COLUMNS)
    figures = _plot(opts, rows, runs)

    summary = []
    for group in dict.fromkeys(r["group"] for r in rows):
        ev = [r for r in rows if r["group"] == group and r["kind"] == "eval"]
        imp = [r for r in rows if r["group"] == group and r["kind"] == "improvement"]
        seeds = sum(c.group == group for c in runs)
        last = ev[-1] if ev else {"step": imp[-1]["step"], "mean": "-", "std": "-"}
        summary.append(
            CurveRow(
                group,
                seeds,
                int(last["step"]),
                last["mean"],
                last["std"],
                f"{imp[-1]['mean']:.4g}" if imp else "-",
            )
        )
    for r in empty:
        print(f"note: {r} has no eval or improvement lines yet")
    print("last evaluation per group (return mean ± std over seeds; improvement Ĵ(λ_N) − Ĵ(λ_0))")
    print(format_table(summary))
    print(f"wrote {csv_path} and {', '.join(map(str, figures))}")


def _plot(opts: TrainingOptions, rows: list[dict], runs: list[RunCurves]) -> list:
    """One row of panels per env (returns are not comparable across envs): eval, improvement."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    env_of = {c.group: c.env for c in runs}
    envs = list(dict.fromkeys(env_of[g] for g in groups))
    fig, axes = new_figure(len(envs), len(kinds))
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    titles = {
        "eval": "evaluation return (deterministic tanh μ)",
        "improvement": "per-step improvement Ĵ(λ_N) − Ĵ(λ_0) (iterative)",
    }
    xlabel = "env steps" if opts.x == "steps" else "training wall-clock (s)"
    for row, env in enumerate(envs):
        for ax, kind in zip(axes[row], kinds):
            for group in (g for g in groups if env_of[g] == env):
                pts = [r for r in rows if r["group"] == group and r["kind"] == kind]
                if opts.x == "seconds":
                    pts = [r for r in pts if r["seconds"] != ""]
                if not pts:
                    continue
                x = np.array([r["step" if opts.x == "steps" else "seconds"] for r in pts], float)
                mean = np.array([r["mean"] for r in pts])
                std = np.array([r["std"] for r in pts])
                n = max(r["n_seeds"] for r in pts)
                label = f"{group} ({n} seed{'s' if n > 1 else ''})"
                marker = "." if len(x) < 30 else None
                ax.plot(x, mean, color=colors[group], label=label, marker=marker)
                ax.fill_between(x, mean - std, mean + std, color=colors[group], alpha=0.2, lw=0)
            if kind == "improvement":
                ax.axhline(0.0, color="k", lw=0.8, ls="--")
            fitted = any("fit-optimizer" in g for g in groups if env_of[g] == env)
            if kind == "improvement" and fitted and opts.x == "steps":
                ax.set_xlabel("env steps (training) or fit steps (fit-optimizer)")
            else:
                ax.set_xlabel(xlabel)
            ax.set_ylabel("return" if kind == "eval" else "Ĵ(λ_N) − Ĵ(λ_0)")
            ax.set_title(f"{env}: {titles[kind]}\nmean ± std over seeds", fontsize="medium")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
            else:  # e.g. no iterative run of this env: say so instead of empty axes
                ax.set_axis_off()
                ax.text(
                    0.5,
                    0.5,
                    f"{env}: no {kind} data in these runs",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="0.4",
                )
    return save_figure(fig, opts, "training")


COMMAND = (
    "training",
    "learning curves (mean ± std over seeds) and iterative improvement of run folders",
    TrainingOptions,
    run,
)
