"""The ``mbplan`` command line. Owns all output; library code never prints.

Errors a user can cause end as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

import mbplan
from mbplan.cli_planning import (
    EvalModelOptions,
    ExportOptions,
    FitModelOptions,
    FitOptimizerOptions,
    PlanOptions,
    TransferOptions,
    check_writable,
    eval_model_cmd,
    export_cmd,
    fit_model_cmd,
    fit_optimizer_cmd,
    plan_cmd,
    transfer_cmd,
)
from mbplan.cli_sweep import (
    SweepOptions,
    SweepReportOptions,
    sweep_argv,
    sweep_cmd,
    sweep_report_cmd,
)
from mbplan.errors import UserError
from mbplan.options import (
    SEED_RANGE,
    TrainOptions,
    add_dataclass_args,
    check_ranges,
    from_namespace,
    option,
)
from mbplan.train import Trainer, eval_checkpoint


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as a single line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass
class TrainCommand(TrainOptions):
    """Options of ``mbplan train`` (``--resume RUN`` continues a run with its saved options)."""

    resume: str = option("", "run folder to continue from its newest checkpoint")


@dataclass
class EvalOptions:
    """Options of ``mbplan eval``."""

    checkpoint: str = option("", "run folder or checkpoint folder", required=True)
    episodes: int = option(10, "deterministic (tanh μ) episodes")
    seed: int = option(0, "seed of the episodes' resets")
    video: str = option("", "write the first episode as an MP4 here (MuJoCo offscreen)")
    env: str = option("", "evaluate on this env id instead of the run's (sizes must match)")


def _resumed_options(opts: TrainCommand, explicit: set[str]) -> TrainOptions:
    """The saved options of ``--resume RUN``, with the flags given now on top (e.g. --steps)."""
    if "out" in explicit and opts.out != opts.resume:
        raise UserError("--out cannot be combined with --resume: the run folder is --resume's")
    config_path = Path(opts.resume) / "config.json"
    if not config_path.is_file():
        raise UserError(f"not a run folder (no config.json): {opts.resume}")
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"corrupt config.json in {opts.resume}") from None
    if not isinstance(saved, dict):
        raise UserError(f"corrupt config.json in {opts.resume}: not an object")
    values = asdict(TrainOptions.from_dict(saved, f"config.json in {opts.resume}"))
    known = {f.name for f in fields(TrainOptions)}
    values.update({k: getattr(opts, k) for k in explicit if k in known})
    values["out"] = opts.resume
    return TrainOptions(**values)


def train_warnings(opts: TrainOptions) -> list[str]:
    """Settings that run but will not do what a newcomer expects."""
    notes = []
    if opts.steps <= opts.warmup:
        notes.append(
            f"--steps {opts.steps} does not exceed --warmup {opts.warmup}: every step is random "
            "exploration and no gradient update will run"
        )
    if not opts.eval_interval or not opts.eval_episodes or opts.eval_interval > opts.steps:
        notes.append("no evaluation will run (--eval-interval is 0 or beyond --steps)")
    return notes


def _train(opts: TrainCommand, explicit: set[str]) -> int:
    resume = bool(opts.resume)
    if resume:
        train_opts = _resumed_options(opts, explicit)
    else:
        train_opts = TrainOptions(**{f.name: getattr(opts, f.name) for f in fields(TrainOptions)})
    train_opts.validate()

    # Build (and validate env, checkpoint) before the bar exists: errors stay one line.
    bar = None
    state = {"t": time.perf_counter(), "updates": 0}

    def on_progress(step: int, info: dict) -> None:
        bar.update(step - bar.n)
        state["updates"] += int(info["updating"])
        if step % 100 == 0:
            dt = time.perf_counter() - state["t"]
            ev = info["eval"]
            bar.set_postfix(
                updates_per_s=f"{state['updates'] / dt:.1f}",
                eval=("-" if ev is None else f"{ev:.1f}"),
            )
            state["t"], state["updates"] = time.perf_counter(), 0

    trainer = Trainer(train_opts, resume=resume, on_progress=on_progress)
    for note in train_warnings(train_opts):  # once the run folder is ours: never beside an error
        print(f"mbplan: warning: {note}", file=sys.stderr)
    bar = tqdm(
        total=train_opts.steps,
        initial=trainer.step,
        unit="step",
        dynamic_ncols=True,
        desc=train_opts.agent,
        mininterval=1.0,
    )
    # Ctrl-C / SIGTERM: finish the env step, write a checkpoint, exit 130
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: trainer.request_stop())
    try:
        summary = trainer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        trainer.close()
    if summary["interrupted"]:
        print(
            f"mbplan: interrupted at step {summary['steps']}; checkpoint written, continue with "
            f"`mbplan train --resume {train_opts.out}`",
            file=sys.stderr,
        )
        return 130
    last = summary["last_eval"]
    print(
        f"trained {train_opts.agent} on {train_opts.env}: {summary['steps']} steps, "
        f"{summary['episodes']} episodes, {summary['steps_per_s']:.1f} env steps/s, "
        f"last eval {'-' if last is None else f'{last:.1f}'}; run folder {train_opts.out}"
    )
    return 0


def _eval(opts: EvalOptions) -> None:
    if not opts.checkpoint:
        raise UserError("--checkpoint is required")
    check_ranges(opts, {"episodes": (1, 10**6), "seed": SEED_RANGE})
    if opts.video:
        check_writable(opts.video)  # before the episodes, not after them
    returns = eval_checkpoint(
        opts.checkpoint, opts.episodes, opts.seed, opts.video or None, opts.env or None
    )
    mean, std = statistics.fmean(returns), statistics.pstdev(returns)
    print(f"return {mean:.1f} ± {std:.1f} over {len(returns)} episodes")
    if opts.video:
        print(f"video written to {opts.video}")


# name → (help, options dataclass, handler)
Command = tuple[str, type, Callable[[Any], None]]


def discover(package_name: str) -> dict[str, Command]:
    """Subcommands of a package: every module that defines ``COMMAND = (name, help, Opts, fn)``."""
    package = importlib.import_module(package_name)
    found: dict[str, Command] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package_name}.{info.name}")
        command = getattr(module, "COMMAND", None)
        if command is not None:
            name, *rest = command
            found[name] = tuple(rest)  # type: ignore[assignment]
    return found


COMMANDS: dict[str, dict[str, Command]] = {
    "train": {
        "": ("train an agent (direct or iterative) on a gymnasium env", TrainCommand, _train)
    },
    "eval": {"": ("run deterministic episodes of a trained agent", EvalOptions, _eval)},
    "fit-model": {
        "": ("fit dynamics and reward models on a run's replay", FitModelOptions, fit_model_cmd)
    },
    "eval-model": {
        "": ("open-loop prediction error of a run's model", EvalModelOptions, eval_model_cmd)
    },
    "fit-optimizer": {
        "": (
            "train an iterative optimizer on a run's frozen objective",
            FitOptimizerOptions,
            fit_optimizer_cmd,
        )
    },
    "plan": {
        "": ("receding-horizon control against the model-based objective", PlanOptions, plan_cmd)
    },
    "transfer": {
        "": (
            "zero-shot model-free → model-based optimizer transfer (Fig. 8d)",
            TransferOptions,
            transfer_cmd,
        )
    },
    "export": {
        "": (
            "write a lean planning bundle of a run (what `plan` needs, a few MB)",
            ExportOptions,
            export_cmd,
        )
    },
    "sweep": {
        "": (
            "run a grid of train runs that resume, here or on a Ray cluster",
            SweepOptions,
            sweep_cmd,
        )
    },
    "sweep report": {
        "": (
            "aggregate a sweep DIR/NAME: mean ± SD over seeds, CSV, Markdown, curves",
            SweepReportOptions,
            sweep_report_cmd,
        )
    },
    "bench": discover("mbplan.bench"),
    "viz": discover("mbplan.viz"),
}


#: Examples shown at the end of each command's --help.
EXAMPLES = {
    "train": [
        "mbplan train --env HalfCheetah-v5 --agent direct --steps 100000 --out runs/hc-direct",
        "mbplan train --resume runs/hc-direct --steps 200000   # continue, with a new budget",
    ],
    "eval": ["mbplan eval --checkpoint runs/hc-direct --episodes 10"],
    "fit-model": ["mbplan fit-model --checkpoint runs/hc-direct --steps 5000"],
    "eval-model": ["mbplan eval-model --checkpoint runs/hc-direct --horizon 5"],
    "fit-optimizer": [
        "mbplan fit-optimizer --checkpoint runs/hc-direct --objective model --steps 2000",
    ],
    "plan": [
        "mbplan plan --planner iterative --horizon 5            # on the bundled default",
        "mbplan plan --checkpoint runs/hc-direct --planner cem --iters 10 --episodes 3",
    ],
    "transfer": ["mbplan transfer --horizon 2 --episodes 3"],
    "export": ["mbplan export --checkpoint runs/hc-direct --out bundles/hc-direct"],
}


def _epilog(name: str) -> str | None:
    lines = EXAMPLES.get(name)
    return "examples:\n" + "\n".join(f"  {x}" for x in lines) if lines else None


def build_parser() -> argparse.ArgumentParser:
    """The full parser: ``mbplan GROUP COMMAND [options]``."""
    parser = _Parser(
        prog="mbplan",
        allow_abbrev=False,
        description="Model-based planning with iterative amortized policy optimization.",
    )
    parser.add_argument("--version", action="version", version=f"mbplan {mbplan.__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    groups.required = True
    for group, commands in COMMANDS.items():
        if "" in commands:  # a command without subcommands
            help_text, opts_cls, handler = commands[""]
            cp = groups.add_parser(
                group,
                help=help_text,
                description=help_text,
                allow_abbrev=False,
                epilog=_epilog(group),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            add_dataclass_args(cp, opts_cls)
            cp.set_defaults(_opts_cls=opts_cls, _handler=handler)
            continue
        gp = groups.add_parser(group, help=f"{group} commands: {', '.join(commands)}")
        sub = gp.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
        sub.required = True
        for name, (help_text, opts_cls, handler) in commands.items():
            cp = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
            add_dataclass_args(cp, opts_cls)
            cp.set_defaults(_opts_cls=opts_cls, _handler=handler)
    return parser


def _explicit_flags(argv: Sequence[str]) -> set[str]:
    """Field names of the flags given on the command line (``--no-compile`` names ``compile``)."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return names | {n[3:] for n in names if n.startswith("no_")}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mbplan: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbplan`` console script."""
    argv = sweep_argv(sys.argv[1:] if argv is None else argv)  # `sweep report DIR` beside `sweep`
    parser = build_parser()
    ns = parser.parse_args(argv)
    opts = from_namespace(ns._opts_cls, ns)
    explicit = _explicit_flags(argv)
    warnings.showwarning = _one_line_warning
    try:
        if "explicit" in inspect.signature(ns._handler).parameters:
            code = ns._handler(opts, explicit=explicit)
        else:
            code = ns._handler(opts)
    except (UserError, ValueError) as exc:
        print(f"mbplan: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, a path that is not a folder: one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mbplan: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print("mbplan: error: out of memory: use smaller sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbplan: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
