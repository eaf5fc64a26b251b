"""Model-based agents (--value model): frozen model twins, joint update, training and planning."""

import subprocess
import sys

import pytest
import torch
from conftest import make_batch

from mbplan.agent import Agent, AgentConfig


@pytest.mark.parametrize("kind", ["direct", "iterative"])
def test_frozen_twins_alias_and_stay_frozen(kind):
    S, A = 3, 2
    agent = Agent(S, A, AgentConfig(agent=kind, value="model", horizon=2, n_samples=3, n_iters=2,
                                    hidden=16))  # fmt: skip
    twin = agent._frozen["dynamics"]
    assert all(not p.requires_grad for p in twin.parameters())
    before = [p.clone() for p in agent.dynamics.parameters()]
    batch = make_batch(8)
    data = {f: getattr(batch, f) for f in ("states", "actions", "rewards", "next_states")}
    agent.fit_model_normalizers(data)
    metrics = agent.update(batch, torch.Generator().manual_seed(0))
    assert {"dynamics_loss", "reward_loss"} <= set(metrics)
    assert ("distill_loss" in metrics) == (kind == "iterative")
    assert any(not torch.equal(b, p) for b, p in zip(before, agent.dynamics.parameters()))
    for live, alias in zip(agent.dynamics.parameters(), twin.parameters(), strict=True):
        assert torch.equal(live, alias)  # the twin sees the update at once
    assert torch.equal(twin.inputs.mean, agent.dynamics.inputs.mean)


def test_actor_loss_sends_no_gradient_into_the_model():
    S, A = 3, 2
    agent = Agent(S, A, AgentConfig(agent="direct", value="model", horizon=3, n_samples=3,
                                    hidden=16))  # fmt: skip
    torch.nn.init.normal_(agent.dynamics.net[-1].weight, std=0.3)
    loss, _ = agent.planner.loss(agent.objective(), make_batch(8).states)
    agent._flat["trained"].grad.zero_()
    loss.backward()
    assert all(p.grad.abs().sum() == 0 for p in agent.dynamics.parameters())
    assert all(p.grad.abs().sum() == 0 for p in agent.reward.parameters())
    assert any(p.grad.abs().sum() > 0 for p in agent.planner.parameters())


@pytest.mark.slow
@pytest.mark.mujoco
@pytest.mark.parametrize("kind", ["direct", "iterative"])
def test_train_model_based_and_plan(tmp_path, kind):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mbplan.cli"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [*cmd, "train", "--env", "InvertedPendulum-v5", "--agent", kind, "--value", "model",
         "--horizon", "2", "--steps", "130", "--warmup", "100", "--model-warmup", "10",
         "--batch-size", "8", "--samples", "2", "--iters", "2", "--eval-interval", "0",
         "--log-interval", "10", "--out", str(run), "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = (run / "metrics.jsonl").read_text()
    assert "warmup_dynamics_loss" in metrics and '"dynamics_loss"' in metrics
    out = subprocess.run(
        [*cmd, "plan", "--checkpoint", str(run), "--planner", kind, "--horizon", "3",
         "--max-steps", "3", "--samples", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ms/action" in out.stdout
