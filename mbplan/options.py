"""Command options as dataclasses: one field per flag, its help in the field's metadata.

``add_dataclass_args`` turns such a dataclass into argparse flags (``--snake-case`` from
``snake_case``), ``from_namespace`` builds the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from mbplan.agent import AGENTS, AgentConfig
from mbplan.errors import UserError

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help (and extra argparse kwargs such as ``choices``)."""
    factory = kwargs.pop("default_factory", None)
    meta = {"help": help, **kwargs}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) with Optional unwrapped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; help text and default shown."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        flag = "--" + f.name.replace("_", "-")
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if tp is bool:
            shown = f"{help_text} (default: {'on' if default else 'off'})"
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=shown, **meta
            )
            continue
        kwargs: dict[str, Any] = {"type": tp, "default": default, "help": help_text, **meta}
        if is_list:
            kwargs["nargs"] = "+"
        shown = not meta.get("required") and default is not None and default not in ([], "")
        if "%(default)" not in help_text and shown:
            kwargs["help"] = f"{help_text} (default: %(default)s)"
        parser.add_argument(flag, **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Build dataclass ``cls`` from the parsed flags of :func:`add_dataclass_args`."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**values)


@dataclass
class TrainOptions:
    """Options of ``mbplan train``."""

    env: str = option("HalfCheetah-v5", "gymnasium env id with continuous actions")
    agent: str = option("direct", "policy: direct network or iterative optimizer", choices=AGENTS)
    steps: int = option(200_000, "total env steps (one gradient update per step after warm-up)")
    seed: int = option(0, "seed of weights, sampling noise and env resets")
    out: str = option("runs/run", "run folder (config, metrics.jsonl, checkpoints)")
    beta: float = option(1.0, "pessimism β: Q̂ = mean − β·std over critics (2.5 for iterative)")
    iters: int = option(5, "iterations N of the iterative optimizer (train and act)")
    samples: int = option(10, "samples K per state in the objective")
    batch_size: int = option(256, "batch size of every update")
    lr: float = option(3e-4, "Adam learning rate of every parameter group")
    gamma: float = option(0.99, "discount γ")
    tau: float = option(0.005, "Polyak rate τ of the target critics")
    warmup: int = option(5000, "uniformly random env steps before the first update")
    buffer_size: int = option(1_000_000, "replay capacity (transitions)")
    eval_interval: int = option(5000, "env steps between evaluations (0 = never)")
    eval_episodes: int = option(5, "deterministic (tanh μ) episodes per evaluation")
    checkpoint_interval: int = option(10_000, "env steps between checkpoints")
    log_interval: int = option(1000, "env steps between training-metric lines")
    device: str = option("cpu", "torch device: cpu or cuda")
    threads: int = option(
        0, "torch CPU threads (0 = one per core); 1 when running jobs side by side"
    )
    value: str = option(
        "model-free",
        "Ĵ on the critics, or on H-step model rollouts + Retrace",
        choices=("model-free", "model"),
    )
    horizon: int = option(2, "rollout horizon H of --value model")
    model_warmup: int = option(1000, "model-only updates after the random warm-up (--value model)")
    ensemble: int = option(5, "--value model: dynamics/reward ensemble members E (1 = one model)")
    propagation: str = option(
        "fixed",
        "--value model: ensemble rollouts (fixed: member k mod E; mean)",
        choices=("fixed", "mean"),
    )
    kappa: float = option(0.0, "--value model: pessimism κ on the members' disagreement")
    wandb: bool = option(False, "log to Weights & Biases (offline unless WANDB_MODE says online)")
    compile: bool = option(
        True, "torch.compile the direct model-free update (one-off ~20 s; else no effect)"
    )

    def agent_config(self) -> AgentConfig:
        """The agent hyperparameters among these options."""
        return AgentConfig(
            agent=self.agent,
            beta=self.beta,
            n_iters=self.iters,
            n_samples=self.samples,
            gamma=self.gamma,
            tau=self.tau,
            lr=self.lr,
            value=self.value,
            horizon=self.horizon,
            ensemble=self.ensemble if self.value == "model" else 1,
            propagation=self.propagation,
            kappa=self.kappa,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config.json") -> TrainOptions:
        """Options from a saved config (unknown keys ignored), each value type-checked.

        Raises:
            UserError: A value of the wrong type (a string or list where a number belongs).
        """
        hints = typing.get_type_hints(cls)
        values = {"ensemble": 1, **values}  # runs saved before ensembles had one model
        known = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value, kind = values[f.name], hints[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise UserError(f"corrupt {where}: {f.name} is {value!r}, not a {kind.__name__}")
            known[f.name] = value
        return cls(**known)

    def validate(self) -> None:
        """Raise :class:`UserError` on values no run can use (ranges, device, output path)."""
        bounds = {  # name: (lowest, highest) allowed
            "steps": (1, 10**12), "iters": (1, MAX_ITERS), "samples": (1, 10**6),
            "batch_size": (1, 10**7), "buffer_size": (1, 10**10),
            "checkpoint_interval": (1, 10**12), "horizon": (1, MAX_HORIZON),
            "log_interval": (1, 10**12), "seed": SEED_RANGE, "warmup": (0, 10**12),
            "eval_interval": (0, 10**12), "eval_episodes": (0, 10**6),
            "model_warmup": (0, 10**9), "threads": THREAD_RANGE, "ensemble": (1, 256),
        }  # fmt: skip
        check_ranges(self, bounds)
        reals = {  # name: (test, description)
            "beta": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
            "lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "kappa": (lambda v: v >= 0, ">= 0 and finite"),
        }
        for name, (ok, what) in reals.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and ok(value)):
                raise UserError(f"--{name} must be {what}, got {value}")
        if self.agent not in AGENTS:
            raise UserError(f"unknown agent {self.agent!r}; choose from {', '.join(AGENTS)}")
        check_device(self.device)
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a file, not a run folder")


#: Seeds every command accepts (env resets need them below 2^31) and torch thread counts.
SEED_RANGE = (0, 2**31 - 1)
THREAD_RANGE = (0, 4096)


def check_ranges(opts: Any, bounds: dict[str, tuple[int, int]]) -> None:
    """Raise :class:`UserError` for the first field of ``opts`` outside its [lowest, highest]."""
    for name, (lo, hi) in bounds.items():
        value = getattr(opts, name)
        if not lo <= value <= hi:
            raise UserError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {value}")


#: Upper bounds of the planning sizes: a rollout or a loop this long is a typo, not a setting.
MAX_HORIZON = 1000
MAX_ITERS = 100_000


def check_device(device: str) -> torch.device:
    """The torch device named by ``--device`` if this machine can compute on it.

    Raises:
        UserError: Not a device name, or a device this machine lacks (cuda, mps) or that holds
            no data (meta).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (cpu or cuda)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        return dev
    raise UserError(f"--device {device} is not supported: use cpu or cuda")
