"""Model-based agents (--value model): frozen model twins, joint update, training and planning."""

import subprocess
import sys

import pytest
import torch

from mbplan.agent import Agent, AgentConfig
from mbplan.replay import Batch


def _batch(S, A, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    states, next_states = torch.randn(B, S, generator=g), torch.randn(B, S, generator=g)
    actions = torch.rand(B, A, generator=g) * 2 - 1
    return Batch(states, actions, torch.randn(B, generator=g), next_states, torch.zeros(B))


@pytest.mark.parametrize("kind", ["direct", "iterative"])
def test_frozen_twins_alias_and_stay_frozen(kind):
    S, A = 3, 2
    agent = Agent(S, A, AgentConfig(agent=kind, value="model", horizon=2, n_samples=3, n_iters=2,
                                    hidden=16))  # fmt: skip
    twin = agent._frozen["dynamics"]
    assert all(not p.requires_grad for p in twin.parameters())
    before = [p.clone() for p in agent.dynamics.parameters()]
    batch = _batch(S, A)
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
    loss, _ = agent.planner.loss(agent.objective(), _batch(S, A).states)
    agent._flat["trained"].grad.zero_()
    loss.backward()
    assert all(p.grad.abs().sum() == 0 for p in agent.dynamics.parameters())
    assert all(p.grad.abs().sum() == 0 for p in agent.reward.parameters())
    assert any(p.grad.abs().sum() > 0 for p in agent.planner.parameters())


def test_objective_after_updates_uses_the_current_weights():
    """The flat optimizer step does not bump the weights' versions; each objective() is fresh."""
    S, A = 3, 2
    agent = Agent(S, A, AgentConfig(agent="direct", value="model", horizon=2, n_samples=3,
                                    hidden=16))  # fmt: skip
    states = _batch(S, A).states
    dist = agent.planner(states)

    def both(objective):  # (fused, autograd) values with the same noise
        q_fn = objective.q_fn
        values = []
        for fused in (True, False):
            q_fn.fused = fused
            values.append(objective(states, dist, generator=torch.Generator().manual_seed(1)))
        return values[0].value, values[1].value

    before = agent.objective()
    assert before.q_fn._fused(states) is not None  # the fused rollout applies
    first = both(before)
    for seed in range(3):
        agent.update(_batch(S, A, seed=seed), torch.Generator().manual_seed(seed))
    fused, reference = both(agent.objective())
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, first[0])  # the update changed the value


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
