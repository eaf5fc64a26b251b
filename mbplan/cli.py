"""The ``mbplan`` command line. Owns all output; library code never prints.

Errors a user can cause end as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
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
    eval_model_cmd,
    export_cmd,
    fit_model_cmd,
    fit_optimizer_cmd,
    plan_cmd,
    transfer_cmd,
)
from mbplan.errors import UserError
from mbplan.options import TrainOptions, add_dataclass_args, from_namespace, option
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

    checkpoint: str = option("", "run folder or checkpoint folder")
    episodes: int = option(10, "deterministic (tanh μ) episodes")
    seed: int = option(0, "seed of the episodes' resets")
    video: str = option("", "write the first episode as an MP4 here (MuJoCo offscreen)")
    env: str = option("", "evaluate on this env id instead of the run's (sizes must match)")


def _train(opts: TrainCommand, explicit: set[str]) -> None:
    resume = bool(opts.resume)
    if resume:
        config_path = Path(opts.resume) / "config.json"
        if not config_path.is_file():
            raise UserError(f"not a run folder (no config.json): {opts.resume}")
        try:
            saved = json.loads(config_path.read_text())
        except ValueError:
            raise UserError(f"corrupt config.json in {opts.resume}") from None
        known = {f.name for f in fields(TrainOptions)}
        values = {k: v for k, v in saved.items() if k in known}
        values.update({k: getattr(opts, k) for k in explicit if k in known})  # e.g. --steps
        values["out"] = opts.resume
        train_opts = TrainOptions(**values)
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
    bar = tqdm(
        total=train_opts.steps,
        initial=trainer.step,
        unit="step",
        dynamic_ncols=True,
        desc=train_opts.agent,
        mininterval=1.0,
    )
    try:
        summary = trainer.run()
    finally:
        bar.close()
    last = summary["last_eval"]
    print(
        f"trained {train_opts.agent} on {train_opts.env}: {summary['steps']} steps, "
        f"{summary['episodes']} episodes, {summary['steps_per_s']:.1f} env steps/s, "
        f"last eval {'-' if last is None else f'{last:.1f}'}; run folder {train_opts.out}"
    )


def _eval(opts: EvalOptions) -> None:
    if not opts.checkpoint:
        raise UserError("--checkpoint is required")
    if opts.episodes < 1:
        raise UserError("--episodes must be >= 1")
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
    "bench": discover("mbplan.bench"),
    "viz": discover("mbplan.viz"),
}


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
            cp = groups.add_parser(group, help=help_text, description=help_text, allow_abbrev=False)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbplan`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    opts = from_namespace(ns._opts_cls, ns)
    explicit = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    try:
        if "explicit" in inspect.signature(ns._handler).parameters:
            ns._handler(opts, explicit=explicit)
        else:
            ns._handler(opts)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"mbplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbplan: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
