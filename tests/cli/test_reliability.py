"""Never lose a run (issue 20): no overwrite, one writer, export, signals, divergence, full disk.

All on small real Pendulum runs; commands run in this process where one process is enough, and
in subprocesses where the test is about a second process (the lock) or a signal.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_corruption import (
    FIT_MODEL,
    NEWEST,
    PLAN,
    TRAIN,
    cached_run,
    cli,
    contract,
    one_line_error,
    rewrite,
    snapshot,
    weights_finite,
)

from mbplan.checkpoint import load_checkpoint, replay_transitions
from mbplan.fit import fit_models
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.train import DivergenceError, Trainer, TrainOptions

pytestmark = pytest.mark.slow

#: A training long enough to be interrupted (≈ 30 s) that checkpoints every 50 steps.
LONG_TRAIN = ["train", "--env", "Pendulum-v1", "--steps", "5000", "--warmup", "100",
              "--batch-size", "32", "--eval-interval", "0", "--checkpoint-interval", "50",
              "--log-interval", "10", "--threads", "1", "--no-compile"]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return cached_run(tmp_path_factory)


@pytest.fixture
def run(small_run, tmp_path):
    """A private copy of the small run."""
    return Path(shutil.copytree(small_run, tmp_path / "run"))


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def metric_steps(run: Path) -> list[tuple[str, int]]:
    """(kind, step) of every metrics line, kind being the line's sorted keys."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "duplicated metrics lines"
    records = [json.loads(ln) for ln in lines]
    return [(",".join(sorted(r)), r["step"]) for r in records if "step" in r]


def assert_metrics_in_order(run: Path) -> None:
    """Every kind of metrics line has strictly increasing steps (nothing repeated after resume)."""
    by_kind: dict[str, list[int]] = {}
    for kind, step in metric_steps(run):
        by_kind.setdefault(kind, []).append(step)
    for kind, steps in by_kind.items():
        assert steps == sorted(set(steps)), (kind, steps)


def newest_step(run: Path) -> int:
    return int((run / "latest").read_text().strip().removeprefix("ckpt-"))


def start_training(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mbplan.cli", *LONG_TRAIN, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the newest checkpoint of ``run`` is at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while not ((run / "latest").exists() and newest_step(run) >= step):
        if proc.poll() is not None:
            pytest.fail(f"training ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint {step} in {run} after {timeout} s")
        time.sleep(0.1)


# -- (a) no training into a non-empty folder without --resume --------------------------------------


def test_second_train_into_a_run_is_refused(run):
    before, times = snapshot(run), mtimes(run)
    line = one_line_error(cli(*TRAIN, "--out", run))
    assert "--resume" in line and str(run) in line
    assert snapshot(run) == before and mtimes(run) == times


def test_default_out_twice_is_refused(small_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(small_run, tmp_path / "runs" / "run")  # what a first `mbplan train` left
    before = snapshot(tmp_path / "runs" / "run")
    line = one_line_error(cli(*TRAIN))
    assert "--resume runs/run" in line
    assert snapshot(tmp_path / "runs" / "run") == before


# -- (b) one writer per run folder -----------------------------------------------------------------


def test_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = start_training(out)
    try:
        wait_for(out, 50, holder)
        attempts = {
            "train": [*TRAIN, "--out", out],
            "resume": ["train", "--resume", out, "--steps", "400"],
            "fit-model": [*FIT_MODEL, "--checkpoint", out],
            "export": ["export", "--checkpoint", tmp_path / "none", "--out", out],
        }
        for name, argv in attempts.items():
            r = cli(*argv)
            line = one_line_error(r)
            if name != "export":  # export first checks its own --checkpoint
                assert f"pid {holder.pid}" in line and "in use" in line, (name, line)
        assert holder.poll() is None, "the holder must not notice"
        # SIGKILL: the lock dies with its process; the newest checkpoint is complete
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    step = newest_step(out)
    assert weights_finite(out)
    r = cli("train", "--resume", out, "--steps", step + 60)
    assert r.code == 0, r.err
    assert newest_step(out) == step + 60
    assert_metrics_in_order(out)


def test_two_trainings_into_one_folder_at_once(tmp_path):
    """Started together: exactly one trains, the other exits 2 naming the holder."""
    out = tmp_path / "run"
    procs = [start_training(out, "--steps", "150") for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append((p.returncode, stdout, stderr))
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    _, _, loser_err = next(r for r in results if r[0] == 2)
    lines = [ln for ln in loser_err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in loser_err, loser_err
    winner = next(p for p, r in zip(procs, results) if r[0] == 0)
    assert "in use by" in lines[0] or "already holds a run" in lines[0], lines[0]
    assert "pid" not in lines[0] or f"pid {winner.pid}" in lines[0], lines[0]
    assert newest_step(out) == 150 and weights_finite(out)
    assert_metrics_in_order(out)


# -- (c) export writes only into a new or empty folder ---------------------------------------------


def test_export_never_overwrites_a_run(run, small_run, tmp_path):
    other = Path(shutil.copytree(small_run, tmp_path / "other"))
    before, other_before = snapshot(run), snapshot(other)
    (tmp_path / "file").write_text("x")
    for out in (run, run / "sub", other, tmp_path / "file"):
        one_line_error(cli("export", "--checkpoint", run, "--out", out))
    assert snapshot(run) == before and snapshot(other) == other_before
    assert (tmp_path / "file").read_text() == "x"
    # a new or an empty folder works, and the run still resumes
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "bundle", tmp_path / "empty"):
        r = cli("export", "--checkpoint", run, "--out", out)
        assert r.code == 0, r.err
        assert weights_finite(out)
    r = cli("train", "--resume", run, "--steps", "400")
    assert r.code == 0, r.err
    assert newest_step(run) == 400


# -- (d) SIGINT / SIGTERM write a checkpoint and exit 130 ------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_exits_130(tmp_path, sig):
    out = tmp_path / "run"
    proc = start_training(out)
    try:
        wait_for(out, 150, proc)  # past the warm-up: updates are running
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    line = next(ln for ln in stderr.splitlines() if "interrupted at step" in ln)
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert newest_step(out) == step and (out / f"ckpt-{step:09d}" / "meta.json").is_file()
    assert weights_finite(out)
    r = cli("train", "--resume", out, "--steps", step + 60)
    assert r.code == 0, r.err
    assert newest_step(out) == step + 60
    assert_metrics_in_order(out)
    logged = [s for kind, s in metric_steps(out) if "steps_per_s" in kind]
    assert min(logged) < step < max(logged)  # lines from before and after the interruption


# -- (e) divergence: stop, keep the last good checkpoint -------------------------------------------


def _poisoned_training(out: Path, poison_at: int, warmup: int):
    opts = TrainOptions(
        env="Pendulum-v1", steps=300, warmup=warmup, batch_size=32, eval_interval=0,
        checkpoint_interval=100, threads=1, compile=False, out=str(out),
    )  # fmt: skip
    trainer: list[Trainer] = []

    def poison(step: int, info: dict) -> None:
        if step == poison_at:
            with torch.no_grad():
                trainer[0].agent._flat["trained"].fill_(math.nan)

    trainer.append(Trainer(opts, on_progress=poison))
    return trainer[0]


@pytest.mark.parametrize(
    ("poison_at", "warmup", "message"),
    [
        (150, 100, r"diverged at step 151: \w+ = nan"),  # the next update's loss
        (50, 150, r"diverged at step 100: non-finite weights"),  # no update before the save
    ],
)
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, poison_at, warmup, message):
    out = tmp_path / "run"
    trainer = _poisoned_training(out, poison_at, warmup)
    with pytest.raises(DivergenceError, match=message):
        trainer.run()
    good = (poison_at // 100) * 100
    if good:
        assert newest_step(out) == good and weights_finite(out)
        load_checkpoint(out)
    else:
        assert not (out / "latest").exists()
    assert not list(out.glob(".ckpt-*"))
    # the lock was released: the run resumes from the last good checkpoint
    if good:
        r = cli("train", "--resume", out, "--steps", good + 50)
        assert r.code == 0, r.err
        assert weights_finite(out)


def test_fit_models_on_a_nan_reward_raises(small_run):
    data = {k: v.clone() for k, v in replay_transitions(small_run).items()}
    data["rewards"][5] = math.nan
    S, A = data["states"].shape[1], data["actions"].shape[1]
    with pytest.raises(ValueError, match="diverged"):
        fit_models(Dynamics(S, A, 16), Reward(S, A, 16), data, steps=5, batch_size=64)


def test_failed_model_fit_leaves_the_model_untouched(run):
    # finite but huge rewards pass the replay check and overflow the fit
    rewrite("replay", lambda t: t.update(rewards=torch.full_like(t["rewards"], 3e38)))(run)
    before = snapshot(run)
    line = one_line_error(cli(*FIT_MODEL, "--checkpoint", run))
    assert "diverged" in line
    assert snapshot(run) == before
    assert not list(run.glob(".model*"))


def test_resume_from_nan_weights_is_refused(run):
    rewrite("weights", lambda t: t.update(log_alpha=torch.full_like(t["log_alpha"], math.nan)))(run)
    before = snapshot(run)
    line = one_line_error(cli("train", "--resume", run, "--steps", "400"))
    assert "non-finite" in line
    assert snapshot(run) == before


# -- (f) disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs: room for two checkpoints of the small run, not three."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    out = small_disk / "run"
    r = cli(*TRAIN, "--steps", "500", "--out", out)
    line = one_line_error(r)
    assert "No space left on device" in line, line
    step = newest_step(out)
    assert step >= 100 and weights_finite(out)
    assert not list(out.glob(".ckpt-*")), "a partial checkpoint is left taking space"
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 500
    assert_metrics_in_order(out)


# -- (g) --resume and the options given with it ----------------------------------------------------


def test_resume_with_out_elsewhere_is_refused(run, tmp_path):
    before = snapshot(run)
    line = one_line_error(cli("train", "--resume", run, "--out", tmp_path / "x", "--steps", 400))
    assert "--out" in line
    assert snapshot(run) == before and not (tmp_path / "x").exists()


def test_resume_honors_no_compile(run):
    config = json.loads((run / "config.json").read_text())
    config["compile"] = True
    (run / "config.json").write_text(json.dumps(config))
    r = cli("train", "--resume", run, "--steps", "400", "--no-compile")
    assert r.code == 0, r.err
    assert json.loads((run / "config.json").read_text())["compile"] is False
    _, meta = load_checkpoint(run)
    assert meta["config"]["compile"] is False and meta["config"]["batch_size"] == 32


# -- (h) newcomer warnings -------------------------------------------------------------------------


def test_steps_not_beyond_warmup_warns(tmp_path):
    r = cli(*TRAIN, "--steps", 60, "--warmup", 100, "--checkpoint-interval", 60,
            "--eval-interval", 0, "--out", tmp_path / "run")  # fmt: skip
    assert contract(r) == "ok"
    warnings = [ln for ln in r.lines() if ln.startswith("mbplan: warning:")]
    assert any("--steps 60 does not exceed --warmup 100" in w for w in warnings), r.err
    assert any("no evaluation will run" in w for w in warnings), r.err


# -- (i) output paths are checked before any work --------------------------------------------------


@pytest.mark.parametrize("flag", ["--save-plans", "--video"])
def test_plan_output_into_a_missing_folder_fails_at_once(small_run, tmp_path, flag):
    target = tmp_path / "missing_dir" / ("x.safetensors" if flag == "--save-plans" else "x.mp4")
    start = time.perf_counter()
    r = cli("plan", "--checkpoint", small_run, *PLAN, "--episodes", "1000", flag, target)
    line = one_line_error(r)
    assert "missing_dir" in line and "does not exist" in line
    assert r.out == "" and time.perf_counter() - start < 5  # before loading or planning
    assert not (tmp_path / "missing_dir").exists()
    assert NEWEST in {p.name for p in small_run.iterdir()}
