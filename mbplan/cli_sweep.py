"""``mbplan sweep`` and ``mbplan sweep report``: argument parsing and printing only.

The work is in :mod:`mbplan.sweep`; this module turns its events into a progress bar over trials
and one line per finished trial.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mbplan.agent import AGENTS
from mbplan.errors import UserError
from mbplan.options import TrainOptions, option

GRID_NAMES = ("env", "agent", "seed")  # own flags: --env, --agent, --seeds
SET_BY_SWEEP = ("out", "threads")  # the trial folder, --threads-per-trial


@dataclass
class SweepFlags:
    """Options of ``mbplan sweep`` itself; every other ``mbplan train`` option is shared by all."""

    name: str = option("", "sweep name; its folder is STORAGE/NAME")
    storage: str = option("runs/sweeps", "folder of sweeps (on a cluster: a path all nodes share)")
    env: list[str] = option(
        None, "env ids (a grid axis)", default_factory=lambda: ["HalfCheetah-v5"]
    )
    agent: list[str] = option(
        None, "agents (a grid axis)", default_factory=lambda: ["direct"], choices=AGENTS
    )
    seeds: list[str] = option(
        None, "seeds, e.g. 0-4 or 0,2,7 (a grid axis)", default_factory=lambda: ["0"]
    )
    set: list[str] = option(
        None,
        "a grid axis over any train option, e.g. --set beta=1,2.5 (repeat for more axes)",
        default_factory=list,
        action="extend",
    )
    backend: str = option("local", "where trials run", choices=("local", "ray"))
    threads_per_trial: int = option(1, "torch threads (and CPUs reserved) per trial")
    gpus_per_trial: float = option(0.0, "GPUs reserved per trial (ray backend)")
    workers: int = option(0, "trials at a time, local backend (0 = cores ÷ threads per trial)")
    cpus: int = option(0, "cores to use here, and the size of a local Ray instance (0 = all)")
    address: str = option(
        "", "Ray cluster to join: auto = the running one (default: RAY_ADDRESS, else a local one)"
    )
    max_failures: int = option(0, "retries of a failed trial, each from its newest checkpoint")
    resume: str = option("", "continue the sweep in this folder (DIR/NAME) after any kill")
    keep: str = option(
        "", "also keep each trial's eval curve and lean final checkpoint in KEEP/NAME"
    )
    dry_run: bool = option(False, "print each trial's estimated cost and launch nothing")


def _train_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(TrainOptions)
    shared = [f for f in fields(TrainOptions) if f.name not in (*GRID_NAMES, *SET_BY_SWEEP)]
    return [
        (f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
        for f in shared
    ]


def _own_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(SweepFlags)
    return [(f.name, hints[f.name], f) for f in fields(SweepFlags)]


# The flags of `mbplan sweep`: its own, then every `mbplan train` option shared by all trials.
SweepOptions = dataclasses.make_dataclass(
    "SweepOptions",
    [*_own_fields(), *_train_fields()],
    namespace={
        "__doc__": "Options of ``mbplan sweep``: SweepFlags plus the shared train options.",
        "__module__": __name__,
    },
)

RESUME_FLAGS = {"resume", "backend", "workers", "cpus", "address", "keep", "dry_run"}


@dataclass
class SweepReportOptions:
    """Options of ``mbplan sweep report DIR/NAME``."""

    sweep: str = option("", "the sweep folder DIR/NAME (or its --keep copy); also positional")
    out: str = option("", "folder of the report files (default DIR/NAME/report)")


def sweep_argv(argv: Sequence[str]) -> list[str]:
    """``sweep report DIR ...`` → ``["sweep report", "--sweep", DIR, ...]``; else unchanged.

    ``mbplan sweep`` takes flags while ``mbplan sweep report`` is a subcommand beside them, so the
    parser knows the report as one command named ``sweep report``.
    """
    argv = list(argv)
    if argv[:2] != ["sweep", "report"]:
        return argv
    rest = argv[2:]
    if rest and not rest[0].startswith("-"):
        rest = ["--sweep", *rest]
    return ["sweep report", *rest]


# -- mbplan sweep --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _load_or_create(opts: Any, explicit: set[str]):
    from mbplan import sweep as sw

    if opts.resume:
        extra = sorted(explicit - RESUME_FLAGS)
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise UserError(
                f"--resume continues the grid saved in {Path(opts.resume) / sw.MANIFEST}; "
                f"drop {flag}"
            )
        sweep = sw.load_sweep(opts.resume)
        if "backend" in explicit:
            sweep.backend = opts.backend
        if "keep" in explicit:
            sweep.keep = opts.keep
        if sweep.backend == "ray":
            sw.import_ray()
        return sweep
    if not opts.name:
        raise UserError("--name is required (or --resume DIR/NAME)")
    sets = sw.parse_sets(opts.set)
    both = sorted(k for k in sets if k in explicit)
    if both:
        raise UserError(f"--{both[0].replace('_', '-')} and --set {both[0]}: give it once")
    axes = {"env": opts.env, "agent": opts.agent, **sets, "seed": sw.parse_seeds(opts.seeds)}
    base = {name: getattr(opts, name) for name, _, _ in _train_fields()}
    if opts.backend == "ray":
        sw.import_ray()
    return sw.create_sweep(
        Path(opts.storage) / opts.name,
        base,
        axes,
        backend=opts.backend,
        threads_per_trial=opts.threads_per_trial,
        gpus_per_trial=opts.gpus_per_trial,
        max_failures=opts.max_failures,
        keep=opts.keep,
        write=not opts.dry_run,
    )


def _parallel(sweep: Any, opts: Any) -> tuple[int, str]:
    from mbplan.sweep import cpu_count

    if sweep.backend == "ray":
        return 0, f"Ray schedules them ({sweep.threads_per_trial} CPU each)"
    workers = opts.workers or max(1, (opts.cpus or cpu_count()) // sweep.threads_per_trial)
    return workers, f"{workers} at a time"


def _print_costs(sweep: Any, opts: Any) -> None:
    from mbplan.sweep import estimate_cost

    todo = [t for t in sweep.trials if not sweep.is_done(t)]
    costs = [estimate_cost(t, sweep.threads_per_trial) for t in todo]
    width = max([len("trial"), *(len(c.trial) for c in costs)])
    print(
        f"sweep {sweep.name}: {len(todo)} of {len(sweep.trials)} trials to run; estimated cost "
        f"of the updates at {sweep.threads_per_trial} thread(s) per trial (rough, ±2×)"
    )
    print(f"{'trial':<{width}}  {'updates':>9}  {'ms/update':>9}  {'hours':>7}")
    for c in costs:
        hours = c.seconds / 3600
        print(f"{c.trial:<{width}}  {c.updates:>9}  {c.ms_per_update:>9.1f}  {hours:>7.2f}")
    total = sum(c.seconds for c in costs)
    workers, how = _parallel(sweep, opts)
    line = f"total {total / 3600:.2f} trial-hours"
    if workers:
        line += f"; about {total / 3600 / min(workers, max(len(costs), 1)):.2f} h with {how}"
    print(line)


def sweep_cmd(opts: Any, explicit: set[str]) -> None:
    """Run (or continue) a sweep; a progress bar over trials and one line per finished trial."""
    from tqdm import tqdm

    from mbplan import sweep as sw

    sweep = _load_or_create(opts, explicit)
    if opts.dry_run:
        _print_costs(sweep, opts)
        return
    done = sum(sweep.is_done(t) for t in sweep.trials)
    _, how = _parallel(sweep, opts)
    print(
        f"sweep {sweep.name}: {len(sweep.trials)} trials ({done} finished, "
        f"{len(sweep.trials) - done} to run) on the {sweep.backend} backend, {how}; "
        f"folder {sweep.root}",
        flush=True,
    )
    bar = tqdm(
        total=len(sweep.trials),
        initial=done,
        unit="trial",
        desc=sweep.name,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    steps: dict[str, int] = {}

    def on_event(event: sw.TrialEvent) -> None:
        if event.kind in ("start", "progress"):
            steps[event.trial] = event.step
            if event.kind == "start" and event.step:
                bar.write(f"resume {event.trial} from step {event.step}")
            bar.set_postfix_str(f"{len(steps)} running, {sum(steps.values())} steps", refresh=False)
            return
        steps.pop(event.trial, None)
        if event.kind == "done":
            bar.write(
                f"done   {event.trial}: {event.step} steps, eval {_fmt(event.last_eval)}, "
                f"{_fmt(event.seconds, 0)} s"
            )
        else:
            bar.write(f"FAILED {event.trial} at step {event.step}: {event.error}")
        bar.update(1)

    start = time.perf_counter()
    try:
        counts = sw.run_sweep(
            sweep, on_event, workers=opts.workers, cpus=opts.cpus, address=opts.address
        )
    finally:
        bar.close()
    print(
        f"{counts['done']}/{counts['trials']} trials finished "
        f"({time.perf_counter() - start:.0f} s of wall-clock this time)"
    )
    if any(sw.read_evals(sweep.run_dir(t) / "metrics.jsonl") for t in sweep.trials):
        _, paths = sw.report_sweep(sweep.root)
        print(f"report: {paths[1]}")
    if counts["failed"]:
        raise UserError(
            f"{counts['failed']} trial(s) failed (lines above); fix the cause, then "
            f"mbplan sweep --resume {sweep.root}"
        )
    if sweep.keep:
        print(f"lean results kept in {Path(sweep.keep) / sweep.name}")


# -- mbplan sweep report -------------------------------------------------------------------------


def sweep_report_cmd(opts: SweepReportOptions) -> None:
    """Aggregate a sweep; print the Markdown table and where the files went."""
    from mbplan.sweep import markdown_table, report_sweep

    if not opts.sweep:
        raise UserError("give the sweep folder: mbplan sweep report DIR/NAME")
    report, paths = report_sweep(opts.sweep, opts.out or None)
    print(markdown_table(report), end="")
    print("written: " + ", ".join(str(p) for p in paths))
