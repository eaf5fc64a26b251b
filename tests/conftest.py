import pytest
import torch

import mbplan

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
