"""Fuzz of CLI values (issue 20): nasty values in every numeric and path option of six commands.

One or two options get a value drawn from lists of nasty values while the others keep tiny
settings, so any value the CLI accepts finishes in seconds. Every draw must end in exit 0 with a
sane result (finite returns, finite saved weights), or exit 2 with one line; never a traceback, and
the run's checkpoints and config never change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_corruption import cached_run, cli, contract, snapshot, weights_finite

from mbplan.checkpoint import load_folder
from mbplan.cli import COMMANDS

pytestmark = pytest.mark.slow

#: Nasty numbers (argparse rejects non-numbers for int options, the CLI the out-of-range ones).
NUMBERS = ["-1", "0", "1", "0.5", "1000000000000", "100000000000000000000", "nan", "inf", "-inf",
           "1e300", "1e-300", "abc", ""]  # fmt: skip
#: Values of budget options without an upper bound: accepted, and they would run for ages.
LONG = {"1000000000000", "100000000000000000000"}
#: Nasty paths ({file}: an existing file, {missing}: a missing folder, {run}: the run itself).
PATHS = ["{file}", "{missing}/x", "{run}", "{run}/ckpt-000000300", "", "abc", "/"]
ENVS = ["abc", "", "Pendulum-v1", "CartPole-v1", "MountainCarContinuous-v0", "{file}"]
DEVICES = ["abc", "", "cpu", "cuda", "cuda:99", "meta", "mps", "-1"]

#: Tiny settings of each command ({run}: the run, {new}: a fresh folder).
BASE = {
    "train": {
        "env": "Pendulum-v1", "steps": "30", "warmup": "10", "batch-size": "8",
        "eval-interval": "30", "eval-episodes": "1", "checkpoint-interval": "30",
        "log-interval": "10", "buffer-size": "1000", "threads": "1", "out": "{new}",
    },
    "plan": {
        "checkpoint": "{run}", "planner": "adam", "iters": "2", "horizon": "2", "max-steps": "3",
        "episodes": "1", "samples": "4", "threads": "1",
    },
    "fit-model": {
        "checkpoint": "{run}", "steps": "5", "batch-size": "16", "hidden": "16", "horizon": "2",
        "threads": "1", "distill-steps": "5",
    },
    "fit-optimizer": {
        "checkpoint": "{run}", "objective": "model", "steps": "2", "horizon": "1", "iters": "1",
        "samples": "2", "batch-size": "4", "threads": "1",
    },
    "eval": {"checkpoint": "{run}", "episodes": "1"},
    "export": {"checkpoint": "{run}", "out": "{new}"},
}  # fmt: skip
FLAGS = {"train": ["--no-compile"], "plan": ["--no-compile"]}
#: Budget options without an upper bound: a value of 10¹² is accepted and would run for ages.
UNBOUNDED = {("fit-model", "steps"), ("fit-optimizer", "steps"), ("train", "steps")}


def fuzzed_options(command: str) -> dict[str, list[str]]:
    """Every numeric and path option of ``command`` (from its options dataclass) → its values.

    On/off flags and options with choices are left to argparse; a new option is fuzzed as soon as
    it exists.
    """
    cls = COMMANDS[command][""][1]
    hints = typing.get_type_hints(cls)
    options = {}
    for f in dataclasses.fields(cls):
        flag, kind = f.name.replace("_", "-"), hints[f.name]
        if kind in (int, float):
            long_ok = (command, flag) not in UNBOUNDED
            options[flag] = [v for v in NUMBERS if long_ok or v not in LONG]
        elif kind is str and "choices" not in f.metadata:
            options[flag] = {"env": ENVS, "device": DEVICES}.get(flag, PATHS)
    if command == "plan":  # no --checkpoint is the bundled default, a MuJoCo run (tested apart)
        options["checkpoint"] = [p for p in PATHS if p]
    return options


OPTIONS = {command: fuzzed_options(command) for command in BASE}
#: Draws per command: most end in a usage error within milliseconds, a run in about 0.5 s.
EXAMPLES = {"train": 300, "plan": 200, "fit-model": 150, "fit-optimizer": 120, "eval": 100,
            "export": 60}  # fmt: skip


def pairs(command: str) -> list[tuple[str, str]]:
    return [(o, v) for o, values in OPTIONS[command].items() for v in values]


@contextlib.contextmanager
def workdir(small_run: Path) -> Iterator[dict[str, str]]:
    """A fresh folder as the working directory, with a copy of the run and the path values."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = Path(shutil.copytree(small_run, root / "run"))
        (root / "file.txt").write_text("an existing file\n")
        os.chdir(root)
        try:
            yield {
                "run": str(run), "file": str(root / "file.txt"), "missing": str(root / "missing"),
                "new": str(root / "new"),
            }  # fmt: skip
        finally:
            os.chdir(old)


def argv(command: str, drawn: list[tuple[str, str]], paths: dict[str, str]) -> list[str]:
    values = {**BASE[command], **dict(drawn)}
    if "resume" in values:  # the run folder is --resume's
        values.pop("out")
    out = [command, *FLAGS.get(command, [])]
    for option, value in values.items():
        out += [f"--{option}", value.format(**paths)]
    return out


def check_result(command: str, args: list[str], r, cwd: str | Path = ".") -> None:
    """What an exit 0 must have produced: finite returns, finite saved weights."""
    value = {a: b for a, b in itertools.pairwise(args) if a.startswith("--")}
    if command in ("plan", "eval"):
        returns = r.returns()
        assert returns and all(map(math.isfinite, returns)), r.out
    elif command in ("train", "export"):
        out = value.get("--resume") or value.get("--out") or "runs/run"  # (train's default)
        assert weights_finite(Path(cwd, out))
    else:
        folder = "model" if command == "fit-model" else "optimizers/model"
        tensors, _ = load_folder(Path(cwd, value["--checkpoint"], folder))
        assert all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())


def kept(files: dict[str, bytes], args: list[str]) -> dict[str, bytes]:
    """The files of the run that a command must not change: checkpoints and config.json.

    (``train --resume`` rotates checkpoints and records its options in config.json.)
    """
    if "--resume" in args:
        return {}
    return {k: v for k, v in files.items() if k.startswith(("ckpt-", "config"))}


def fuzz_one(small_run: Path, command: str, drawn: list[tuple[str, str]]) -> str:
    """Run one draw; assert the contract; the outcome ("ok" or "error")."""
    with workdir(small_run) as paths:
        run = Path(paths["run"])
        before = snapshot(run)
        args = argv(command, drawn, paths)
        r = cli(*args)
        outcome = contract(r)
        after = snapshot(run)
        if outcome == "error":
            assert after == before, "a failed command changed the run"
        else:
            assert kept(after, args) == kept(before, args), "checkpoints or config.json changed"
            check_result(command, args, r)
        return outcome


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return cached_run(tmp_path_factory)


FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("command", list(OPTIONS))
def test_fuzz_options(small_run, command):
    @settings(FUZZ, max_examples=EXAMPLES[command])
    @given(
        st.lists(st.sampled_from(pairs(command)), min_size=1, max_size=2, unique_by=lambda p: p[0])
    )
    def draw(drawn):
        fuzz_one(small_run, command, drawn)

    draw()
