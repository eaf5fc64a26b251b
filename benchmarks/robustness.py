"""Robustness of the mbplan CLI (issue 20): bad inputs and faults, each in its own process.

Every case runs real ``python -m mbplan.cli`` processes on a small real Pendulum run (a private
copy each) and is classified as

* **ran correctly**: exit 0 with the right result (exit 130 for a signal, with its checkpoint);
* **one-line exit 2**: exit 2 with exactly one line on stderr (progress-bar fragments aside);
* **traceback**: a traceback, or an exit code other than 0, 2 and 130 (a segfault is 139);
* **silent**: exit 0 where an error was due, a wrong result (NaN, non-finite weights), or
  anything already written lost or changed;
* **other**: exit 2 with more than one line.

The cases: the corruption matrix of ``tests/cli/test_corruption.py`` × {eval, plan, resume},
values of the fuzz lists of ``tests/cli/test_fuzz.py`` for every numeric and path option, and
faults: overwrite, two writers, export targets, SIGINT/SIGTERM/SIGKILL, a full disk (a tmpfs, as
root), divergence.

    python benchmarks/robustness.py                 # ~310 cases, 7-12 min on 2 busy cores
    python benchmarks/robustness.py --full          # every corruption × every command
    python benchmarks/robustness.py --only lock     # cases whose name contains "lock"

Writes benchmarks/results/robustness.json and robustness.txt (atomically).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cli"))

import test_corruption as tc  # noqa: E402  (the matrix and its helpers)
import test_fuzz as tf  # noqa: E402  (the fuzz lists)

import mbplan  # noqa: E402
from mbplan.checkpoint import atomic_write_text  # noqa: E402

torch.set_num_threads(1)

RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("ok", "error", "traceback", "silent", "other")
HEADERS = {
    "ok": "ran correctly",
    "error": "one-line exit 2",
    "traceback": "traceback",
    "silent": "silent",
    "other": "other",
}
#: Corruptions run by default (every family); --full runs all of tests/cli/test_corruption.py.
SAMPLE = [
    "weights-truncated",
    "weights-truncated-digest-updated",
    "weights-empty",
    "weights-flipped-data",
    "weights-flipped-header-digest-updated",
    "optimizer-truncated",
    "rng-truncated",
    "weights-huge-header",
    "weights-huge-header-digest-updated",
    "replay-huge-header-digest-updated",
    "weights-halved-digest-updated",
    "weights-float64-digest-updated",
    "weights-renamed-digest-updated",
    "optimizer-halved-digest-updated",
    "replay-halved-digest-updated",
    "rng-halved-digest-updated",
    "weights-nan-digest-updated",
    "optimizer-nan-digest-updated",
    "replay-nan-digest-updated",
    "meta-step-abc",
    "meta-list",
    "meta-config-list",
    "meta-optimizer-lr-string",
    "config-steps-x",
    "config-list",
    "weights-missing",
    "replay-missing",
    "rng-missing",
    "meta-missing",
    "config-missing",
    "newest-checkpoint-is-a-file",
    "latest-outside-run",
    "latest-missing-checkpoint",
    "env-spec-keys-missing",
    "env-spec-state-dim-5",
    "model-flipped-data",
    "metrics-garbage",
]


@dataclass
class Outcome:
    """How one case ended."""

    kind: str
    note: str = ""
    code: int | None = None


@dataclass
class Case:
    """One bad input or fault: ``run(work)`` gets a private folder holding a copy of the run."""

    name: str
    group: str
    run: Callable[[Path], Outcome]
    commands: list[str] = field(default_factory=list)


# -- running and classifying ---------------------------------------------------------------------


class Work:
    """A case's private folder: the run's copy at ``work/run``; commands recorded as typed."""

    def __init__(self, folder: Path, commands: list[str]):
        self.folder, self.commands = folder, commands
        self.run = folder / "run"

    def mbplan(self, *args: object, timeout: float = 300) -> tc.Result:
        argv = [str(a) for a in args]
        self.commands.append(
            "mbplan " + " ".join(a.replace(str(self.folder), "WORK") or "''" for a in argv)
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            p = subprocess.run(
                [sys.executable, "-m", "mbplan.cli", *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=self.folder,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            return tc.Result(-9, "", err + f"\n[timed out after {timeout} s]")
        return tc.Result(p.returncode, p.stdout, p.stderr)

    def popen(self, *args: object) -> subprocess.Popen:
        argv = [str(a) for a in args]
        self.commands.append(
            "mbplan " + " ".join(a.replace(str(self.folder), "WORK") for a in argv)
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            [sys.executable, "-m", "mbplan.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=self.folder,
        )


def classify(r: tc.Result, expect: str, lost: str = "", wrong: str = "") -> Outcome:
    """The kind of an outcome.

    Args:
        r: The command's result.
        expect: "ok", "error" or "either" (the fuzz: any side of the contract).
        lost: What was lost or changed, if anything.
        wrong: What is wrong with an exit-0 result, if anything.
    """
    last = (r.err.strip().splitlines() or [""])[-1][:160]
    if "Traceback" in r.err or r.code not in (0, 2, 130):
        return Outcome("traceback", f"exit {r.code}: {last}", r.code)
    if lost:
        return Outcome("silent", f"exit {r.code}, data lost: {lost}", r.code)
    if r.code == 0:
        if expect == "error":
            return Outcome("silent", "exit 0 where an error was due", 0)
        if wrong:
            return Outcome("silent", f"exit 0 with a wrong result: {wrong}", 0)
        return Outcome("ok", (r.lines() or [""])[-1][:160] if r.lines() else "", 0)
    if r.code == 130:
        return Outcome("other", f"exit 130 without a signal: {last}", 130)
    lines = r.lines()
    if len(lines) == 1 and "error" in lines[0]:
        note = lines[0][:200] + (" (expected to run)" if expect == "ok" else "")
        return Outcome("error", note, 2)
    return Outcome("other", f"exit 2 with {len(lines)} lines: {' | '.join(lines)[:200]}", 2)


def changed(run: Path, before: dict[str, bytes]) -> str:
    """What differs from a snapshot of the run ('' when nothing)."""
    if not run.exists():
        return "the run folder is gone"
    after = tc.snapshot(run)
    diff = sorted(set(before) ^ set(after)) + [
        k for k in before if k in after and after[k] != before[k]
    ]
    return ", ".join(diff[:4])


def finite_weights(path: Path) -> str:
    """'' when the agent at ``path`` loads with finite weights, else why not."""
    try:
        return "" if tc.weights_finite(path) else "non-finite weights saved"
    except Exception as exc:  # anything: the saved run does not load
        return f"does not load: {str(exc)[:120]}"


def newest_step(run: Path) -> int | None:
    try:
        return int((run / "latest").read_text().strip().removeprefix("ckpt-"))
    except (OSError, ValueError):
        return None


def metrics_in_order(run: Path) -> str:
    """'' when metrics.jsonl has no repeated line and each kind of line has increasing steps."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    if len(lines) != len(set(lines)):
        return "repeated metrics lines"
    by_kind: dict[str, list[int]] = {}
    for ln in lines:
        rec = json.loads(ln)
        if "step" in rec:
            by_kind.setdefault(",".join(sorted(rec)), []).append(rec["step"])
    bad = [k for k, s in by_kind.items() if s != sorted(set(s))]
    return f"metrics out of order ({bad[0][:40]})" if bad else ""


# -- the corruption matrix -----------------------------------------------------------------------


def corruption_case(corruption: tc.Corruption, command: str, baseline: dict) -> Callable:
    def run(work: Work) -> Outcome:
        corruption.apply(work.run)
        before = tc.snapshot(work.run)
        expect = getattr(corruption, command)
        r = work.mbplan(*tc.COMMANDS[command](work.run))
        if expect == tc.ERROR:
            return classify(r, "error", lost=changed(work.run, before))
        wrong, lost = "", ""
        if r.code == 0 and command in ("eval", "plan"):
            lost = changed(work.run, before)
            got = r.returns()
            if not got or not all(map(math.isfinite, got)):
                wrong = f"returns {got}"
            elif command == "eval":
                want = baseline["eval-older" if expect == tc.FALLBACK else "eval"]
                wrong = "" if got == want else f"return {got}, expected {want}"
            warned = any("warning" in ln for ln in r.lines())
            if expect == tc.FALLBACK and not warned:
                wrong = wrong or "fell back to the older checkpoint without a warning"
        elif r.code == 0:  # resume
            if newest_step(work.run) != 400:
                wrong = f"newest checkpoint {newest_step(work.run)}, expected 400"
            wrong = wrong or finite_weights(work.run) or metrics_in_order(work.run)
        return classify(r, "ok", lost=lost, wrong=wrong)

    return run


# -- fuzz values ---------------------------------------------------------------------------------

#: The values the issue names, exactly as typed.
NAMED = [
    ("train", [("seed", "-1")]),
    ("train", [("log-interval", "0")]),
    ("train", [("device", "nonsense")]),
    ("train", [("device", "cuda")]),
    ("train", [("device", "mps")]),
    ("train", [("device", "meta")]),
    ("train", [("out", "{file}")]),
    ("train", [("lr", "1e12")]),
    ("train", [("tau", "-1")]),
    ("train", [("lr", "inf")]),
    ("train", [("samples", "100000000")]),
    ("train", [("batch-size", "100000000")]),
    ("train", [("buffer-size", "10000000000")]),
    ("train", [("horizon", "1000000000000")]),
    ("train", [("iters", "1000000000000")]),
    ("plan", [("horizon", "1000000000000")]),
    ("plan", [("iters", "1000000000000")]),
    ("plan", [("samples", "100000000")]),
    ("plan", [("save-plans", "{missing}/x.safetensors")]),
    ("fit-model", [("lr", "1e12")]),
    ("fit-optimizer", [("lr", "1e12")]),
    ("eval", [("seed", "-1")]),
    ("eval", [("video", "{missing}/x.mp4")]),
    # MuJoCo: the bundled default (no --checkpoint), and an env of other sizes than the run's
    ("plan", [("checkpoint", "")]),
    ("plan", [("env", "HalfCheetah-v5")]),
    ("eval", [("env", "HalfCheetah-v5")]),
    ("train", [("env", "HalfCheetah-v5")]),
]
#: Values cycled through the numeric options (one or two each).
CYCLE = ["-1", "0", "1000000000000", "nan", "inf", "1e300", "abc", ""]


def fuzz_draws() -> list[tuple[str, list[tuple[str, str]]]]:
    """Every numeric option with two values of CYCLE (cycled), every path option with three."""
    draws = list(NAMED)
    k = 0
    for command, options in tf.OPTIONS.items():
        for option, values in options.items():
            if set(values) <= set(tf.NUMBERS):  # a numeric option
                picks = [CYCLE[k % len(CYCLE)], CYCLE[(k + 3) % len(CYCLE)]]
                picks = [v for v in picks if v in values] or [values[0]]
            else:
                picks = [values[(k + i) % len(values)] for i in range(3)]
            k += 1
            draws += [(command, [(option, v)]) for v in dict.fromkeys(picks)]
    return draws


def fuzz_case(command: str, drawn: list[tuple[str, str]]) -> Callable:
    def run(work: Work) -> Outcome:
        (work.folder / "file.txt").write_text("an existing file\n")
        paths = {
            "run": str(work.run),
            "file": str(work.folder / "file.txt"),
            "missing": str(work.folder / "missing"),
            "new": str(work.folder / "new"),
        }
        before = tc.snapshot(work.run)
        args = tf.argv(command, drawn, paths)
        r = work.mbplan(*args)
        after = tc.snapshot(work.run)
        lost = ""
        if r.code != 0 and after != before:
            lost = "a failed command changed the run: " + changed(work.run, before)
        elif tf.kept(after, args) != tf.kept(before, args):
            lost = "checkpoints or config.json changed"
        wrong = ""
        if r.code == 0:
            try:
                tf.check_result(command, args, r, work.folder)
            except Exception as exc:  # the check itself failed
                wrong = f"{type(exc).__name__}: {str(exc)[:120]}"
        return classify(r, "either", lost=lost, wrong=wrong)

    return run


# -- faults --------------------------------------------------------------------------------------


def fault_train_twice(work: Work) -> Outcome:
    before = tc.snapshot(work.run)
    r = work.mbplan(*tc.TRAIN, "--out", work.run)
    o = classify(r, "error", lost=changed(work.run, before))
    if o.kind == "error" and "--resume" not in o.note:
        o.note += " (does not name --resume)"
    return o


def fault_default_out_twice(work: Work) -> Outcome:
    shutil.copytree(work.run, work.folder / "runs" / "run")
    before = tc.snapshot(work.folder / "runs" / "run")
    r = work.mbplan(*tc.TRAIN)  # default --out runs/run, in WORK
    return classify(r, "error", lost=changed(work.folder / "runs" / "run", before))


LONG_TRAIN = [
    "train",
    "--env",
    "Pendulum-v1",
    "--steps",
    "5000",
    "--warmup",
    "100",
    "--batch-size",
    "32",
    "--eval-interval",
    "0",
    "--checkpoint-interval",
    "50",
    "--log-interval",
    "10",
    "--threads",
    "1",
    "--no-compile",
]


def _wait_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        s = newest_step(run)
        if s is not None and s >= step:
            return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def second_writer(kind: str) -> Callable:
    """While a training holds the run, another command that writes into it must be refused."""

    def run(work: Work) -> Outcome:
        out = work.folder / "busy"
        holder = work.popen(*LONG_TRAIN, "--out", out)
        try:
            if not _wait_step(out, holder, 50):
                return Outcome("other", "the holder did not start")
            argv = {
                "train": [*tc.TRAIN, "--out", out],
                "resume": ["train", "--resume", out, "--steps", "400"],
                "fit-model": [*tc.FIT_MODEL, "--checkpoint", out],
                "fit-optimizer": ["fit-optimizer", "--checkpoint", out, "--steps", "1"],
            }[kind]
            r = work.mbplan(*argv)
            o = classify(r, "error")
            if o.kind == "error" and f"pid {holder.pid}" not in o.note:
                o.note += " (does not name the holder)"
            if holder.poll() is not None:
                o = Outcome("silent", "the holder died", holder.returncode)
            return o
        finally:
            _stop(holder)

    return run


def fault_two_at_once(work: Work) -> Outcome:
    out = work.folder / "both"
    procs = [work.popen(*LONG_TRAIN, "--steps", "150", "--out", out) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    loser = [tc.Result(p.returncode, o, e) for p, o, e in results if p.returncode != 0]
    if codes != [0, 2]:
        return Outcome("silent" if codes == [0, 0] else "other", f"exit codes {codes}")
    lost = finite_weights(out) or metrics_in_order(out)
    o = classify(loser[0], "error", lost=lost)
    return o


def interrupt(sig: signal.Signals) -> Callable:
    def run(work: Work) -> Outcome:
        out = work.folder / "sig"
        proc = work.popen(*LONG_TRAIN, "--out", out)
        try:
            if not _wait_step(out, proc, 150):
                return Outcome("other", "training did not reach step 150")
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
        finally:
            _stop(proc)
        r = tc.Result(proc.returncode, "", err)
        if "Traceback" in err or proc.returncode not in (0, 2, 130):
            return classify(r, "ok")
        if proc.returncode != 130:
            return Outcome("other", f"exit {proc.returncode} after {sig.name}", proc.returncode)
        line = next((ln for ln in err.splitlines() if "interrupted at step" in ln), "")
        try:
            step = int(line.split("interrupted at step ")[1].split(";")[0])
        except (IndexError, ValueError):
            return Outcome("silent", f"no step in the message: {line!r}", 130)
        if newest_step(out) != step:
            return Outcome("silent", f"newest checkpoint {newest_step(out)}, interrupted at {step}")
        bad = finite_weights(out)
        if bad:
            return Outcome("silent", bad, 130)
        resumed = work.mbplan("train", "--resume", out, "--steps", step + 60)
        if resumed.code != 0:
            return classify(resumed, "ok")
        wrong = metrics_in_order(out) or (
            "" if newest_step(out) == step + 60 else "resume fell short"
        )
        if wrong:
            return Outcome("silent", wrong, 0)
        return Outcome(
            "ok", f"exit 130 with a checkpoint at step {step}; resumed to {step + 60}", 130
        )

    return run


def fault_sigkill(work: Work) -> Outcome:
    """SIGKILL at three moments, resuming after each: no checkpoint is ever corrupted."""
    out = work.folder / "killed"
    proc = work.popen(*LONG_TRAIN, "--out", out)
    try:
        if not _wait_step(out, proc, 100):
            return Outcome("other", "training did not start")
    finally:
        _stop(proc)
    steps = []
    for delay in (0.3, 0.9, 1.7):
        proc = work.popen("train", "--resume", out, "--steps", "5000")
        try:
            start = newest_step(out) or 0
            if not _wait_step(out, proc, start + 50):
                return Outcome("other", "resume did not continue")
            time.sleep(delay)
        finally:
            _stop(proc)
        bad = finite_weights(out) or metrics_in_order(out)
        if bad:
            return Outcome("silent", f"after a SIGKILL: {bad}")
        steps.append(newest_step(out))
    r = work.mbplan("train", "--resume", out, "--steps", (newest_step(out) or 0) + 50)
    wrong = finite_weights(out) or metrics_in_order(out) if r.code == 0 else ""
    o = classify(r, "ok", wrong=wrong)
    if o.kind == "ok":
        o.note = f"3 kills (newest checkpoints {steps}), each resumed"
    return o


def export_into(target: str) -> Callable:
    def run(work: Work) -> Outcome:
        other = work.folder / "other"
        shutil.copytree(work.run, other)
        (work.folder / "file.txt").write_text("x")
        before, other_before = tc.snapshot(work.run), tc.snapshot(other)
        out = {
            "run": work.run,
            "run/sub": work.run / "sub",
            "other run": other,
            "a file": work.folder / "file.txt",
        }[target]
        r = work.mbplan("export", "--checkpoint", work.run, "--out", out)
        lost = changed(work.run, before) or changed(other, other_before)
        if (work.folder / "file.txt").read_text() != "x":
            lost = "the file was overwritten"
        o = classify(r, "error", lost=lost)
        if o.kind == "error":
            resumed = work.mbplan("train", "--resume", work.run, "--steps", "400")
            if resumed.code != 0:
                return Outcome("silent", "the run no longer resumes after the refused export")
        return o

    return run


def fault_export_new(work: Work) -> Outcome:
    r = work.mbplan("export", "--checkpoint", work.run, "--out", work.folder / "bundle")
    if r.code != 0:
        return classify(r, "ok")
    p = work.mbplan(*tc.COMMANDS["plan"](work.folder / "bundle"))
    return classify(p, "ok", wrong=finite_weights(work.folder / "bundle"))


def _mount(folder: Path, size: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not root"
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    return "" if p.returncode == 0 else p.stderr.strip() or "mount failed"


def disk_full(what: str) -> Callable:
    def run(work: Work) -> Outcome:
        disk = work.folder / "disk"
        why = _mount(disk, "5m" if what == "train" else "12m")  # the run's copy is ~7 MB
        if why:
            return Outcome("skipped", f"cannot mount a tmpfs: {why}")
        try:
            if what == "train":
                r = work.mbplan(*tc.TRAIN, "--steps", "500", "--out", disk / "run")
                if r.code == 0:
                    return Outcome("silent", "a 5 MiB disk held 5 checkpoints?")
                lost = finite_weights(disk / "run") or metrics_in_order(disk / "run")
                if list((disk / "run").glob(".ckpt-*")):
                    lost = lost or "a partial checkpoint left on the full disk"
                return classify(r, "error", lost=lost)
            shutil.copytree(work.run, disk / "run")
            with open(disk / "filler", "wb") as f:  # room for the lock's files, not for a save
                free = shutil.disk_usage(disk).free - (0 if what == "plan-save-plans" else 8192)
                f.write(b"\0" * max(free, 0))
            before = tc.snapshot(disk / "run")
            if what == "fit-model":
                r = work.mbplan(*tc.FIT_MODEL, "--checkpoint", disk / "run")
            elif what == "resume":
                r = work.mbplan("train", "--resume", disk / "run", "--steps", "400")
            else:
                r = work.mbplan(
                    *tc.COMMANDS["plan"](disk / "run"), "--save-plans", disk / "plans.safetensors"
                )
            keep = (
                before
                if what != "resume"
                else {k: v for k, v in before.items() if k.startswith("ckpt-")}
            )
            now = tc.snapshot(disk / "run")
            lost = [k for k in keep if now.get(k) != keep[k]]
            if what == "resume":  # metrics lines past the checkpoint may be dropped; none else
                lost = [k for k in lost if k != "metrics.jsonl"]
            return classify(r, "error", lost=", ".join(lost[:3]))
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)

    return run


def fault_fit_diverges(work: Work) -> Outcome:
    rewrite = tc.rewrite("replay", lambda t: t.update(rewards=torch.full_like(t["rewards"], 3e38)))
    rewrite(work.run)
    before = tc.snapshot(work.run)
    r = work.mbplan(*tc.FIT_MODEL, "--checkpoint", work.run)
    return classify(r, "error", lost=changed(work.run, before))


def fault_resume_out_elsewhere(work: Work) -> Outcome:
    before = tc.snapshot(work.run)
    r = work.mbplan("train", "--resume", work.run, "--out", work.folder / "x", "--steps", "400")
    lost = changed(work.run, before) or ("--out created" if (work.folder / "x").exists() else "")
    return classify(r, "error", lost=lost)


def fault_resume_no_compile(work: Work) -> Outcome:
    config = json.loads((work.run / "config.json").read_text())
    config["compile"] = True
    (work.run / "config.json").write_text(json.dumps(config))
    r = work.mbplan("train", "--resume", work.run, "--steps", "400", "--no-compile")
    compiled = json.loads((work.run / "config.json").read_text()).get("compile")
    return classify(r, "ok", wrong="--no-compile ignored" if compiled is not False else "")


def fault_steps_below_warmup(work: Work) -> Outcome:
    r = work.mbplan(
        *tc.TRAIN,
        "--steps",
        "60",
        "--warmup",
        "100",
        "--checkpoint-interval",
        "60",
        "--out",
        work.folder / "short",
    )
    warned = any("does not exceed --warmup" in ln for ln in r.lines())
    return classify(r, "ok", wrong="" if warned else "no warning")


def fault_model_fit_into_checkpoint(work: Work) -> Outcome:
    before = tc.snapshot(work.run)
    r = work.mbplan(*tc.FIT_MODEL, "--checkpoint", work.run / tc.NEWEST)
    return classify(r, "error", lost=changed(work.run, before))


FAULTS: dict[str, Callable[[Work], Outcome]] = {
    "overwrite/train-twice-same-out": fault_train_twice,
    "overwrite/default-out-twice": fault_default_out_twice,
    "lock/two-trainings-at-once": fault_two_at_once,
    **{
        f"lock/{k}-while-training": second_writer(k)
        for k in ("train", "resume", "fit-model", "fit-optimizer")
    },
    "signal/SIGINT": interrupt(signal.SIGINT),
    "signal/SIGTERM": interrupt(signal.SIGTERM),
    "signal/SIGKILL-x3-then-resume": fault_sigkill,
    **{
        f"export/into-{t.replace(' ', '-').replace('/', '-')}": export_into(t)
        for t in ("run", "run/sub", "other run", "a file")
    },
    "export/into-new-folder-then-plan": fault_export_new,
    **{f"disk-full/{w}": disk_full(w) for w in ("train", "resume", "fit-model", "plan-save-plans")},
    "diverge/fit-model-huge-rewards": fault_fit_diverges,
    "resume/out-elsewhere": fault_resume_out_elsewhere,
    "resume/no-compile-honored": fault_resume_no_compile,
    "newcomer/steps-not-beyond-warmup": fault_steps_below_warmup,
    "overwrite/fit-model-into-a-checkpoint-folder": fault_model_fit_into_checkpoint,
}


# -- main ----------------------------------------------------------------------------------------


def build_cases(full: bool, baseline: dict) -> list[Case]:
    names = None if full else set(SAMPLE)
    cases = []
    for c in tc.CORRUPTIONS:
        if names is None or c.name in names:
            for command in tc.COMMANDS:
                cases.append(
                    Case(
                        f"corrupt/{c.name}/{command}",
                        "corruption",
                        corruption_case(c, command, baseline),
                    )
                )
    for command, drawn in fuzz_draws():
        label = ",".join(f"--{o}={v!r}" for o, v in drawn)
        cases.append(Case(f"fuzz/{command}/{label}", "fuzz", fuzz_case(command, drawn)))
    for name, fn in FAULTS.items():
        cases.append(Case(name, "fault", fn))
    return cases


def run_case(case: Case, source: Path, scratch: Path) -> tuple[Case, Outcome, float]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        work = Work(Path(tmp), case.commands)
        shutil.copytree(source, work.run)
        try:
            outcome = case.run(work)
        except Exception as exc:  # a bug of this script, reported as such
            outcome = Outcome("other", f"benchmark error: {type(exc).__name__}: {exc}"[:200])
        outcome.note = outcome.note.replace(str(work.folder), "WORK")
    return case, outcome, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every corruption × every command")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=3, help="cases run side by side")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "source"
        work = Work(scratch, [])
        for argv in ([*tc.TRAIN, "--out", source], [*tc.FIT_MODEL, "--checkpoint", source]):
            r = work.mbplan(*argv)
            if r.code != 0:
                sys.exit(f"could not build the run: {r.err[-2000:]}")
        baseline = {
            "eval": work.mbplan(*tc.COMMANDS["eval"](source)).returns(),
            "eval-older": work.mbplan(*tc.COMMANDS["eval"](source / tc.OLDER)).returns(),
        }
        cases = [c for c in build_cases(args.full, baseline) if args.only in c.name]
        print(f"{len(cases)} cases, {args.jobs} at a time", flush=True)
        done: list[tuple[Case, Outcome, float]] = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_case, c, source, scratch) for c in cases]
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                case, outcome, seconds = future.result()
                done.append((case, outcome, seconds))
                print(
                    f"[{i:3d}/{len(cases)}] {outcome.kind:9s} {case.name}  {outcome.note[:100]}",
                    flush=True,
                )
    elapsed = time.perf_counter() - start
    done.sort(key=lambda d: [c.name for c in cases].index(d[0].name))
    report(done, elapsed, args)


def table(done: list, groups: list[str]) -> list[str]:
    cols = ["tried", *KINDS]
    lines = [f"{'':12s}" + "".join(f"{(HEADERS.get(c, c)):>17s}" for c in cols)]
    for group in [*groups, "all"]:
        rows = [o for c, o, _ in done if group in ("all", c.group) and o.kind != "skipped"]
        counts = [len(rows)] + [sum(o.kind == k for o in rows) for k in KINDS]
        lines.append(f"{group:12s}" + "".join(f"{n:17d}" for n in counts))
    return lines


def report(done: list, elapsed: float, args: argparse.Namespace) -> None:
    groups = ["corruption", "fuzz", "fault"]
    skipped = [c.name for c, o, _ in done if o.kind == "skipped"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    head = [
        f"mbplan {mbplan.__version__} (commit {commit} + working tree), python "
        f"{platform.python_version()}, torch {torch.__version__}; {len(done)} cases in "
        f"{elapsed / 60:.1f} min ({args.jobs} at a time); `python benchmarks/robustness.py"
        f"{' --full' if args.full else ''}`",
        "",
        *table(done, groups),
    ]
    if skipped:
        head.append(f"skipped ({len(skipped)}): {', '.join(skipped)}")
    body = ["", "per case: kind, name, note; then the commands (WORK = the case's folder)"]
    for case, outcome, seconds in done:
        body.append(f"{outcome.kind:9s} {case.name}  [{seconds:.1f} s]  {outcome.note}")
        body += [f"          $ {cmd}" for cmd in case.commands]
    text = "\n".join(head + body) + "\n"
    print("\n".join(head))
    if args.no_write:
        return
    summary = {
        group: {
            k: sum(o.kind == k for c, o, _ in done if group in ("all", c.group))
            for k in ("tried", *KINDS)
        }
        for group in [*groups, "all"]
    }
    for group, counts in summary.items():
        counts["tried"] = sum(
            1 for c, o, _ in done if group in ("all", c.group) and o.kind != "skipped"
        )
    payload = {
        "mbplan_version": mbplan.__version__,
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": "python benchmarks/robustness.py" + (" --full" if args.full else ""),
        "seconds": round(elapsed, 1),
        "jobs": args.jobs,
        "columns": {k: HEADERS[k] for k in KINDS},
        "summary": summary,
        "skipped": skipped,
        "cases": [
            {
                "name": c.name,
                "group": c.group,
                **asdict(o),
                "seconds": round(s, 1),
                "commands": c.commands,
            }
            for c, o, s in done
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "robustness.json", json.dumps(payload, indent=1) + "\n")
    atomic_write_text(RESULTS / "robustness.txt", text)
    print(f"written to {RESULTS / 'robustness.txt'} and robustness.json")


if __name__ == "__main__":
    main()
