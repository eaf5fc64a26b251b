"""`mbplan sweep`: grids, resume after SIGKILL (local backend and real Ray), report, bad input."""

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cli_helpers import valid_png

from mbplan.cli import main
from mbplan.errors import UserError
from mbplan.sweep import (
    TrialRecord,
    aggregate,
    completed_step,
    expand_grid,
    load_sweep,
    markdown_table,
    parse_seeds,
    parse_sets,
    read_evals,
)

ENV = "InvertedPendulum-v5"
STEPS = 400
# A 2 × 2 grid (agent × seed) of short runs: a few seconds of training each on one thread.
GRID = ["--env", ENV, "--agent", "direct", "iterative", "--seeds", "0-1"]
TINY = [
    *("--steps", STEPS, "--warmup", 100, "--eval-interval", 200, "--eval-episodes", 2),
    *("--checkpoint-interval", 100, "--log-interval", 100, "--batch-size", 32),
    *("--samples", 3, "--iters", 2, "--buffer-size", 5000, "--no-compile"),
]
IDS = [f"{ENV}-{agent}-s{seed}" for agent in ("direct", "iterative") for seed in (0, 1)]


def sweep_cmd(*args):
    return [sys.executable, "-m", "mbplan.cli", "sweep", *map(str, args)]


def cli_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run(*args, timeout=300):
    return subprocess.run(
        sweep_cmd(*args), capture_output=True, text=True, timeout=timeout, env=cli_env()
    )


def metrics_lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def check_trials_finished(root: Path) -> None:
    """Every trial at its step count, metrics lines in step order and none repeated."""
    sweep = load_sweep(root)
    assert sorted(t.id for t in sweep.trials) == sorted(IDS)
    for trial in sweep.trials:
        run_dir = root / trial.id
        assert completed_step(run_dir) == STEPS, trial.id
        assert sweep.state(trial) == "done", trial.id
        lines = metrics_lines(run_dir)
        assert len(lines) == len(set(lines)), f"{trial.id}: duplicated metrics lines"
        records = [json.loads(line) for line in lines]
        steps = [r["step"] for r in records]
        assert steps == sorted(steps) and steps[-1] <= STEPS
        episodes = [r["episode"] for r in records if "episode_return" in r]
        assert episodes == list(range(len(episodes))), f"{trial.id}: episodes repeated/missing"
        assert [r["step"] for r in records if "eval_return_mean" in r] == [200, 400]


def start_killable(*args, env_extra=None):
    """A sweep driver in its own process group, so the test can find everything it started."""
    return subprocess.Popen(
        sweep_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(**(env_extra or {})),
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def snapshot_before_resume(root: Path) -> dict[str, tuple[int, list[str]]]:
    """Per trial: its newest checkpoint's step and the metrics lines up to that step."""
    snap = {}
    for tid in IDS:
        run_dir = root / tid
        step = completed_step(run_dir)
        if step:
            kept = [ln for ln in metrics_lines(run_dir) if json.loads(ln)["step"] <= step]
            snap[tid] = (step, kept)
    return snap


def check_not_retrained(root: Path, snap: dict[str, tuple[int, list[str]]]) -> None:
    """A resumed trial continued its run: the lines up to its checkpoint are unchanged."""
    assert snap, "no trial had a checkpoint when the driver was killed"
    for tid, (_, kept) in snap.items():
        assert metrics_lines(root / tid)[: len(kept)] == kept, f"{tid} was retrained from scratch"


# -- grid and report arithmetic (no env) --------------------------------------------------------


def test_grid_axes_ids_and_values():
    assert parse_seeds(["0-2,7"]) == [0, 1, 2, 7]
    assert parse_seeds(["0", "3-4"]) == [0, 3, 4]
    axes = parse_sets(["beta=1,2.5", "iters=1,5", "compile=false"])
    assert axes == {"beta": [1.0, 2.5], "iters": [1, 5], "compile": [False]}
    base = {"steps": 10, "value": "model-free"}
    trials = expand_grid(base, {"env": ["Hopper-v5"], "agent": ["direct"], **axes, "seed": [0, 1]})
    assert [t.id for t in trials] == [
        f"Hopper-v5-direct-beta={b}-iters={i}-compile=false-s{s}"
        for b in ("1", "2.5")
        for i in (1, 5)
        for s in (0, 1)
    ]
    assert trials[0].options == {
        **base,
        "env": "Hopper-v5",
        "agent": "direct",
        "beta": 1.0,
        "iters": 1,
        "compile": False,
        "seed": 0,
    }
    for bad, message in [
        (["betta=1"], "unknown option 'betta'"),
        (["beta=x"], "not a valid float"),
        (["iters=1.5"], "not a valid int"),
        (["value=lol"], "not one of"),
        (["seed=1,2"], "--seeds"),
        (["out=a,b"], "not a sweep axis"),
        (["beta="], "empty grid"),
        (["beta"], "OPTION=V1,V2"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_sets(bad)
    with pytest.raises(UserError, match="share the id"):
        expand_grid(base, {"env": ["E"], "agent": ["direct"], "seed": [0, 0]})
    with pytest.raises(UserError, match="empty grid: --seeds"):
        expand_grid(base, {"env": ["E"], "agent": ["direct"], "seed": parse_seeds(["3-1"])})


def record(tid, cell, seed, returns, seconds, steps=None):
    evals = [
        {"step": 100 * (i + 1), "eval_return_mean": r, "train_seconds": s}
        for i, (r, s) in enumerate(zip(returns, seconds))
    ]
    return TrialRecord(tid, cell, seed, evals, steps or evals[-1]["step"], seconds[-1])


def test_report_aggregates_hand_checked_numbers():
    a, b = {"env": "E", "agent": "direct"}, {"env": "E", "agent": "iterative"}
    report = aggregate(
        [
            record("a0", a, 0, [1.0, 10.0], [5.0, 10.0]),
            record("a1", a, 1, [3.0, 14.0], [7.0, 20.0]),
            record("a2", a, 2, [2.0, 12.0, 30.0], [6.0, 12.0, 40.0]),
            record("b0", b, 0, [5.0, 4.0], [1.0, 2.0], steps=250),
        ]
    )
    assert report.axes == ["env", "agent"]
    ra, rb = report.rows
    assert (ra["agent"], ra["seeds"], rb["seeds"]) == ("direct", 3, 1)
    # final returns 10, 14, 30: mean 18, SD (n − 1) sqrt(((−8)² + (−4)² + 12²) / 2) = sqrt(112)
    assert ra["final_return_mean"] == pytest.approx(18.0)
    assert ra["final_return_sd"] == pytest.approx(math.sqrt(112))
    assert ra["best_return_mean"] == pytest.approx(18.0)  # each seed's best is its last here
    assert ra["steps_mean"] == pytest.approx(700 / 3)  # 200, 200, 300
    assert ra["wall_clock_s_mean"] == pytest.approx(70 / 3)  # 10, 20, 40
    assert ra["wall_clock_s_sd"] == pytest.approx(statistics.stdev([10, 20, 40]))
    # one seed: no SD; best (5) differs from final (4); steps from the checkpoint (250)
    assert (rb["final_return_mean"], rb["best_return_mean"], rb["steps_mean"]) == (4, 5, 250)
    assert math.isnan(rb["final_return_sd"])
    # the curve runs over the steps every seed reached, band = SD over seeds
    curve = report.curves["E direct"]
    assert curve.steps == [100, 200]
    assert curve.mean == pytest.approx([2.0, 12.0])
    assert curve.sd == pytest.approx([1.0, 2.0])
    assert curve.seconds == pytest.approx([6.0, 14.0])
    table = markdown_table(report)
    assert "| E | direct | 3 | 18.0 ± 10.6 | 18.0 ± 10.6 | 233 ± 58 | 23 ± 15 |" in table
    assert "| E | iterative | 1 | 4.0 | 5.0 | 250 | 2 |" in table


# -- bad input: one line on stderr, exit 2, nothing written ---------------------------------------


def one_line_error(capsys, argv, *expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbplan: error:"), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_bad_input_one_line(tmp_path, capsys, monkeypatch):
    base = ["sweep", "--name", "x", "--storage", str(tmp_path), *GRID, *map(str, TINY)]
    one_line_error(capsys, [*base, "--set", "betta=1,2"], "unknown option 'betta'", "beta")
    one_line_error(capsys, [*base[: -len(TINY)], "--seeds", "3-1"], "empty grid", "--seeds")
    one_line_error(capsys, [*base, "--set", "beta="], "empty grid", "beta")
    one_line_error(capsys, [*base, "--beta", "2", "--set", "beta=1,2"], "give it once")
    one_line_error(capsys, ["sweep", "--resume", str(tmp_path)], "not a sweep folder", "sweep.json")
    one_line_error(capsys, ["sweep", *GRID], "--name is required")
    one_line_error(capsys, ["sweep", "report", str(tmp_path)], "not a sweep folder")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    one_line_error(capsys, [*base, "--backend", "ray"], "needs Ray Tune", 'pip install -e ".[ray]"')
    assert not (tmp_path / "x").exists()


@pytest.mark.mujoco
def test_dry_run_prints_costs_and_launches_nothing(tmp_path, capsys):
    argv = ["sweep", "--name", "d", "--storage", str(tmp_path), *GRID, "--set", "beta=1,2.5"]
    assert main([*argv, "--steps", "10000", "--warmup", "1000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 of 8 trials to run" in out
    assert f"{ENV}-iterative-beta=2.5-s1" in out and "total" in out and "trial-hours" in out
    assert not (tmp_path / "d").exists()
    one_line_error(
        capsys, ["sweep", "--name", "d", "--storage", str(tmp_path), "--env", "Nope-v0"], "Nope-v0"
    )


# -- local backend ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The 2 × 2 grid run to the end on the local backend (2 processes), keeping lean results."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = run("--name", "grid", "--storage", tmp, *GRID, *TINY, "--keep", tmp / "keep", "--cpus", 2)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "grid", tmp / "keep" / "grid", out


@pytest.mark.slow
@pytest.mark.mujoco
def test_local_sweep_runs_the_grid(local_sweep):
    root, _, out = local_sweep
    check_trials_finished(root)
    assert "2 at a time" in out.stdout
    done = [line for line in out.stdout.splitlines() if line.startswith("done")]
    assert sorted(line.split()[1].rstrip(":") for line in done) == sorted(IDS)
    config = json.loads((root / IDS[0] / "config.json").read_text())
    assert (config["steps"], config["threads"], config["compile"]) == (STEPS, 1, False)


@pytest.mark.slow
@pytest.mark.mujoco
def test_report_matches_the_metrics(local_sweep, tmp_path):
    root, keep, _ = local_sweep
    out = run("report", root)
    assert out.returncode == 0, out.stderr
    report = root / "report"
    for name in ("report.csv", "report.md", "report.json"):
        assert (report / name).is_file()
    valid_png(report / "learning_curves.png")
    assert "| env | agent | seeds | final return |" in out.stdout
    rows = {r["agent"]: r for r in csv.DictReader((report / "report.csv").read_text().splitlines())}
    for agent in ("direct", "iterative"):
        evals = [read_evals(root / f"{ENV}-{agent}-s{s}" / "metrics.jsonl") for s in (0, 1)]
        final = [e[-1]["eval_return_mean"] for e in evals]
        best = [max(r["eval_return_mean"] for r in e) for e in evals]
        secs = [e[-1]["train_seconds"] for e in evals]
        row = rows[agent]
        assert int(row["seeds"]) == 2 and float(row["steps_mean"]) == STEPS
        assert float(row["final_return_mean"]) == pytest.approx(statistics.fmean(final))
        assert float(row["final_return_sd"]) == pytest.approx(statistics.stdev(final))
        assert float(row["best_return_mean"]) == pytest.approx(statistics.fmean(best))
        assert float(row["best_return_sd"]) == pytest.approx(statistics.stdev(best))
        assert float(row["wall_clock_s_mean"]) == pytest.approx(statistics.fmean(secs))
        assert float(row["wall_clock_s_sd"]) == pytest.approx(statistics.stdev(secs))

    # --keep: eval curves and lean final checkpoints, enough for the report without run folders
    for tid in IDS:
        curve = json.loads((keep / tid / "eval_curve.json").read_text())
        assert curve == read_evals(root / tid / "metrics.jsonl")
        assert (keep / tid / "eval_curve.csv").read_text().startswith("step,eval_return_mean")
        final = keep / tid / "final"
        assert completed_step(final) == STEPS
        assert not list(final.rglob("replay.safetensors")), "a lean checkpoint has no replay"
    kept = shutil.copytree(keep, tmp_path / "grid")  # as if the machine were gone
    out = run("report", kept, "--out", tmp_path / "r")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "report.csv").read_text() == (report / "report.csv").read_text()


@pytest.mark.slow
@pytest.mark.mujoco
def test_local_sweep_resumes_after_sigkill(tmp_path):
    root = tmp_path / "k"
    driver = start_killable("--name", "k", "--storage", tmp_path, *GRID, *TINY, "--cpus", 2)
    wait_for(lambda: list(root.glob("*/ckpt-*")), 120, "a first checkpoint", driver)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    # its trial processes notice the driver is gone and stop by themselves
    deadline = time.monotonic() + 60
    while group_alive(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(driver.pid):
        os.killpg(driver.pid, signal.SIGKILL)
        pytest.fail("trial processes outlived their killed driver by 60 s")
    assert not all(completed_step(root / tid) == STEPS for tid in IDS), "killed too late"
    snap = snapshot_before_resume(root)

    out = run("--resume", root, "--cpus", 2)
    assert out.returncode == 0, out.stderr[-3000:]
    check_trials_finished(root)
    check_not_retrained(root, snap)
    for tid, (step, _) in snap.items():
        if step < STEPS:
            assert f"resume {tid} from step {step}" in out.stdout


# -- Ray backend (a real local Ray instance) ------------------------------------------------------


def ray_processes(marker: str) -> list[int]:
    """Pids of live processes that inherited this test's marker (the Ray instance and workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ours = marker.encode() in (proc / "environ").read_bytes()
            if ours and (proc / "stat").read_text().split(") ")[-1][0] != "Z":  # not a zombie
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.mujoco
def test_ray_backend_runs_concurrently_and_restores_after_the_driver_is_killed(tmp_path):
    pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    root = tmp_path / "r"
    marker = f"MBPLAN_SWEEP_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    # ray.init(num_cpus=2) inside the driver; trials at 1 CPU each, the longer ones first
    grid = ["--env", ENV, "--agent", "iterative", "direct", "--seeds", "0-1"]
    args = ("--name", "r", "--storage", tmp_path, *grid, *TINY, "--backend", "ray", "--cpus", 2)
    driver = start_killable(*args, env_extra={key: value})

    def started():
        return [tid for tid in IDS if (root / tid / "config.json").is_file()]

    try:
        wait_for(lambda: len(started()) >= 2, 180, "two trials to start", driver)
    except pytest.fail.Exception:
        if driver.poll() is not None:
            text = driver.stdout.read()
            if "Ray could not start" in text:
                pytest.skip(f"Ray cannot start on this machine: {text.strip().splitlines()[-1]}")
        raise
    # a third trial waits for a free CPU, so two started and none finished means two at once
    assert not [tid for tid in IDS if completed_step(root / tid) == STEPS], "not concurrent"
    wait_for(lambda: list(root.glob("tune/*/checkpoint_*")), 180, "a Tune checkpoint", driver)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    with contextlib.suppress(ProcessLookupError):  # what is left of its local Ray instance
        os.killpg(driver.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # its trial workers stop once their raylet is gone
    while ray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = ray_processes(marker)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, "Ray workers outlived their cluster by 60 s"
    assert not all(completed_step(root / tid) == STEPS for tid in IDS), "killed too late"
    snap = snapshot_before_resume(root)

    out = run("--resume", root, "--cpus", 2)  # Tuner.restore(resume_errored=True)
    assert out.returncode == 0, out.stderr[-3000:]
    check_trials_finished(root)
    check_not_retrained(root, snap)
    for tid in IDS:  # each trial's Tune checkpoints carry its mbplan folder, replay included
        tune_ckpt = sorted((root / "tune" / tid).glob("checkpoint_*"))[-1]
        assert completed_step(tune_ckpt) == STEPS
        assert list(tune_ckpt.glob("ckpt-*/replay.safetensors"))
        assert list(tune_ckpt.glob("ckpt-*/optim_*.safetensors"))
