"""One switch, MBPLAN_FAST=0 or mbplan.fast.disabled(), sends every fast path to its plain twin."""

import os
import subprocess
import sys

import torch
from conftest import make_batch, tiny_model_value

from mbplan import fast
from mbplan.agent import Agent, AgentConfig
from mbplan.distributions import TanhNormal
from mbplan.fast.malloc import tune_malloc
from mbplan.models.critic import EnsembleQ


def test_disabled_nests_and_restores():
    assert fast.enabled()
    with fast.disabled():
        assert not fast.enabled()
        with fast.disabled():
            assert not fast.enabled()
        assert not fast.enabled()
    assert fast.enabled()


def test_environment_variable_turns_every_fast_path_off():
    code = (
        "import torch, mbplan.fast as f, mbplan.fast.malloc as m;"
        "from mbplan.agent import Agent, AgentConfig;"
        "a = Agent(3, 2, AgentConfig(agent='direct', n_samples=1));"
        "print(f.enabled(), a._fused_grads, m.tune_malloc())"
    )
    for value, expected in (("0", "False False False"), ("1", "True True True")):
        env = {**os.environ, "MBPLAN_FAST": value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == expected.split()


def _graph_names(t: torch.Tensor, depth: int = 3) -> str:
    """Names of the autograd nodes within ``depth`` steps of ``t``."""
    names, frontier = [], [t.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names += [type(f).__name__ for f in frontier]
        frontier = [g for f in frontier for g, _ in f.next_functions]
    return " ".join(names)


def test_each_fast_path_obeys_the_switch():
    agent = Agent(3, 2, AgentConfig(agent="direct", n_samples=1))
    critic = EnsembleQ(3, 2, n_members=2, hidden=8).requires_grad_(False)
    states, actions = torch.randn(5, 3), torch.rand(5, 2).requires_grad_()
    value = tiny_model_value(horizon=2)
    s64 = torch.randn(2, 3, dtype=torch.float64)
    dist = TanhNormal(torch.zeros(4, 2, requires_grad=True), torch.zeros(4, 2))

    def nodes():
        q = critic(states, actions)
        _, _, log_prob = dist.rsample_log_prob(2)
        return {
            "sac": agent._fused_grads,
            "critic": _graph_names(q),
            "sample": _graph_names(log_prob),
            "rollout": value._fused(s64) is not None,
            "malloc": tune_malloc(),
        }

    on = nodes()
    with fast.disabled():
        off = nodes()
    assert on["sac"] and not off["sac"]
    assert "FrozenActionGrad" in on["critic"] and "FrozenActionGrad" not in off["critic"]
    assert "SampleLogProb" in on["sample"] and "SampleLogProb" not in off["sample"]
    assert on["rollout"] and not off["rollout"]
    assert on["malloc"] and not off["malloc"]
    assert agent.update(make_batch(8), torch.Generator().manual_seed(0))  # still trains either way
