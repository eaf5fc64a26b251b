"""The direct model-free update with hand-written gradients (fast.fused_sac) equals autograd."""

import pytest
import torch
from conftest import make_batch

from mbplan import fast
from mbplan.agent import Agent, AgentConfig
from mbplan.fast import fused_sac
from mbplan.replay import Batch

S, A = 3, 2


def _perturbed_agent(seed: int, K: int, E: int = 2) -> Agent:
    """A direct agent in float64 whose zero-initialised heads and bounds are randomised."""
    torch.manual_seed(seed)
    config = AgentConfig(agent="direct", n_samples=K, n_critics=E, beta=1.5)
    agent = Agent(S, A, config).double()
    with torch.no_grad():
        for p in [*agent.planner.net[-1].parameters(), *agent.planner.bounds.parameters()]:
            p.add_(0.5 * torch.randn_like(p))
        agent.planner.net[-1].bias[0] = 12.0  # dim 0 saturates: its clamp cuts the gradient
        for p in agent.target_critic.parameters():
            p.mul_(1.3)
        agent.log_alpha.fill_(-0.7)
    return agent


@pytest.mark.parametrize(("K", "E"), [(1, 2), (3, 2), (2, 3)])
def test_fused_direct_update_equals_autograd(K, E):
    fused, plain = _perturbed_agent(0, K, E), _perturbed_agent(0, K, E)
    plain.fused_update = False
    assert fused_sac.supports(fused._sac_parts) and not plain._fused_grads
    for step in range(3):
        batch = make_batch(64, seed=step, terminated=[step % 2, 0, 1] + [0] * 61)
        batch = Batch(*(t.double() for t in (batch.states, batch.actions, batch.rewards,
                                              batch.next_states, batch.terminated)))  # fmt: skip
        fused._flat["trained"].grad.fill_(torch.nan)  # every gradient must be written, not added
        m_fused = fused.update(batch, torch.Generator().manual_seed(step))
        m_plain = plain.update(batch, torch.Generator().manual_seed(step))
        torch.testing.assert_close(
            fused._flat["trained"].grad, plain._flat["trained"].grad, rtol=1e-9, atol=1e-12
        )
        assert m_fused.keys() == m_plain.keys()
        for k in m_plain:
            torch.testing.assert_close(m_fused[k], m_plain[k], rtol=1e-9, atol=1e-12)
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_direct_update_applies_only_where_it_is_exact():
    assert fused_sac.supports(Agent(S, A, AgentConfig(agent="direct", n_samples=1))._sac_parts)
    assert Agent(S, A, AgentConfig(agent="direct", n_samples=10))._fused_supported
    assert not fused_sac.supports(
        Agent(S, A, AgentConfig(agent="direct", n_samples=4, n_critics=1))._sac_parts
    )
    for config in (AgentConfig(agent="direct", n_samples=4, n_critics=1),
                   AgentConfig(agent="iterative", n_samples=1),
                   AgentConfig(agent="direct", n_samples=1, value="model")):  # fmt: skip
        assert not Agent(S, A, config)._fused_supported
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=1))
    assert agent._fused_grads
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not agent._fused_grads
    with fast.disabled():  # the one switch sends the update back to autograd
        assert not agent._fused_grads
    assert agent._fused_grads


def _k1_batch(seed: int, B: int = 32) -> Batch:
    return make_batch(B, seed=seed, terminated=[seed % 2] + [0] * (B - 1))


def test_compiled_fused_update_equals_eager():
    """``torch.compile`` of the hand-written gradients (the trainer's default for K = 1)."""
    torch.manual_seed(0)
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=1))
    flat = agent._flat["trained"]
    for seed in range(2):
        batch = _k1_batch(seed)
        eager_metrics = fused_sac.direct_update_grads(
            agent._sac_parts, batch, torch.Generator().manual_seed(seed)
        )
        eager = flat.grad.clone()
        flat.grad.fill_(torch.nan)
        metrics = fused_sac.direct_update_grads(
            agent._sac_parts, batch, torch.Generator().manual_seed(seed), compiled=True
        )
        assert fused_sac._compiled_grads not in (None, False)  # it compiled and ran
        torch.testing.assert_close(flat.grad, eager, rtol=1e-5, atol=1e-6)
        for k, v in eager_metrics.items():
            torch.testing.assert_close(metrics[k], v, rtol=1e-5, atol=1e-6)
        agent.optim.step()


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused_sac, "_compiled_grads", None)
    monkeypatch.setattr(torch, "compile", broken)
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=1))
    agent.compile_update = True
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        metrics = agent.update(_k1_batch(0), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert fused_sac._compiled_grads is False
    agent.update(_k1_batch(1), torch.Generator().manual_seed(1))  # no second warning, eager
