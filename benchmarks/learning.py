"""Learning curves of the direct and iterative agents (paper Fig. 5), resumable.

Runs each (env, agent, seed) job through ``mbplan train`` in a subprocess, one after another, in
``--out``/<env>-<agent>-s<seed>. A job that has a checkpoint is resumed; a finished one is
skipped, so the script can be killed and restarted at any time. Then it writes ``results.csv``,
``results.json`` and ``learning_curves.png`` (eval return, mean ± std over seeds, against env
steps and against wall-clock) into ``--results``/<suite>.

    python benchmarks/learning.py --suite pendulum          # CPU-sized (see SUITES)
    python benchmarks/learning.py --suite halfcheetah
    python benchmarks/learning.py --suite paper --device cuda   # the paper's protocol, on a GPU
    python benchmarks/learning.py --suite pendulum --report-only

Progress goes to ``--out``/progress.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Job:
    env: str
    agent: str
    seed: int
    steps: int
    flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.env}-{self.agent}-s{self.seed}"


def _jobs(env: str, agents: dict[str, tuple[int, str]], seeds: list[int], flags: str) -> list[Job]:
    """Jobs for each agent (steps, extra flags) and seed, sharing ``flags``."""
    return [
        Job(env, agent, seed, steps, flags.split() + extra.split())
        for agent, (steps, extra) in agents.items()
        for seed in seeds
    ]


# Sized for a 2-core CPU (README gives the cost of each). The iterative agent uses the pessimism
# the reference recommends for it (β = 2.5); direct uses the default β = 1.
ITERATIVE = "--beta 2.5"
SUITES = {
    "pendulum": _jobs(
        "Pendulum-v1",
        {"direct": (10_000, ""), "iterative": (10_000, ITERATIVE)},
        [0, 1, 2],
        "--warmup 1000 --eval-interval 1000 --eval-episodes 5 --checkpoint-interval 1000",
    ),
    "halfcheetah": _jobs(
        "HalfCheetah-v5",
        {"direct": (100_000, "")},
        [0, 1, 2],
        "--eval-interval 5000 --eval-episodes 5 --checkpoint-interval 5000",
    )
    + _jobs(
        "HalfCheetah-v5",
        {"iterative": (50_000, ITERATIVE)},
        [0],
        "--eval-interval 5000 --eval-episodes 5 --checkpoint-interval 2500",
    ),
    # The paper's protocol (3e6 updates, 5 tasks, both agents, 3 seeds): a GPU job.
    "paper": [
        job
        for env in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
        for job in _jobs(
            env,
            {"direct": (3_000_000, ""), "iterative": (3_000_000, ITERATIVE)},
            [0, 1, 2],
            "--eval-interval 5000 --checkpoint-interval 50000",
        )
    ],
}


def run_dir_state(run: Path) -> int:
    """Env steps of the newest completed checkpoint (0 if none)."""
    latest = run / "latest"
    if not latest.is_file():
        return 0
    meta = run / latest.read_text().strip() / "meta.json"
    try:
        return int(json.loads(meta.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def run_job(job: Job, out: Path, device: str, threads: int, log) -> None:
    run = out / job.name
    done = run_dir_state(run)
    if done >= job.steps:
        log(f"{job.name}: done ({done} steps)")
        return
    cmd = [sys.executable, "-m", "mbplan.cli", "train"]
    if (run / "config.json").is_file() and done > 0:
        cmd += ["--resume", str(run), "--steps", str(job.steps), "--threads", str(threads)]
        log(f"{job.name}: resuming at {done}/{job.steps}")
    else:
        cmd += [
            "--env",
            job.env,
            "--agent",
            job.agent,
            "--seed",
            str(job.seed),
            "--steps",
            str(job.steps),
            "--out",
            str(run),
            "--device",
            device,
            "--threads",
            str(threads),
            *job.flags,
        ]
        log(f"{job.name}: starting ({job.steps} steps)")
    start = time.time()
    with open(out / f"{job.name}.log", "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    log(f"{job.name}: exit {rc} after {time.time() - start:.0f} s")
    if rc != 0:
        raise SystemExit(f"{job.name} failed (exit {rc}); see {out / (job.name + '.log')}")


def read_evals(run: Path) -> list[dict]:
    """Eval rows of a run folder's ``metrics.jsonl`` ([] if it has none)."""
    return read_evals_file(run / "metrics.jsonl")


def read_evals_file(path: Path) -> list[dict]:
    """Rows with ``eval_return_mean`` of a JSON-lines file ([] if missing)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "eval_return_mean" in rec:
            rows.append(rec)
    return rows


def cached_evals(job: Job, out: Path, results: Path) -> list[dict]:
    """Eval rows of ``job``: from its run folder when present, else from the committed copy.

    Every report copies each run's eval rows to ``results/evals/<job>.jsonl`` (committed), so
    the table and curves survive the loss of the run folders (which are kept out of git).
    """
    cache = results / "evals" / f"{job.name}.jsonl"
    rows = read_evals(out / job.name)
    cached = read_evals_file(cache)
    if rows and len(rows) >= len(cached):
        cache.parent.mkdir(parents=True, exist_ok=True)
        keep = ("step", "eval_return_mean", "eval_return_std", "train_seconds")
        tmp = cache.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in rows))
        tmp.replace(cache)
        return rows
    return cached


def report(jobs: list[Job], out: Path, results: Path) -> list[dict]:
    """Aggregate eval curves per (env, agent): table rows, CSV/JSON and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.env, j.agent), []).append(j)
    rows, curves = [], {}
    for (env, agent), js in groups.items():
        evals = {j.seed: cached_evals(j, out, results) for j in js}
        evals = {s: e for s, e in evals.items() if e}
        if not evals:
            continue
        steps = sorted(set.intersection(*(set(r["step"] for r in e) for e in evals.values())))
        if not steps:
            continue
        by_seed = {s: {r["step"]: r for r in e} for s, e in evals.items()}
        mean_curve = [np.mean([by_seed[s][t]["eval_return_mean"] for s in by_seed]) for t in steps]
        std_curve = [np.std([by_seed[s][t]["eval_return_mean"] for s in by_seed]) for t in steps]
        secs = [
            np.mean([by_seed[s][t].get("train_seconds", np.nan) for s in by_seed]) for t in steps
        ]
        curves[(env, agent)] = (steps, mean_curve, std_curve, secs)
        final = [by_seed[s][steps[-1]]["eval_return_mean"] for s in by_seed]
        rows.append(
            {
                "env": env,
                "agent": agent,
                "seeds": len(by_seed),
                "env_steps": steps[-1],
                "target_steps": js[0].steps,
                "final_return_mean": float(np.mean(final)),
                "final_return_std": float(np.std(final)),
                "best_return_mean": float(np.max(mean_curve)),
                "wall_clock_h": float(secs[-1] / 3600),
            }
        )
    if not rows:
        return rows
    with open(results / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (results / "results.json").write_text(json.dumps(rows, indent=1))

    envs = sorted({env for env, _ in curves})
    fig, axes = plt.subplots(len(envs), 2, figsize=(11, 3.8 * len(envs)), squeeze=False)
    for i, env in enumerate(envs):
        for agent, color in (("direct", "tab:blue"), ("iterative", "tab:orange")):
            if (env, agent) not in curves:
                continue
            steps, m, s, secs = (np.asarray(v, dtype=float) for v in curves[(env, agent)])
            n = rows[[(r["env"], r["agent"]) for r in rows].index((env, agent))]["seeds"]
            for ax, x in ((axes[i, 0], steps), (axes[i, 1], secs / 60)):
                ax.plot(x, m, color=color, label=f"{agent} ({n} seed{'s' if n > 1 else ''})")
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.2)
        axes[i, 0].set_xlabel("env steps")
        axes[i, 1].set_xlabel("wall-clock (minutes, this CPU)")
        for ax in axes[i]:
            ax.set_ylabel("eval return (deterministic)")
            ax.set_title(env)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle("Eval return, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(results / "learning_curves.png", dpi=120)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="pendulum")
    p.add_argument("--out", default="runs/learning", help="folder of all runs and the results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per job (0 = all)")
    p.add_argument("--agents", nargs="+", default=["direct", "iterative"])
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    p.add_argument(
        "--results",
        default="benchmarks/results/learning",
        help="where results.csv/json and learning_curves.png go (committed)",
    )
    p.add_argument("--report-only", action="store_true", help="only aggregate existing runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in SUITES[args.suite] if j.agent in args.agents]
    if args.seeds is not None:
        jobs = [j for j in jobs if j.seed in args.seeds]
    results = Path(args.results) / args.suite
    results.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(out / "progress.log", "a") as f:
            f.write(line + "\n")

    if not args.report_only:
        for job in jobs:
            run_job(job, out, args.device, args.threads, log)
            report(SUITES[args.suite], out, results)
    for row in report(SUITES[args.suite], out, results):
        print(
            f"{row['env']:16s} {row['agent']:9s} seeds={row['seeds']} steps={row['env_steps']:>7d}"
            f"  final {row['final_return_mean']:8.1f} ± {row['final_return_std']:6.1f}"
            f"  best {row['best_return_mean']:8.1f}  wall {row['wall_clock_h']:.2f} h"
        )


if __name__ == "__main__":
    main()
