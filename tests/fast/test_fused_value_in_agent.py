"""The agent's model objective takes the fused rollout and follows the weights through updates."""

import torch
from conftest import make_batch

from mbplan.agent import Agent, AgentConfig


def test_objective_after_updates_uses_the_current_weights():
    """The flat optimizer step does not bump the weights' versions; each objective() is fresh."""
    S, A = 3, 2
    agent = Agent(S, A, AgentConfig(agent="direct", value="model", horizon=2, n_samples=3,
                                    hidden=16))  # fmt: skip
    states = make_batch(8).states
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
        agent.update(make_batch(8, seed=seed), torch.Generator().manual_seed(seed))
    fused, reference = both(agent.objective())
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, first[0])  # the update changed the value
