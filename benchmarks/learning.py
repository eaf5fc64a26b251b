"""Learning curves of the direct and iterative agents (paper Fig. 5): a thin use of `mbplan sweep`.

A suite is one sweep per agent (their steps and β differ) in ``--out``/<suite>-<agent>/, run on
the sweep's local backend (trials side by side, ``--threads`` each) or on Ray (``--backend ray``).
Sweeps resume, so the script can be killed and restarted at any time. Then it writes
``results.csv``, ``results.md``, ``results.json`` and ``learning_curves.png`` (eval return, mean ±
SD over seeds, against env steps and against wall-clock) into ``--results``/<suite>, and copies
every run's eval rows to ``--results``/<suite>/evals/<trial-id>.jsonl (committed): a run folder
that is gone is read from there, so the committed results stay readable without the runs.

    python benchmarks/learning.py --suite pendulum          # CPU-sized (see SUITES)
    python benchmarks/learning.py --suite halfcheetah
    python benchmarks/learning.py --suite paper --device cuda   # the paper's protocol, on a GPU
    python benchmarks/learning.py --suite pendulum --report-only

The same sweeps by hand: ``mbplan sweep --name pendulum-direct --storage runs/learning
--env Pendulum-v1 --agent direct --seeds 0-2 --steps 10000 ...``, then
``mbplan sweep report runs/learning/pendulum-direct``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mbplan.options import TrainOptions
from mbplan.sweep import (
    EVAL_KEYS,
    MANIFEST,
    TrialRecord,
    aggregate,
    create_sweep,
    load_sweep,
    read_evals,
    read_trials,
    run_sweep,
    write_report,
)


@dataclass
class Spec:
    """One sweep of a suite: one env and agent, several seeds, shared train options."""

    env: str
    agent: str
    seeds: list[int]
    options: dict = field(default_factory=dict)

    def name(self, suite: str) -> str:
        return f"{suite}-{self.agent}"

    def trial_ids(self) -> list[str]:
        return [f"{self.env}-{self.agent}-s{s}" for s in self.seeds]


# Sized for a 2-core CPU (README gives the cost of each). The iterative agent uses the pessimism
# the reference recommends for it (β = 2.5); direct uses the default β = 1.
ITERATIVE = {"beta": 2.5}
PENDULUM = {"warmup": 1000, "eval_interval": 1000, "eval_episodes": 5, "checkpoint_interval": 1000}
CHEETAH = {"eval_interval": 5000, "eval_episodes": 5}
PAPER = {"eval_interval": 5000, "checkpoint_interval": 50_000, "steps": 3_000_000}
SUITES = {
    "pendulum": [
        Spec("Pendulum-v1", "direct", [0, 1, 2], {"steps": 10_000, **PENDULUM}),
        Spec("Pendulum-v1", "iterative", [0, 1, 2], {"steps": 10_000, **PENDULUM, **ITERATIVE}),
    ],
    "halfcheetah": [
        Spec(
            "HalfCheetah-v5",
            "direct",
            [0, 1, 2],
            {"steps": 100_000, "checkpoint_interval": 5000, **CHEETAH},
        ),
        Spec(
            "HalfCheetah-v5",
            "iterative",
            [0],
            {"steps": 50_000, "checkpoint_interval": 2500, **CHEETAH, **ITERATIVE},
        ),
    ],
    # The paper's protocol (3e6 updates, 5 tasks, both agents, 3 seeds): a GPU or cluster job.
    "paper": [
        Spec(env, agent, [0, 1, 2], {**PAPER, **(ITERATIVE if agent == "iterative" else {})})
        for env in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
        for agent in ("direct", "iterative")
    ],
}


def sweep_name(suite: str, spec: Spec) -> str:
    if suite == "paper":  # several envs per agent
        return f"paper-{spec.env}-{spec.agent}"
    return spec.name(suite)


def ensure_sweep(suite: str, spec: Spec, out: Path, args: argparse.Namespace):
    """The spec's sweep folder under ``out``: created on first use, else continued."""
    root = out / sweep_name(suite, spec)
    if (root / MANIFEST).is_file():
        sweep = load_sweep(root)
        sweep.backend = args.backend
        return sweep
    base = {**asdict(TrainOptions()), **spec.options, "device": args.device}
    seeds = [s for s in spec.seeds if args.seeds is None or s in args.seeds]
    axes = {"env": [spec.env], "agent": [spec.agent], "seed": seeds}
    return create_sweep(root, base, axes, backend=args.backend, threads_per_trial=args.threads)


def cached_records(spec: Spec, results: Path) -> list[TrialRecord]:
    """Records of the committed eval rows (``results/evals/<trial-id>.jsonl``)."""
    records = []
    for tid, seed in zip(spec.trial_ids(), spec.seeds):
        evals = read_evals(results / "evals" / f"{tid}.jsonl")
        if evals:
            cell = {"env": spec.env, "agent": spec.agent}
            last = evals[-1]
            records.append(
                TrialRecord(tid, cell, seed, evals, int(last["step"]), last.get("train_seconds"))
            )
    return records


def records(suite: str, out: Path, results: Path) -> list[TrialRecord]:
    """Every run's record: from its run folder, else from the committed copy (which it updates)."""
    merged: dict[str, TrialRecord] = {}
    for spec in SUITES[suite]:
        merged.update({r.id: r for r in cached_records(spec, results)})
        root = out / sweep_name(suite, spec)
        if not (root / MANIFEST).is_file():
            continue
        for record in read_trials(root):
            if len(record.evals) >= len(merged.get(record.id, record).evals):
                merged[record.id] = record
                cache = results / "evals" / f"{record.id}.jsonl"
                cache.parent.mkdir(parents=True, exist_ok=True)
                rows = [{k: r[k] for k in EVAL_KEYS if k in r} for r in record.evals]
                cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return list(merged.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="pendulum")
    p.add_argument("--out", default="runs/learning", help="folder of the sweeps (run folders)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    p.add_argument("--workers", type=int, default=0, help="trials at a time (0 = cores ÷ threads)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--agents", nargs="+", default=["direct", "iterative"])
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="only these seeds (new sweeps)"
    )
    p.add_argument(
        "--results",
        default="benchmarks/results/learning",
        help="where results.csv/md/json and learning_curves.png go (committed)",
    )
    p.add_argument("--report-only", action="store_true", help="only aggregate existing runs")
    args = p.parse_args()
    out, results = Path(args.out), Path(args.results) / args.suite
    results.mkdir(parents=True, exist_ok=True)

    def on_event(event) -> None:
        if event.kind == "done":
            print(f"done   {event.trial}: {event.step} steps, eval {event.last_eval}", flush=True)
        elif event.kind == "failed":
            print(f"FAILED {event.trial} at step {event.step}: {event.error}", flush=True)
        elif event.kind == "start":
            print(f"start  {event.trial} at step {event.step}", flush=True)

    if not args.report_only:
        for spec in SUITES[args.suite]:
            if spec.agent in args.agents:
                sweep = ensure_sweep(args.suite, spec, out, args)
                run_sweep(sweep, on_event, workers=args.workers)
    report = aggregate(records(args.suite, out, results))
    write_report(report, results, stem="results", title=f"{args.suite}: eval return, mean ± SD")
    for row in report.rows:
        print(
            f"{row['env']:16s} {row['agent']:9s} seeds={row['seeds']} "
            f"steps={row['steps_mean']:>9.0f}  final {row['final_return_mean']:8.1f} ± "
            f"{row['final_return_sd']:6.1f}  best {row['best_return_mean']:8.1f}  "
            f"wall {row['wall_clock_s_mean'] / 3600:.2f} h"
        )


if __name__ == "__main__":
    main()
