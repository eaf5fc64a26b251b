"""Pure unit tests of bench/viz helpers (no MuJoCo, no subprocess)."""

import pytest
import torch
from conftest import quadratic_family

import mbplan
from mbplan.bench.planners import Curve, sweep_score, tune
from mbplan.bench.value_bias import soft_returns
from mbplan.objective import make_objective
from mbplan.viz.surface import evaluate_fixed_noise


def test_fixed_noise_is_shared_across_the_batch():
    objective = make_objective(lambda s, a: -(a - 0.3).square().sum(-1), alpha=0.1, n_samples=4)
    state = torch.zeros(1, 3)
    loc = torch.tensor([[0.5, -0.2], [0.1, 0.0], [0.5, -0.2], [0.5, -0.2]])  # (N, A)
    log_scale = torch.full_like(loc, -1.0)
    once = evaluate_fixed_noise(objective, state, loc, log_scale, batch=4, seed=0)
    assert once[0] == once[2] == once[3]  # same λ, same noise, anywhere in the batch
    by_one = evaluate_fixed_noise(objective, state, loc, log_scale, batch=1, seed=0)
    assert torch.allclose(once, by_one)  # and in any batch size


def test_sweep_score_and_tune_on_analytic_objective():
    S, A, B = 3, 2, 8
    q_fn, _ = quadratic_family(S, A)
    objective = mbplan.make_objective(q_fn, alpha=0.05, state_dim=S, action_dim=A)
    states = torch.randn(B, S, generator=torch.Generator().manual_seed(0))
    points = tune(objective, states, "adam", [1e-4, 1e-1, 1e-4], iters=20)
    assert [p.lr for p in points] == [1e-4, 1e-1]  # duplicates run once
    assert [p.chosen for p in points] == [False, True]  # a tiny step barely moves
    curve = Curve(*(torch.arange(3.0) for _ in range(3)), torch.tensor([0.0, 1.0, 3.0]))
    assert sweep_score(curve) == 2.0  # mean over iterates 1..I, λ_0 excluded
    curve.objective[1] = -torch.inf  # a non-finite value is the worst, never a good one
    assert sweep_score(curve) == -float("inf")


def test_value_bias_soft_return():
    import numpy as np

    r, kl, gamma, alpha = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.1, 0.2]), 0.9, 0.5
    g = soft_returns(r, kl, gamma, alpha)
    # Q(s_t, a_t) = r_t + Σ_k γ^k (r_{t+k} − α KL_{t+k}); the first action pays no KL
    assert g[2] == pytest.approx(3.0)
    assert g[1] == pytest.approx(2.0 + 0.9 * (3.0 - 0.5 * 0.2))
    assert g[0] == pytest.approx(1.0 + 0.9 * (2.0 - 0.05) + 0.81 * (3.0 - 0.1))
