"""Training loop, resume after a kill, and the train/eval CLI (MuJoCo InvertedPendulum-v5)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch

import mbplan
from mbplan.checkpoint import (
    LATEST,
    completed_checkpoints,
    find_checkpoint,
    load_agent,
    load_checkpoint,
)
from mbplan.envs import EnvSpec, check_env_matches
from mbplan.errors import UserError
from mbplan.train import Trainer, TrainOptions, eval_checkpoint

ENV = "InvertedPendulum-v5"  # S = 4, A = 1


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_cli(*args, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mbplan.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
    )


def smoke_options(agent: str, out: Path) -> TrainOptions:
    return TrainOptions(
        env=ENV,
        agent=agent,
        steps=300,
        warmup=100,
        batch_size=32,
        samples=3,
        iters=2,
        eval_interval=150,
        eval_episodes=1,
        checkpoint_interval=100,
        log_interval=50,
        buffer_size=1000,
        out=str(out),
    )


def train(agent: str, out: Path):
    opts = smoke_options(agent, out)
    trainer = Trainer(opts)
    return opts, trainer, trainer.run()


def read_metrics(run_dir: Path) -> list[dict]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        records.append(record)
    return records


def check_metric_invariants(records: list[dict], max_step: int) -> None:
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), "metric lines out of step order"
    assert all(1 <= s <= max_step for s in steps)
    episodes = [r["episode"] for r in records if "episode_return" in r]
    assert episodes == list(range(len(episodes))), "episode lines missing or repeated"


def checkpoint_step(run_dir: Path) -> int | None:
    try:
        name = (run_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return int(name.removeprefix("ckpt-")) if name else None


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    """A small trained direct run, shared by the smoke test and the eval tests."""
    out = tmp_path_factory.mktemp("direct") / "run"
    return train("direct", out)


def check_smoke_run(opts: TrainOptions, trainer: Trainer, summary: dict) -> None:
    run_dir = Path(opts.out)
    assert summary["steps"] == opts.steps
    records = read_metrics(run_dir)
    check_metric_invariants(records, opts.steps)

    # Training lines: every log_interval steps once updates have started.
    updates = [r for r in records if "critic_loss" in r]
    assert [r["step"] for r in updates] == [150, 200, 250, 300]
    for r in updates:
        for key in ("critic_loss", "actor_loss", "alpha_loss", "alpha", "kl", "q_target"):
            assert math.isfinite(r[key]), (key, r)
        assert r["alpha"] > 0
        if opts.agent == "iterative":
            assert math.isfinite(r["improvement"])

    evals = [r for r in records if "eval_return_mean" in r]
    assert [r["step"] for r in evals] == [150, 300]
    for r in evals:
        assert len(r["eval_returns"]) == opts.eval_episodes
        assert math.isfinite(r["eval_return_mean"]) and r["eval_return_mean"] > 0
    # The rate of policy change: none before the first evaluation, then a KL the updates moved
    assert evals[0]["policy_kl"] is None
    assert math.isfinite(evals[1]["policy_kl"]) and evals[1]["policy_kl"] > 0
    assert summary["last_eval"] == evals[-1]["eval_return_mean"]
    assert any("episode_return" in r for r in records)

    config = json.loads((run_dir / "config.json").read_text())
    for f in fields(TrainOptions):
        assert f.name in config, f.name
        assert config[f.name] == getattr(opts, f.name), f.name
    assert config["mbplan_version"] == mbplan.__version__
    assert config["env_spec"]["state_dim"] == 4 and config["env_spec"]["action_dim"] == 1

    assert [p.name for p in completed_checkpoints(run_dir)] == ["ckpt-000000200", "ckpt-000000300"]
    assert checkpoint_step(run_dir) == 300
    groups, meta = load_checkpoint(run_dir)
    assert groups["replay"]["states"].shape == (300, 4)
    assert meta["config"] == asdict(opts)

    agent, loaded_config = load_agent(run_dir)
    assert agent.config.agent == opts.agent and agent.config.n_samples == opts.samples
    assert loaded_config["env_spec"]["state_dim"] == 4
    expected = trainer.agent.state_dict()
    for key, value in agent.state_dict().items():
        assert torch.equal(value, expected[key]), key
    action = agent.act(np.zeros(4, dtype=np.float32), deterministic=True)
    assert action.shape == (1,) and np.isfinite(action).all()


@pytest.mark.slow
@pytest.mark.mujoco
def test_smoke_direct(direct_run):
    check_smoke_run(*direct_run)


@pytest.mark.slow
@pytest.mark.mujoco
def test_smoke_iterative(tmp_path):
    check_smoke_run(*train("iterative", tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.mujoco
def test_resume_after_kill(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--env", ENV, "--agent", "direct", "--steps", "3000", "--warmup", "200"]
    args += ["--batch-size", "32", "--samples", "2", "--checkpoint-interval", "200"]
    args += ["--eval-interval", "0", "--buffer-size", "5000", "--log-interval", "100"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mbplan.cli", *args, "--out", str(run)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
        try:
            deadline = time.monotonic() + 240
            while (checkpoint_step(run) or 0) < 400:
                if proc.poll() is not None:
                    pytest.fail(f"training exited early with {proc.returncode}")
                if time.monotonic() > deadline:
                    pytest.fail("no checkpoint at step >= 400 within 240 s")
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # Every completed checkpoint of the killed run loads and is self-consistent.
    done = completed_checkpoints(run)
    assert done
    for ckpt in done:
        groups, meta = load_checkpoint(ckpt)
        assert meta["step"] == int(ckpt.name.removeprefix("ckpt-")) >= 200
        assert groups["replay"]["states"].shape[0] == meta["step"]  # capacity 5000: nothing lost
    killed_at = load_checkpoint(run)[1]["step"]
    assert killed_at >= 400

    out = run_cli("train", "--resume", run, "--steps", "800")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "800 steps" in out.stdout
    groups, meta = load_checkpoint(run)
    assert find_checkpoint(run).name == "ckpt-000000800"
    assert meta["step"] == 800
    assert groups["replay"]["states"].shape[0] == 800  # warm-up + collected, none lost or doubled
    assert meta["config"]["steps"] == 800
    records = read_metrics(run)  # raises on a malformed line
    check_metric_invariants(records, max_step=800)
    assert [r["step"] for r in records if "critic_loss" in r] == list(range(300, 801, 100))


def assert_one_line_error(out) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbplan"), out.stderr
    assert "error:" in lines[0], out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--env", "Nope-v0"],
        ["train", "--env", "CartPole-v1"],
        ["train", "--steps", "0"],
        ["train", "--agent", "newton"],
        ["train", "--resume", "/nonexistent/run"],
        ["train", "--ste", "10"],
        ["eval", "--checkpoint", "/nonexistent/run"],
        ["eval"],
    ],
    ids=[
        "unknown-env",
        "discrete-env",
        "zero-steps",
        "bad-agent",
        "resume-missing",
        "abbreviated-flag",
        "eval-missing",
        "eval-no-checkpoint",
    ],
)
def test_cli_errors_exit_2_with_one_line(args):
    assert_one_line_error(run_cli(*args))


@pytest.mark.mujoco
def test_eval_corrupt_checkpoint_exits_2(direct_run, tmp_path):
    run_dir = Path(direct_run[0].out)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(find_checkpoint(run_dir), ckpt)
    (ckpt / "weights.safetensors").write_bytes(b"\x07garbage, not safetensors" * 3)
    out = run_cli("eval", "--checkpoint", ckpt, "--episodes", "1")
    assert_one_line_error(out)
    assert "corrupt checkpoint" in out.stderr


def test_check_env_matches():
    saved = {"env_id": ENV, "state_dim": 4, "action_dim": 1}
    check_env_matches(EnvSpec(ENV, 4, 1, 0.04, 1000), saved)
    with pytest.raises(UserError, match="S=4, A=1"):
        check_env_matches(EnvSpec("Hopper-v5", 11, 3, 0.008, 1000), saved)
    with pytest.raises(UserError):
        check_env_matches(EnvSpec("Other-v0", 4, 2, None, None), saved)


@pytest.mark.mujoco
def test_checkpoint_on_another_env_is_a_user_error(direct_run, tmp_path):
    run_dir = Path(direct_run[0].out)
    with pytest.raises(UserError, match="Hopper-v5"):
        eval_checkpoint(str(run_dir), episodes=1, seed=0, video=None, env_id="Hopper-v5")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    opts = TrainOptions(**{**asdict(direct_run[0]), "env": "Hopper-v5", "out": str(copy)})
    with pytest.raises(UserError, match="Hopper-v5"):
        Trainer(opts, resume=True)


@pytest.mark.mujoco
def test_eval_prints_mean_and_std(direct_run):
    out = run_cli("eval", "--checkpoint", direct_run[0].out, "--episodes", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.fullmatch(r"return -?\d+\.\d ± \d+\.\d over 2 episodes", out.stdout.strip())


@pytest.mark.mujoco
def test_eval_writes_video(direct_run, tmp_path):
    video = tmp_path / "out.mp4"
    out = run_cli(
        "eval",
        "--checkpoint",
        direct_run[0].out,
        "--episodes",
        "1",
        "--video",
        video,
        env=cli_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"video written to {video}" in out.stdout
    data = video.read_bytes()
    assert len(data) > 1000
    assert data[4:8] == b"ftyp"  # an MP4 container
