"""Agent: the critic target, critic loss and α update on hand-built numbers; Polyak averaging."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch

from mbplan.agent import Agent, AgentConfig
from mbplan.distributions import target_kl
from mbplan.replay import Batch

S, A = 3, 2


def set_constant_q(critic, values) -> None:
    """Zero every weight and set member e's head bias to values[e], so Q_e(s, a) = values[e]."""
    with torch.no_grad():
        for p in critic.parameters():
            p.zero_()
        critic.head.bias[:, 0, 0] = torch.tensor(values)


def initial_log_scale() -> float:
    """Soft clamp of a zero raw log σ with m = −10, M = 0.5 (DESIGN.md §4)."""
    m, M = -10.0, 0.5
    upper = M - F.softplus(torch.tensor(M - 0.0)).item()
    return m + F.softplus(torch.tensor(upper - m)).item()


def expected_target(agent: Agent, batch: Batch, q_values, seed: int) -> torch.Tensor:
    """y recomputed from the formulas of DESIGN.md §3 and §5, with a' drawn from the same seed."""
    cfg = agent.config
    B = batch.rewards.shape[0]
    sigma = math.exp(initial_log_scale())
    eps = torch.randn(1, B, A, generator=torch.Generator().manual_seed(seed))[0]  # (B, A)
    u = 0.0 + sigma * eps  # pre-tanh a' (μ = 0 from the zero-initialised heads)
    log_normal = -0.5 * (u / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    log_pi = (log_normal - torch.log(1 - torch.tanh(u) ** 2 + 1e-6)).sum(-1)  # (B,)
    log_prior = -A * math.log(2.0)
    q = torch.tensor(q_values, dtype=torch.float64)
    q_hat = q.mean() - cfg.beta * torch.sqrt(q.var(unbiased=True) + 1e-6)
    alpha = agent.log_alpha.detach().exp()
    bracket = q_hat.float() - alpha * (log_pi - log_prior)
    return batch.rewards + cfg.gamma * (1 - batch.terminated) * bracket


def test_initial_direct_policy_is_zero_mean_clamped_scale():
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    dist = agent.policy(make_batch(5).next_states)
    assert torch.equal(dist.loc, torch.zeros(5, A))
    torch.testing.assert_close(dist.log_scale, torch.full((5, A), initial_log_scale()))


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_critic_target_matches_hand_computation(beta):
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4, beta=beta))
    q_values = (1.5, -0.5)
    set_constant_q(agent.target_critic, q_values)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.3))
    batch = make_batch(6, seed=1, terminated=[0, 0, 1, 0, 1, 0])
    y = agent.critic_target(batch, torch.Generator().manual_seed(7))
    assert y.shape == (6,)
    expected = expected_target(agent, batch, q_values, seed=7)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # Terminal rows are exactly the reward; others are not.
    done = batch.terminated == 1
    assert torch.equal(y[done], batch.rewards[done])
    assert not torch.allclose(y[~done], batch.rewards[~done])


def test_critic_target_uses_the_agents_pessimism_not_the_min():
    # E = 2, β = 1: Q̂ = mean − |c1 − c2|/√2 (plus the 1e-6), below min(c1, c2).
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    set_constant_q(agent.target_critic, (2.0, 0.0))
    with torch.no_grad():
        agent.log_alpha.fill_(-30.0)  # α ≈ 0: isolate the Q̂ term
    batch = make_batch(4, seed=2)
    y = agent.critic_target(batch, torch.Generator().manual_seed(0))
    q_hat = 1.0 - math.sqrt(2.0 + 1e-6)
    torch.testing.assert_close(y, batch.rewards + 0.99 * q_hat, rtol=0, atol=1e-5)


def test_critic_target_terminal_is_reward_exactly():
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    batch = make_batch(8, seed=3, terminated=torch.ones(8))
    y = agent.critic_target(batch, torch.Generator().manual_seed(0))
    assert torch.equal(y, batch.rewards)


def test_critic_target_same_seed_same_value():
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    batch = make_batch(8, seed=4)
    a = agent.critic_target(batch, torch.Generator().manual_seed(11))
    b = agent.critic_target(batch, torch.Generator().manual_seed(11))
    c = agent.critic_target(batch, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_critic_loss_matches_hand_computation():
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    set_constant_q(agent.critic, (1.0, -2.0))
    batch = make_batch(4, seed=5)
    y = torch.tensor([0.0, 1.0, 2.0, -1.0])
    loss = agent.critic_loss(batch, y)
    per_state = [0.5 * ((1.0 - t) ** 2 + (-2.0 - t) ** 2) for t in y.tolist()]
    expected = sum(per_state) / len(per_state)  # (2.5 + 4.5 + 8.5 + 2.5) / 4
    assert expected == pytest.approx(4.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_alpha_decreases_when_kl_below_target():
    # The initial policy is wide (σ ≈ 0.62), so KL̂ to the uniform prior is far below A(1 + log 2).
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    metrics = agent.update(make_batch(16, seed=6), torch.Generator().manual_seed(0))
    kl = metrics["kl"].item()
    assert kl < target_kl(A)
    # With α = 1 before the step the loss is −(KL̂ − target), and Adam's first step is ≈ lr.
    assert metrics["alpha_loss"].item() == pytest.approx(-(kl - target_kl(A)), rel=1e-5)
    assert agent.log_alpha.item() == pytest.approx(-agent.config.lr, rel=1e-3)
    assert metrics["alpha"].item() == pytest.approx(math.exp(-agent.config.lr), rel=1e-6)


def test_alpha_increases_when_kl_above_target():
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    with torch.no_grad():
        agent.planner.net[-1].bias[A:] = -8.0  # raw log σ = −8: a narrow policy, large KL̂
    metrics = agent.update(make_batch(16, seed=6), torch.Generator().manual_seed(0))
    assert metrics["kl"].item() > target_kl(A)
    assert agent.log_alpha.item() == pytest.approx(agent.config.lr, rel=1e-3)


def test_update_changes_weights_and_polyak_averages_target():
    tau = 0.05
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4, tau=tau))
    with torch.no_grad():  # make the target differ from the critic so the average is visible
        for p in agent.target_critic.parameters():
            p.mul_(0.5)
    old_critic = [p.detach().clone() for p in agent.critic.parameters()]
    old_target = [p.detach().clone() for p in agent.target_critic.parameters()]
    old_planner = [p.detach().clone() for p in agent.planner.parameters()]

    metrics = agent.update(make_batch(16, seed=7), torch.Generator().manual_seed(0))

    assert all(torch.isfinite(v) for v in metrics.values())
    new_critic = list(agent.critic.parameters())
    assert all(not torch.equal(o, p) for o, p in zip(old_critic, new_critic))
    assert any(not torch.equal(o, p) for o, p in zip(old_planner, agent.planner.parameters()))
    for old, new, critic in zip(old_target, agent.target_critic.parameters(), new_critic):
        expected = (1 - tau) * old + tau * critic.detach()
        torch.testing.assert_close(new.detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(new, old)


def test_target_critic_is_frozen():
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
    agent.update(make_batch(8, seed=8), torch.Generator().manual_seed(0))
    for p in agent.target_critic.parameters():
        assert not p.requires_grad
        assert p.grad is None
    trained = {id(p) for group in agent.optim.param_groups for p in group["params"]}
    assert all(id(p) not in trained for p in agent.target_critic.parameters())
    # Ĵ's critic is the frozen target: its gradient reaches the actions, not the weights.
    states = torch.randn(4, S)
    dist = agent.planner(states)
    agent.objective()(states, dist).value.sum().backward()
    assert all(p.grad is None for p in agent.target_critic.parameters())


def test_update_is_deterministic_given_the_seed():
    def run():
        torch.manual_seed(0)
        agent = Agent(S, A, AgentConfig(agent="direct", n_samples=4))
        g = torch.Generator().manual_seed(1)
        for seed in range(3):
            agent.update(make_batch(8, seed=seed), g)
        return agent.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_iterative_update_returns_finite_metrics():
    agent = Agent(S, A, AgentConfig(agent="iterative", n_iters=2, n_samples=3))
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in agent.planner.parameters()]
    for seed in range(2):
        metrics = agent.update(make_batch(8, seed=seed), g)
    expected = {"critic_loss", "actor_loss", "alpha_loss", "alpha", "kl", "q_target", "improvement"}
    assert expected <= set(metrics)
    for name, value in metrics.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        assert not value.requires_grad, name
    assert any(not torch.equal(o, p) for o, p in zip(before, agent.planner.parameters()))
    action = agent.act(torch.zeros(S).numpy(), deterministic=False, generator=g)
    assert action.shape == (A,) and (abs(action) < 1).all()
