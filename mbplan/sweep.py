"""Sweeps: grids of ``mbplan train`` runs that resume, on this machine or on a Ray cluster.

A sweep folder ``DIR/NAME`` holds ``sweep.json`` (the grid, every trial's options and state) and
one ordinary ``mbplan train`` run folder per trial, ``DIR/NAME/<trial-id>/``. Both backends run a
trial through :func:`run_trial`, i.e. the training loop of :class:`mbplan.train.Trainer`:

* ``local`` (default): one process per trial, ``cores ÷ threads per trial`` of them at a time; no
  extra install. A trial process stops as soon as it sees its driver gone.
* ``ray``: one Ray Tune function trainable per trial (``tune.with_resources``). Each mbplan
  checkpoint (weights, optimizer state, replay, RNG) travels as a Tune checkpoint through
  ``tune.report`` and comes back through ``tune.get_checkpoint()``; Ray's own experiment folder is
  ``DIR/NAME/tune`` (``RunConfig(storage_path=DIR/NAME, name="tune")``).

Resume after any kill, SIGKILL included: finished trials are kept, every other one continues from
its newest completed checkpoint, nothing is retrained from scratch.

Library code never prints: progress goes to an ``on_event`` callback as :class:`TrialEvent`.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import queue as queue_lib
import re
import shutil
import signal
import statistics
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mbplan.checkpoint import LATEST, atomic_write_text, completed_checkpoints
from mbplan.errors import UserError
from mbplan.options import TrainOptions
from mbplan.train import Trainer

MANIFEST = "sweep.json"
FORMAT = "mbplan-sweep"
BACKENDS = ("local", "ray")
TUNE_DIR = "tune"  # Ray's experiment folder inside the sweep folder
GRID_FLAGS = {"env": "--env", "agent": "--agent", "seed": "--seeds"}  # axes with their own flag
NOT_AXES = ("out", "threads")  # set by the sweep itself (trial folder, --threads-per-trial)
RAY_INSTALL = 'pip install -e ".[ray]" (or pip install "ray[tune]>=2.9")'


# -- the grid ------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One run of the grid.

    Attributes:
        id: Readable folder name built from the grid values (``<env>-<agent>-beta=2.5-s0``).
        options: Every :class:`TrainOptions` field except ``out``.
    """

    id: str
    options: dict[str, Any]

    def train_options(self, root: str | Path) -> TrainOptions:
        """The trial's options, training into ``root/<id>``."""
        return TrainOptions(**self.options, out=str(Path(root) / self.id))


def parse_seeds(tokens: Sequence[str]) -> list[int]:
    """Seeds from ``0-4``, ``0,2,7`` or several such tokens.

    Raises:
        UserError: Not integers or ranges.
    """
    seeds: list[int] = []
    for part in (p.strip() for t in tokens for p in str(t).split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if match is None:
            raise UserError(f"--seeds: {part!r} is not a seed or a range like 0-4")
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        seeds.extend(range(lo, hi + 1))
    return seeds


def _train_fields() -> dict[str, tuple[type, dict[str, Any]]]:
    """name → (type, field metadata) of every :class:`TrainOptions` field."""
    hints = typing.get_type_hints(TrainOptions)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in fields(TrainOptions)}


def parse_value(name: str, text: str) -> Any:
    """One ``--set`` value converted to the type of train option ``name``.

    Raises:
        UserError: Unknown option, or a value of the wrong type or outside its choices.
    """
    known = _train_fields()
    if name not in known:
        raise UserError(
            f"--set: unknown option {name!r}; choose from the options of `mbplan train`: "
            + ", ".join(n for n in known if n not in (*GRID_FLAGS, *NOT_AXES))
        )
    tp, meta = known[name]
    text = text.strip()
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            value: Any = lowered in ("true", "1", "yes", "on")
        elif tp is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            value = int(number)
        else:
            value = tp(text)
    except ValueError:
        raise UserError(f"--set {name}: {text!r} is not a valid {tp.__name__}") from None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"--set {name}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def parse_sets(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["beta=1,2.5", "iters=1,2,5"]`` → ``{"beta": [1.0, 2.5], "iters": [1, 2, 5]}``.

    Raises:
        UserError: Malformed item, unknown option, an axis given twice, no values, duplicates.
    """
    axes: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise UserError(f"--set {item!r}: write OPTION=V1,V2,... (e.g. --set beta=1,2.5)")
        if name in GRID_FLAGS:
            raise UserError(f"--set {name}: use {GRID_FLAGS[name]} for that axis")
        if name in NOT_AXES:
            why = "each trial's folder" if name == "out" else "--threads-per-trial"
            raise UserError(f"--set {name}: not a sweep axis (the sweep sets it: {why})")
        if name in axes:
            raise UserError(f"--set {name} given twice; list every value once: {name}=V1,V2")
        parsed = [parse_value(name, v) for v in values.split(",") if v.strip()]
        if not parsed:
            raise UserError(f"empty grid: --set {name}= has no values")
        axes[name] = parsed
    return axes


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def trial_id(options: dict[str, Any], axes: Sequence[str]) -> str:
    """Readable id of a trial: env, agent, every other axis as ``name=value``, then ``s<seed>``."""
    parts = [str(options["env"]), str(options["agent"])]
    parts += [f"{k}={_fmt_value(options[k])}" for k in axes if k not in GRID_FLAGS]
    parts.append(f"s{options['seed']}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def expand_grid(base: dict[str, Any], axes: dict[str, list[Any]]) -> list[Trial]:
    """Trials of the grid product, seeds varying fastest (one cell's seeds are neighbours).

    Args:
        base: Values of every :class:`TrainOptions` field except ``out`` shared by all trials.
        axes: Ordered axes, ``env``, ``agent``, any other option, ``seed`` last.

    Raises:
        UserError: An empty axis, or two trials with the same id.
    """
    for name, values in axes.items():
        if not values:
            flag = GRID_FLAGS.get(name, f"--set {name}")
            raise UserError(f"empty grid: {flag} gives no values")
    names = list(axes)
    trials, seen = [], set()
    for combo in itertools.product(*axes.values()):
        options = {**base, **dict(zip(names, combo))}
        tid = trial_id(options, names)
        if tid in seen:
            raise UserError(f"two trials would share the id {tid}: a value is listed twice")
        seen.add(tid)
        trials.append(Trial(tid, options))
    return trials


def validate_trials(trials: Sequence[Trial], check_device: bool = True) -> None:
    """Raise :class:`UserError` if any trial's options could not train (bad values, env ids)."""
    from mbplan.envs import make_env

    for trial in trials:
        opts = trial.train_options("unused")
        (opts if check_device else replace(opts, device="cpu")).validate()
    for env_id in dict.fromkeys(t.options["env"] for t in trials):
        make_env(env_id).close()


# -- the sweep folder ----------------------------------------------------------------------------


@dataclass
class Sweep:
    """A sweep folder's manifest (``sweep.json``), with each trial's state.

    Attributes:
        root: The sweep folder ``DIR/NAME``.
        axes: Grid axes in order (``env``, ``agent``, ``--set`` options, ``seed``).
        trials: Every trial of the grid.
        backend: ``local`` or ``ray``.
        threads_per_trial: Torch threads (and CPUs reserved) per trial.
        gpus_per_trial: GPUs reserved per trial (Ray backend).
        max_failures: Retries of a failed trial, each from its newest checkpoint.
        keep: Folder that also receives lean results (``KEEP/NAME``), or "".
        states: trial id → {"state": pending|running|done|failed, "error": ..., "result": ...}.
    """

    root: Path
    axes: dict[str, list[Any]]
    trials: list[Trial]
    backend: str = "local"
    threads_per_trial: int = 1
    gpus_per_trial: float = 0.0
    max_failures: int = 0
    keep: str = ""
    states: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The sweep's name (its folder's name)."""
        return self.root.name

    def run_dir(self, trial: Trial) -> Path:
        """The trial's mbplan run folder."""
        return self.root / trial.id

    def state(self, trial: Trial) -> str:
        """``pending``, ``running``, ``done`` or ``failed`` as last recorded."""
        return self.states.get(trial.id, {}).get("state", "pending")

    def is_done(self, trial: Trial) -> bool:
        """Whether the trial's run folder holds a checkpoint at its final step."""
        return completed_step(self.run_dir(trial)) >= int(trial.options["steps"])

    def set_state(self, trial: Trial, state: str, **extra: Any) -> None:
        """Record a trial's state (and error or result) and rewrite ``sweep.json``."""
        self.states[trial.id] = {"state": state, **extra}
        self.save()

    def save(self) -> None:
        """Write ``sweep.json`` atomically (temp file + rename)."""
        manifest = {
            "format": FORMAT,
            "version": 1,
            "mbplan_version": _version(),
            "name": self.name,
            "backend": self.backend,
            "threads_per_trial": self.threads_per_trial,
            "gpus_per_trial": self.gpus_per_trial,
            "max_failures": self.max_failures,
            "keep": self.keep,
            "axes": self.axes,
            "trials": [
                {"id": t.id, "options": t.options, **self.states.get(t.id, {"state": "pending"})}
                for t in self.trials
            ],
        }
        atomic_write_text(self.root / MANIFEST, json.dumps(manifest, indent=1))


def _version() -> str:
    import mbplan

    return mbplan.__version__


def create_sweep(
    root: str | Path,
    base: dict[str, Any],
    axes: dict[str, list[Any]],
    *,
    backend: str = "local",
    threads_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    max_failures: int = 0,
    keep: str = "",
    write: bool = True,
) -> Sweep:
    """Expand and validate a grid; write ``root/sweep.json`` unless ``write`` is False (dry run).

    Args:
        root: The sweep folder ``DIR/NAME``; must not hold a sweep or anything else yet.
        base: Shared :class:`TrainOptions` values (every field but ``out``).
        axes: Grid axes, see :func:`expand_grid`.
        backend: ``local`` or ``ray``.
        threads_per_trial: Torch threads per trial (its ``threads`` option).
        gpus_per_trial: GPUs per trial (Ray backend).
        max_failures: Retries of a failed trial.
        keep: Folder for lean results, or "".
        write: Create the folder and its manifest.

    Raises:
        UserError: Bad grid or options, a folder that is already a sweep or not empty.
    """
    root = Path(root)
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if threads_per_trial < 1:
        raise UserError("--threads-per-trial must be >= 1")
    if gpus_per_trial < 0 or max_failures < 0:
        raise UserError("--gpus-per-trial and --max-failures must be >= 0")
    if not root.name or root.name in (".", ".."):
        raise UserError("--name is required (the sweep's folder is STORAGE/NAME)")
    if (root / MANIFEST).is_file():
        raise UserError(f"{root} already holds a sweep; continue it with --resume {root}")
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not empty; choose another --name or --storage")
    base = {**base, "threads": threads_per_trial}
    base.pop("out", None)
    trials = expand_grid(base, axes)
    validate_trials(trials, check_device=backend == "local")
    sweep = Sweep(
        root, axes, trials, backend, threads_per_trial, gpus_per_trial, max_failures, keep
    )
    if write:
        root.mkdir(parents=True, exist_ok=True)
        sweep.save()
    return sweep


def load_sweep(root: str | Path) -> Sweep:
    """Read a sweep folder's manifest.

    Raises:
        UserError: Not a sweep folder, or a corrupt manifest.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"not a sweep folder (no {MANIFEST}): {root}")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError("not an mbplan sweep manifest")
        known = {f.name for f in fields(TrainOptions)} - {"out"}
        trials, states = [], {}
        for entry in data["trials"]:
            options = {k: v for k, v in entry["options"].items() if k in known}
            trials.append(Trial(entry["id"], options))
            states[entry["id"]] = {k: v for k, v in entry.items() if k not in ("id", "options")}
        return Sweep(
            root=root,
            axes=dict(data["axes"]),
            trials=trials,
            backend=data.get("backend", "local"),
            threads_per_trial=int(data.get("threads_per_trial", 1)),
            gpus_per_trial=float(data.get("gpus_per_trial", 0.0)),
            max_failures=int(data.get("max_failures", 0)),
            keep=data.get("keep", ""),
            states=states,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"corrupt {path}: {exc}") from None


@contextlib.contextmanager
def driver_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.sweep.lock`` (an OS lock, released even on SIGKILL) while a driver runs.

    Raises:
        UserError: Another driver runs this sweep.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(root / ".sweep.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UserError(f"{root} is being run by another mbplan sweep (pid {pid})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- one trial -----------------------------------------------------------------------------------


def completed_step(run_dir: str | Path) -> int:
    """Env step of the newest completed checkpoint in a run folder (0 if none)."""
    for ckpt in reversed(completed_checkpoints(run_dir)):
        try:
            return int(json.loads((ckpt / "meta.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            continue
    return 0


def prepare_run_dir(run_dir: str | Path) -> int:
    """Make a trial's folder ready: keep it if it has a completed checkpoint, else remove it.

    Returns:
        The step to resume from (0: start afresh in an empty folder).
    """
    run_dir = Path(run_dir)
    step = completed_step(run_dir)
    if step == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    return step


def run_trial(
    opts: TrainOptions,
    on_progress: Callable[[int, dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    stop_on_signals: bool = False,
) -> dict[str, Any]:
    """Train one trial in ``opts.out``: resume from its newest checkpoint, else start afresh.

    Args:
        opts: The trial's options (``out`` is its run folder).
        on_progress: Passed to :class:`Trainer` (after every env step).
        on_checkpoint: Passed to :class:`Trainer` (after every checkpoint).
        stop_on_signals: SIGINT / SIGTERM write a checkpoint and end the trial (a trial process
            of its own; only from the main thread).

    Returns:
        The trainer's summary plus ``resumed_from`` (the step it continued from).
    """
    resumed_from = prepare_run_dir(opts.out)
    trainer = Trainer(
        opts, resume=resumed_from > 0, on_progress=on_progress, on_checkpoint=on_checkpoint
    )
    if stop_on_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: trainer.request_stop())
    summary = trainer.run()
    return {**summary, "resumed_from": resumed_from, "train_seconds": trainer.train_seconds}


@dataclass
class TrialEvent:
    """What the driver reports about a trial (to the CLI's progress bar and lines).

    Attributes:
        kind: ``start``, ``progress``, ``done`` or ``failed``.
        trial: The trial id.
        step: Env steps reached (``start``: the step it resumes from).
        steps: The trial's total env steps.
        last_eval: Latest evaluation return, if any.
        seconds: Training wall-clock so far (``done``).
        error: One line (``failed``).
    """

    kind: str
    trial: str
    step: int = 0
    steps: int = 0
    last_eval: float | None = None
    seconds: float | None = None
    error: str = ""


EventFn = Callable[[TrialEvent], None]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def _checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    for ckpt in reversed(completed_checkpoints(run_dir)):
        try:
            return json.loads((ckpt / "meta.json").read_text())
        except (OSError, ValueError):
            continue
    return {}


def _finish(sweep: Sweep, trial: Trial, on_event: EventFn) -> None:
    """Record a finished trial, keep its lean results, and report it."""
    meta = _checkpoint_meta(sweep.run_dir(trial))
    result = {
        "steps": meta.get("step"),
        "last_eval": meta.get("last_eval"),
        "train_seconds": meta.get("train_seconds"),
    }
    if sweep.keep:
        keep_trial(sweep, trial)
    sweep.set_state(trial, "done", result=result)
    on_event(
        TrialEvent(
            "done",
            trial.id,
            int(meta.get("step", 0)),
            int(trial.options["steps"]),
            meta.get("last_eval"),
            meta.get("train_seconds"),
        )
    )


# -- local backend -------------------------------------------------------------------------------


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _local_worker(trial: dict, run_dir: str, driver: int, events: Any) -> None:
    """A trial process: train, post progress, stop at once if the driver is gone."""
    opts = TrainOptions(**trial["options"], out=run_dir)
    every = max(1, opts.steps // 100)

    def on_progress(step: int, info: dict[str, Any]) -> None:
        if os.getppid() != driver:  # the driver died (even by SIGKILL): its checkpoints remain
            os._exit(3)
        if step % every == 0:
            events.put(("progress", trial["id"], step, info.get("eval")))

    code = 0
    try:
        summary = run_trial(opts, on_progress, stop_on_signals=True)
        if summary.get("interrupted"):
            message = f"stopped by a signal at step {summary['steps']} (checkpoint written)"
            events.put(("failed", trial["id"], message, None))
            code = 4
    except Exception as exc:  # a trial's failure is reported; the sweep goes on
        events.put(("failed", trial["id"], _one_line(exc), None))
        code = 1
    events.close()
    events.join_thread()
    sys.exit(code)


def run_local(sweep: Sweep, on_event: EventFn, workers: int = 0, cpus: int = 0) -> None:
    """Run the unfinished trials of ``sweep`` in parallel processes on this machine.

    Args:
        sweep: The sweep (its manifest is updated as trials start and end).
        on_event: Receives every :class:`TrialEvent`.
        workers: Trials at a time (0: ``cpus ÷ threads per trial``, at least 1).
        cpus: Cores to use (0: all of this process's).
    """
    import multiprocessing as mp

    workers = workers or max(1, (cpus or cpu_count()) // sweep.threads_per_trial)
    ctx = mp.get_context("spawn")  # a fresh interpreter per trial: no inherited torch threads
    events = ctx.Queue()
    todo = [t for t in sweep.trials if not sweep.is_done(t)]
    by_id = {t.id: t for t in sweep.trials}
    running: dict[str, Any] = {}
    errors: dict[str, str] = {}
    failures: dict[str, int] = {}

    def handle(message: tuple) -> None:
        kind, tid, payload, extra = message
        trial = by_id[tid]
        if kind == "progress":
            on_event(TrialEvent("progress", tid, payload, int(trial.options["steps"]), extra))
        elif kind == "failed":
            errors[tid] = payload

    def drain(timeout: float) -> None:
        with contextlib.suppress(queue_lib.Empty):
            handle(events.get(timeout=timeout))
            while True:
                handle(events.get_nowait())

    try:
        while todo or running:
            while todo and len(running) < workers:
                trial = todo.pop(0)
                start = prepare_run_dir(sweep.run_dir(trial))
                sweep.set_state(trial, "running")
                process = ctx.Process(
                    target=_local_worker,
                    args=(asdict(trial), str(sweep.run_dir(trial)), os.getpid(), events),
                    name=f"mbplan-trial-{trial.id}",
                )
                process.start()
                running[trial.id] = process
                on_event(TrialEvent("start", trial.id, start, int(trial.options["steps"])))
            drain(0.5)
            for tid, process in list(running.items()):
                if process.exitcode is None:
                    continue
                process.join()
                drain(0.2)  # the last messages of the process
                del running[tid]
                trial = by_id[tid]
                if process.exitcode == 0 and sweep.is_done(trial):
                    _finish(sweep, trial, on_event)
                    continue
                error = errors.pop(tid, f"trial process died (exit code {process.exitcode})")
                failures[tid] = failures.get(tid, 0) + 1
                if failures[tid] <= sweep.max_failures:
                    todo.append(trial)  # retried from its newest checkpoint
                    continue
                sweep.set_state(trial, "failed", error=error)
                on_event(
                    TrialEvent(
                        "failed",
                        tid,
                        completed_step(sweep.run_dir(trial)),
                        int(trial.options["steps"]),
                        error=error,
                    )
                )
    finally:  # interrupted: each trial writes a checkpoint and stops; --resume continues it
        for process in running.values():
            process.terminate()  # SIGTERM
        for process in running.values():
            process.join(120)
            if process.exitcode is None:
                process.kill()


# -- Ray Tune backend ----------------------------------------------------------------------------


def import_ray() -> Any:
    """The ``ray`` module, with Tune.

    Raises:
        UserError: Ray (with Tune) is not installed.
    """
    try:
        import ray
        import ray.tune
    except ImportError:
        raise UserError(
            f"--backend ray needs Ray Tune, which is not installed: {RAY_INSTALL}"
        ) from None
    return ray


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link a finished checkpoint's files (they are never rewritten); copy across disks."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def _tune_report(run_dir: Path, checkpoint: Path, steps: int) -> None:
    """Report a checkpoint to Tune: a run folder with that one checkpoint (a Tune checkpoint)."""
    from ray import tune

    meta = json.loads((checkpoint / "meta.json").read_text())
    stage = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.tune-", dir=run_dir.parent))
    try:
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy2(run_dir / name, stage / name)
        _link_or_copy_tree(checkpoint, stage / checkpoint.name)
        (stage / LATEST).write_text(checkpoint.name + "\n")
        last_eval = meta.get("last_eval")
        metrics = {
            "step": int(meta["step"]),
            "eval_return_mean": math.nan if last_eval is None else float(last_eval),
            "train_seconds": float(meta.get("train_seconds", 0.0)),
            "finished": int(meta["step"]) >= steps,
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _restore_from(source: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` by a Tune checkpoint's run folder when that one is newer."""
    if completed_step(source) > completed_step(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(source, run_dir)


def _ray_trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable: one mbplan trial, checkpoints through ``tune.report``."""
    from ray import tune

    trial = config["trial"]
    opts = TrainOptions(**trial["options"], out=trial["run_dir"])
    run_dir = Path(opts.out)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restored trial, maybe on another node
        with checkpoint.as_directory() as folder:
            _restore_from(Path(folder), run_dir)
    reported = []

    def on_checkpoint(path: Path) -> None:
        _tune_report(run_dir, path, opts.steps)
        reported.append(path)

    run_trial(opts, on_checkpoint=on_checkpoint)
    if not reported:  # it had finished before a restart: report its final checkpoint once
        _tune_report(run_dir, completed_checkpoints(run_dir)[-1], opts.steps)


def _trial_dirname(trial: Any) -> str:
    return trial.config["trial"]["id"]


_listener: list[EventFn] = []  # the driver's current on_event; Tune pickles callbacks, not this
_callback_class: type | None = None


def _emit(kind: str, trial: Any, result: dict | None = None, error: str = "") -> None:
    """Pass a Tune trial event to the current listener as a :class:`TrialEvent`."""
    if not _listener:
        return
    spec = trial.config["trial"]
    result = result or trial.last_result or {}
    last_eval = result.get("eval_return_mean")
    if isinstance(last_eval, float) and math.isnan(last_eval):
        last_eval = None
    steps = int(spec["options"]["steps"])
    step = int(result.get("step", 0) or 0)
    seconds = result.get("train_seconds")
    _listener[-1](TrialEvent(kind, spec["id"], step, steps, last_eval, seconds, error))


def tune_events_class() -> type:
    """The Tune callback class (built on first use: Ray is optional).

    It is reachable as ``mbplan.sweep.TuneEvents``, so the ``tuner.pkl`` that Tune writes refers
    to it by name and a restored sweep gets the new driver's listener, never the old one's.
    """
    global _callback_class
    if _callback_class is None:
        from ray import tune

        class TuneEvents(tune.Callback):
            """Tune's trial events → :class:`TrialEvent` for the driver's listener."""

            def on_trial_start(self, iteration, trials, trial, **info):
                _emit("start", trial)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                _emit("progress", trial, result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                _emit("ray-complete", trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                _emit("ray-error", trial, error=_ray_error(trial))

        TuneEvents.__module__ = __name__
        _callback_class = TuneEvents
    return _callback_class


def __getattr__(name: str) -> Any:
    if name == "TuneEvents":  # unpickling a restored Tuner's callbacks
        return tune_events_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ray_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    text = ""
    with contextlib.suppress(OSError, TypeError):
        text = Path(path).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed (see Ray's logs)"


def run_ray(sweep: Sweep, on_event: EventFn, address: str = "", cpus: int = 0) -> None:
    """Run the unfinished trials of ``sweep`` on Ray Tune, restoring Ray's experiment if any.

    Args:
        sweep: The sweep.
        on_event: Receives every :class:`TrialEvent` (from a Tune callback in this process).
        address: Ray cluster to join (``auto``: the running one); "" uses ``RAY_ADDRESS`` when
            set, else starts a local instance.
        cpus: CPUs of a local instance (0: all); ignored when joining a cluster.

    Raises:
        UserError: Ray is not installed.
    """
    import logging

    ray = import_ray()
    from ray import tune

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
    started = False
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        joining = bool(address or os.environ.get("RAY_ADDRESS"))
        try:
            if joining:
                ray.init(address=address or None, **quiet)
            else:
                ray.init(num_cpus=cpus or None, include_dashboard=False, **quiet)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
            where = (
                f"join the Ray cluster at {address or os.environ['RAY_ADDRESS']}"
                if joining
                else ("start a local Ray instance")
            )
            raise UserError(f"Ray could not {where}: {_one_line(exc)}") from None
        started = True
    experiment = str(sweep.root.resolve() / TUNE_DIR)
    resources = {"cpu": sweep.threads_per_trial, "gpu": sweep.gpus_per_trial}
    trainable = tune.with_resources(_ray_trainable, resources)
    by_id = {t.id: t for t in sweep.trials}
    failed: dict[str, str] = {}

    def listener(event: TrialEvent) -> None:
        trial = by_id[event.trial]
        if event.kind == "ray-error":
            failed[trial.id] = event.error
        elif event.kind == "ray-complete":
            if sweep.is_done(trial):  # else its run folder is on another node: after fit()
                _finish(sweep, trial, on_event)
        else:
            if event.kind == "start":
                sweep.set_state(trial, "running")
            on_event(event)

    _listener.append(listener)
    try:
        if tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        else:
            todo = [t for t in sweep.trials if not sweep.is_done(t)]
            if not todo:
                return
            space = [
                {"id": t.id, "options": t.options, "run_dir": str(sweep.run_dir(t).resolve())}
                for t in todo
            ]
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(space)},
                tune_config=tune.TuneConfig(
                    trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=str(sweep.root.resolve()),
                    verbose=0,
                    callbacks=[tune_events_class()()],
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                ),
            )
        results = tuner.fit()
        for result in results:
            trial = by_id[result.config["trial"]["id"]]
            if result.checkpoint is not None:  # a trial that ran on a node without this disk
                with result.checkpoint.as_directory() as folder:
                    _restore_from(Path(folder), sweep.run_dir(trial))
            if sweep.is_done(trial):
                if sweep.state(trial) != "done":
                    _finish(sweep, trial, on_event)
                continue
            error = failed.get(trial.id) or (
                _one_line(result.error) if result.error else "trial stopped before its last step"
            )
            sweep.set_state(trial, "failed", error=error)
            on_event(
                TrialEvent(
                    "failed",
                    trial.id,
                    completed_step(sweep.run_dir(trial)),
                    int(trial.options["steps"]),
                    error=error,
                )
            )
    finally:
        _listener.remove(listener)
        if started:
            ray.shutdown()


# -- the whole sweep -----------------------------------------------------------------------------


def run_sweep(
    sweep: Sweep,
    on_event: EventFn,
    *,
    workers: int = 0,
    cpus: int = 0,
    address: str = "",
) -> dict[str, int]:
    """Run every unfinished trial of ``sweep`` on its backend; finished ones are kept.

    Args:
        sweep: From :func:`create_sweep` or :func:`load_sweep`.
        on_event: Receives every :class:`TrialEvent`.
        workers: Local backend: trials at a time (0: cores ÷ threads per trial).
        cpus: Cores of this machine to use / of a local Ray instance (0: all).
        address: Ray backend: cluster address (see :func:`run_ray`).

    Returns:
        Counts: ``trials``, ``done`` and ``failed``.

    Raises:
        UserError: Another driver runs this sweep; Ray missing.
    """
    if sweep.backend == "ray":
        import_ray()
    with driver_lock(sweep.root):
        for trial in sweep.trials:  # trials finished before a kill that the manifest missed
            if sweep.is_done(trial) and sweep.state(trial) != "done":
                _finish(sweep, trial, lambda event: None)
        if sweep.keep:
            for trial in sweep.trials:
                if sweep.is_done(trial) and not (_keep_root(sweep) / trial.id / "final").exists():
                    keep_trial(sweep, trial)
        if sweep.backend == "ray":
            run_ray(sweep, on_event, address=address, cpus=cpus)
        else:
            run_local(sweep, on_event, workers=workers, cpus=cpus)
    done = sum(sweep.is_done(t) for t in sweep.trials)
    failed = sum(sweep.state(t) == "failed" for t in sweep.trials)
    return {"trials": len(sweep.trials), "done": done, "failed": failed}


# -- lean results that survive the machine (--keep) ----------------------------------------------

EVAL_KEYS = ("step", "eval_return_mean", "eval_return_std", "train_seconds")


def read_evals(metrics: str | Path) -> list[dict[str, Any]]:
    """Eval rows (step, return mean/std, train_seconds) of a ``metrics.jsonl`` ([] if missing)."""
    path = Path(metrics)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a half-written tail
            continue
        if isinstance(record, dict) and "eval_return_mean" in record:
            rows.append({k: record[k] for k in EVAL_KEYS if k in record})
    return rows


def _keep_root(sweep: Sweep) -> Path:
    return Path(sweep.keep) / sweep.name


def keep_trial(sweep: Sweep, trial: Trial) -> Path:
    """Copy a finished trial's lean results to ``KEEP/NAME/<trial-id>/``.

    That is its eval curve (``eval_curve.json`` and ``.csv``) and its final checkpoint exported as
    ``mbplan export`` writes one (``final/``: weights, config, metrics; no replay or optimizer
    state). ``KEEP/NAME/sweep.json`` is a copy of the manifest, so ``mbplan sweep report KEEP/NAME``
    works without the run folders.
    """
    from mbplan.checkpoint import export_bundle

    out = _keep_root(sweep) / trial.id
    out.mkdir(parents=True, exist_ok=True)
    rows = read_evals(sweep.run_dir(trial) / "metrics.jsonl")
    atomic_write_text(out / "eval_curve.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "eval_curve.csv", _csv_text(rows, list(EVAL_KEYS)))
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    export_bundle(sweep.run_dir(trial), final)
    shutil.copyfile(sweep.root / MANIFEST, _keep_root(sweep) / MANIFEST)
    return out


def _csv_text(rows: Sequence[dict[str, Any]], columns: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- report --------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """What a report needs from one trial.

    Attributes:
        id: Trial id.
        cell: Grid values except the seed (the trial's cell).
        seed: Its seed.
        evals: Eval rows, step order (``step``, ``eval_return_mean``, ``train_seconds``).
        steps: Env steps it reached (newest checkpoint; else the last eval's step).
        seconds: Training wall-clock at that point (``train_seconds``), if known.
    """

    id: str
    cell: dict[str, Any]
    seed: int
    evals: list[dict[str, Any]]
    steps: int
    seconds: float | None


def read_trials(root: str | Path) -> list[TrialRecord]:
    """Records of every trial of a sweep folder, or of a ``--keep`` copy of one.

    Each trial's evals come from its run folder's ``metrics.jsonl``, else from the kept
    ``eval_curve.json``; trials with neither are left out.
    """
    sweep = load_sweep(root)
    axes = [a for a in sweep.axes if a != "seed"]
    records = []
    for trial in sweep.trials:
        folder = sweep.run_dir(trial)
        evals = read_evals(folder / "metrics.jsonl")
        meta = _checkpoint_meta(folder)
        if not evals and (folder / "eval_curve.json").is_file():
            evals = json.loads((folder / "eval_curve.json").read_text())
            meta = _checkpoint_meta(folder / "final")
        if not evals:
            continue
        last = evals[-1]
        steps = int(meta.get("step", last["step"]))
        seconds = meta.get("train_seconds", last.get("train_seconds"))
        cell = {a: trial.options[a] for a in axes}
        records.append(
            TrialRecord(
                trial.id,
                cell,
                int(trial.options["seed"]),
                evals,
                steps,
                None if seconds is None else float(seconds),
            )
        )
    return records


@dataclass
class Curve:
    """A cell's learning curve at the eval steps every seed reached."""

    steps: list[int]
    mean: list[float]
    sd: list[float]
    seconds: list[float]  # mean train_seconds at those steps


@dataclass
class SweepReport:
    """Per-cell aggregates over seeds.

    Attributes:
        axes: Columns naming a cell (the grid axes but the seed).
        rows: One dict per cell: its axis values, ``seeds``, and mean/SD of the final and best
            eval return, env steps and wall-clock seconds (SD over seeds with n − 1; empty for one
            seed).
        curves: Cell label → :class:`Curve`.
    """

    axes: list[str]
    rows: list[dict[str, Any]]
    curves: dict[str, Curve]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def cell_label(cell: dict[str, Any]) -> str:
    """``HalfCheetah-v5 direct beta=2.5``: a cell's values, the non-env/agent ones named."""
    return " ".join(
        str(v) if k in ("env", "agent") else f"{k}={_fmt_value(v)}" for k, v in cell.items()
    )


def aggregate(records: Sequence[TrialRecord]) -> SweepReport:
    """Mean ± SD over seeds per cell of final and best eval return, steps and wall-clock."""
    cells: dict[str, list[TrialRecord]] = {}
    for record in records:
        cells.setdefault(cell_label(record.cell), []).append(record)
    axes = list(records[0].cell) if records else []
    rows, curves = [], {}
    for label, group in cells.items():
        row: dict[str, Any] = {**group[0].cell, "seeds": len(group)}
        stats = {
            "final_return": [r.evals[-1]["eval_return_mean"] for r in group],
            "best_return": [max(e["eval_return_mean"] for e in r.evals) for r in group],
            "steps": [float(r.steps) for r in group],
            "wall_clock_s": [r.seconds for r in group if r.seconds is not None],
        }
        for name, values in stats.items():
            mean, sd = _mean_sd(values) if values else (math.nan, math.nan)
            row[f"{name}_mean"], row[f"{name}_sd"] = mean, sd
        rows.append(row)
        by_seed = [{e["step"]: e for e in r.evals} for r in group]
        common = sorted(set.intersection(*(set(s) for s in by_seed)))
        curve = Curve([], [], [], [])
        for step in common:
            mean, sd = _mean_sd([s[step]["eval_return_mean"] for s in by_seed])
            secs = [s[step]["train_seconds"] for s in by_seed if "train_seconds" in s[step]]
            curve.steps.append(int(step))
            curve.mean.append(mean)
            curve.sd.append(0.0 if math.isnan(sd) else sd)
            curve.seconds.append(statistics.fmean(secs) if secs else math.nan)
        curves[label] = curve
    return SweepReport(axes, rows, curves)


def _md_number(mean: float, sd: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def markdown_table(report: SweepReport) -> str:
    """The report as a Markdown table (mean ± SD over seeds)."""
    head = [*report.axes, "seeds", "final return", "best return", "env steps", "wall-clock (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rows:
        cells = [_fmt_value(row[a]) for a in report.axes] + [str(row["seeds"])]
        cells += [
            _md_number(row["final_return_mean"], row["final_return_sd"]),
            _md_number(row["best_return_mean"], row["best_return_sd"]),
            _md_number(row["steps_mean"], row["steps_sd"], 0),
            _md_number(row["wall_clock_s_mean"], row["wall_clock_s_sd"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(report: SweepReport, path: str | Path, title: str = "") -> Path:
    """Learning curves, one row per env: by env steps (left) and by wall-clock (right).

    Each cell is its mean eval return with a shaded ± SD band over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    envs = list(dict.fromkeys(str(r.get("env", "")) for r in report.rows)) or [""]
    fig, axes = plt.subplots(len(envs), 2, figsize=(11, 3.8 * len(envs)), squeeze=False)
    for row in report.rows:
        label = cell_label({a: row[a] for a in report.axes})
        curve = report.curves[label]
        if not curve.steps:
            continue
        i = envs.index(str(row.get("env", "")))
        m, s = np.asarray(curve.mean), np.asarray(curve.sd)
        short = label.removeprefix(str(row.get("env", ""))).strip() or label
        n = row["seeds"]
        for ax, x in (
            (axes[i, 0], np.asarray(curve.steps)),
            (axes[i, 1], np.asarray(curve.seconds)),
        ):
            (line,) = ax.plot(x, m, label=f"{short} ({n} seed{'s' if n > 1 else ''})")
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2)
    for i, env in enumerate(envs):
        axes[i, 0].set_xlabel("env steps")
        axes[i, 1].set_xlabel("wall-clock of training (s)")
        for ax in axes[i]:
            ax.set_ylabel("eval return (deterministic)")
            ax.set_title(env)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title or "Eval return, mean ± SD over seeds")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    report: SweepReport, out: str | Path, stem: str = "report", title: str = ""
) -> list[Path]:
    """Write ``<stem>.csv``, ``.md`` and ``.json`` and ``learning_curves.png`` into ``out``.

    Returns:
        The written files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(report.rows[0]) if report.rows else [*report.axes, "seeds"]
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.json"]
    atomic_write_text(paths[0], _csv_text(report.rows, columns))
    atomic_write_text(paths[1], markdown_table(report))
    curves = {k: asdict(v) for k, v in report.curves.items()}
    data = {"axes": report.axes, "rows": report.rows, "curves": curves}
    atomic_write_text(paths[2], json.dumps(data, indent=1))
    paths.append(plot_curves(report, out / "learning_curves.png", title))
    return paths


def report_sweep(root: str | Path, out: str | Path | None = None) -> tuple[SweepReport, list[Path]]:
    """Aggregate a sweep folder (or a kept copy) and write its report into ``out``.

    Args:
        root: ``DIR/NAME``.
        out: Folder for the files (default ``DIR/NAME/report``).

    Raises:
        UserError: Not a sweep folder, or no trial has an evaluation yet.
    """
    records = read_trials(root)
    if not records:
        raise UserError(f"no trial of {root} has an evaluation yet (metrics.jsonl eval lines)")
    report = aggregate(records)
    title = f"sweep {Path(root).name}: eval return, mean ± SD over seeds"
    return report, write_report(report, out or Path(root) / "report", title=title)


# -- cost before launching (--dry-run) -----------------------------------------------------------

# Milliseconds per update on ONE thread (eager), HalfCheetah-v5 sizes (S = 17, A = 6), batch 256,
# K = 10, N = 5, H = 2: this CPU's figures beside benchmarks/results/train_throughput.txt (which
# has the two-thread, compiled model-free ones: 15.8 ms direct, 178 ms iterative).
MS_PER_UPDATE = {
    ("direct", "model-free"): 33.0,
    ("iterative", "model-free"): 300.0,
    ("direct", "model"): 255.0,
    ("iterative", "model"): 2450.0,
}


@dataclass
class TrialCost:
    """Estimated cost of one trial (updates only; env steps and evaluations add a little)."""

    trial: str
    updates: int
    ms_per_update: float
    seconds: float


def estimate_cost(trial: Trial, threads: int = 1) -> TrialCost:
    """Scale :data:`MS_PER_UPDATE` to a trial's batch, K, N, H and threads (rough, ±2×).

    Cost grows linearly in batch·K, in N + 1 for the iterative agent, in 1 + 2.5·H for model
    rollouts, and falls as threads^0.75.
    """
    o = trial.options
    ms = MS_PER_UPDATE[(o["agent"], o["value"])]
    ms *= o["batch_size"] / 256 * o["samples"] / 10
    if o["agent"] == "iterative":
        ms *= (o["iters"] + 1) / 6
    if o["value"] == "model":
        ms *= (1 + 2.5 * o["horizon"]) / 6
    ms /= max(threads, 1) ** 0.75
    updates = max(int(o["steps"]) - int(o["warmup"]), 0)
    seconds = updates * ms / 1e3
    if o["value"] == "model":  # model-only warm-up updates: about a tenth of a full update
        seconds += int(o["model_warmup"]) * ms / 1e4
    return TrialCost(trial.id, updates, ms, seconds)
