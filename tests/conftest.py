import pytest
import torch

import mbplan
from mbplan.model_value import ModelValue
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward
from mbplan.replay import Batch

# Small tensors: one thread is as fast, and immune to oversubscription on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def quadratic_family(state_dim: int, action_dim: int, seed: int = 0, dtype=torch.float32):
    """q(s, a) = −‖a − t(s)‖², with optimum t(s) = 0.8·tanh(W s) inside (−1, 1)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(action_dim, state_dim, generator=g, dtype=dtype)

    def target(states):
        return 0.8 * torch.tanh(states @ W.T)  # (B, A)

    def q_fn(states, actions):
        return -(actions - target(states)).square().sum(-1)  # (K, B)

    return q_fn, target


@pytest.fixture
def quadratic():
    return quadratic_family


def make(name: str, state_dim: int, action_dim: int, **hp):
    return mbplan.make_planner(name, state_dim=state_dim, action_dim=action_dim, **hp)


# -- shared builders (imported by tests as `from conftest import ...`) --


def make_batch(B: int, seed: int = 0, terminated=None, S: int = 3, A: int = 2) -> Batch:
    """A random replay batch of B transitions (S = 3, A = 2 as the agent tests use)."""
    g = torch.Generator().manual_seed(seed)
    return Batch(
        states=torch.randn(B, S, generator=g),
        actions=torch.rand(B, A, generator=g) * 2 - 1,
        rewards=torch.randn(B, generator=g),
        next_states=torch.randn(B, S, generator=g),
        terminated=torch.zeros(B) if terminated is None else torch.as_tensor(terminated).float(),
    )


def tiny_model_value(horizon, dtype=torch.float64, lam=0.9, members=2, beta=1.0, alpha=0.1):
    """A small ModelValue (S = 3, A = 2) with non-trivial frozen networks."""
    torch.manual_seed(1)
    S, A = 3, 2
    dyn = Dynamics(S, A, hidden=16).to(dtype)
    rew = Reward(S, A, hidden=16).to(dtype)
    for m in (dyn, rew):
        torch.nn.init.normal_(m.net[-1].weight, std=0.3)  # non-trivial models
    critic = EnsembleQ(S, A, n_members=members, hidden=16).to(dtype)
    torch.nn.init.normal_(critic.head.weight, std=0.3)
    policy = mbplan.make_planner("direct", state_dim=S, action_dim=A, hidden=16).to(dtype)
    torch.nn.init.normal_(policy.net[-1].weight, std=0.3)
    for m in (dyn, rew, critic, policy):
        m.requires_grad_(False)
    return ModelValue(dyn, rew, critic, policy, horizon, beta=beta, gamma=0.99, lam=lam,
                      alpha=alpha)  # fmt: skip


def randomize(value: ModelValue) -> ModelValue:
    """Non-trivial normalizers, LayerNorm affines and soft-clamp bounds (the fusion folds them)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (value.dynamics, value.reward, value.future_policy):
            for p in module.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for model in (value.dynamics, value.reward):
            model.inputs.mean.normal_(generator=g)
            model.inputs.std.uniform_(0.5, 2.0, generator=g)
        value.dynamics.delta_scale.std.uniform_(0.5, 2.0, generator=g)
        value.reward.scale.fill_(1.7)
        value.reward.offset.fill_(-0.4)
    return value


def with_ensemble(
    value: ModelValue, n_members: int, propagation: str = "fixed", kappa: float = 0.0
) -> ModelValue:
    """``value`` with a frozen E-member ensemble model (distinct, non-trivial members) instead."""
    g = torch.Generator().manual_seed(7)
    S, A = value.dynamics.state_dim, value.dynamics.action_dim
    dtype = value.dynamics.delta_scale.std.dtype
    dyn = EnsembleDynamics(S, A, n_members, hidden=16).to(dtype)
    rew = EnsembleReward(S, A, n_members, hidden=16).to(dtype)
    with torch.no_grad():
        for model in (dyn, rew):
            for p in model.parameters():  # zero heads and unit affines made non-trivial
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
            model.inputs.mean.normal_(generator=g)
            model.inputs.std.uniform_(0.5, 2.0, generator=g)
        dyn.delta_scale.std.uniform_(0.5, 2.0, generator=g)
        rew.scale.fill_(1.3)
        rew.offset.fill_(0.2)
    v = value
    return ModelValue(dyn.requires_grad_(False), rew.requires_grad_(False), v.critic,
                      v.future_policy, v.horizon, beta=v.beta, gamma=v.gamma, lam=v.lam,
                      alpha=v.alpha, propagation=propagation, kappa=kappa)  # fmt: skip
