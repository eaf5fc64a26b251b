"""Dynamics and reward models, Retrace, and the model-based objective (DESIGN.md §6)."""

import pytest
import torch
from conftest import tiny_model_value

import mbplan
from mbplan.distributions import TanhNormal
from mbplan.fit import fit_models, open_loop_errors, sequence_starts, split_holdout
from mbplan.models.dynamics import Dynamics, EulerSpec, Reward
from mbplan.models.retrace import retrace

H, N = 4, 6


def _rollout_terms(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, N, generator=g), torch.randn(H + 1, N, generator=g),
            torch.rand(H, N, generator=g))  # fmt: skip


def test_retrace_lambda_zero_is_one_step_model_estimate():
    r, q, kl = _rollout_terms()
    assert torch.allclose(retrace(r, q, kl, 0.9, 0.0), r[0] + 0.9 * (q[1] - kl[0]))


def test_retrace_lambda_one_is_h_step_return_with_terminal_q():
    r, q, kl = _rollout_terms()
    g = 0.9
    expected = sum(g**t * r[t] - g ** (t + 1) * kl[t] for t in range(H)) + g**H * q[H]
    assert torch.allclose(retrace(r, q, kl, g, 1.0), expected, atol=1e-6)


def test_retrace_horizon_one_lambda_one():
    r, q, kl = _rollout_terms()
    assert torch.allclose(retrace(r[:1], q[:2], kl[:1], 0.97, 1.0), r[0] + 0.97 * (q[1] - kl[0]))


def test_retrace_rejects_bad_shapes():
    r, q, kl = _rollout_terms()
    with pytest.raises(ValueError):
        retrace(r, q[:-1], kl, 0.9, 0.5)


def _linear_system(n=4000, S=3, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = 0.3 * torch.randn(S, S, generator=g) + 0.9 * torch.eye(S)
    Bm = torch.randn(S, A, generator=g)
    w = torch.randn(S + A, generator=g)
    s = torch.randn(n, S, generator=g)
    a = torch.rand(n, A, generator=g) * 2 - 1
    s2 = s @ M.T + a @ Bm.T
    r = torch.cat([s, a], -1) @ w
    data = {
        "states": s,
        "actions": a,
        "rewards": r,
        "next_states": s2,
        "terminated": torch.zeros(n),
    }
    return data, (M, Bm, w)


def test_models_recover_a_linear_system():
    torch.manual_seed(0)
    data, (M, Bm, w) = _linear_system()
    dyn, rew = Dynamics(3, 2, hidden=64), Reward(3, 2, hidden=64)
    log = fit_models(dyn, rew, data, steps=1500, batch_size=256, lr=3e-3,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert log[-1]["dynamics_loss"] < 0.05 * log[0]["dynamics_loss"]
    g = torch.Generator().manual_seed(5)
    s = torch.randn(500, 3, generator=g) * 0.8
    a = torch.rand(500, 2, generator=g) * 2 - 1
    with torch.no_grad():
        pred = dyn(s, a)
        true = s @ M.T + a @ Bm.T
        rel = (pred - true).norm() / (true - s).norm()
        r_rel = (rew(s, a) - torch.cat([s, a], -1) @ w).norm() / (torch.cat([s, a], -1) @ w).norm()
    assert rel < 0.1, rel
    assert r_rel < 0.1, r_rel


def test_euler_integrates_positions_and_wraps_angles():
    spec = EulerSpec(pos_dims=(0, 1), vel_dims=(2, 3), vel_of_pos=(0, 1), dt=0.1, angle_dims=(1,))
    dyn = Dynamics(4, 1, hidden=8, euler=spec)
    s = torch.tensor([[1.0, 3.1, 2.0, 5.0]])
    with torch.no_grad():
        out = dyn(s, torch.zeros(1, 1))  # zero-initialised head: velocities unchanged
    assert torch.allclose(out[0, 2:], s[0, 2:])
    assert out[0, 0] == pytest.approx(1.0 + 0.1 * 2.0)
    wrapped = 3.1 + 0.1 * 5.0 - 2 * torch.pi
    assert out[0, 1] == pytest.approx(float(wrapped), abs=1e-5)


def test_sequence_starts_and_open_loop_errors():
    data, _ = _linear_system(50)
    # Chain the transitions into two episodes of 25: next_states[j] = states[j+1] inside each.
    data["next_states"][:24] = data["states"][1:25]
    data["next_states"][25:49] = data["states"][26:50]
    starts = sequence_starts(data, 3)
    assert starts.tolist() == list(range(0, 23)) + list(range(25, 48))
    dyn, rew = Dynamics(3, 2, hidden=8), Reward(3, 2, hidden=8)
    errs = open_loop_errors(dyn, rew, data, 3)
    assert len(errs["state_rmse"]) == 3 and all(e > 0 for e in errs["reward_rmse"])
    train, held = split_holdout(data, 0.1)
    assert train["states"].shape[0] == 45 and held["states"].shape[0] == 5


def test_model_objective_gradient_matches_finite_differences():
    value = tiny_model_value(horizon=3)
    obj = mbplan.make_objective(value, alpha=0.1, n_samples=4)
    states = torch.randn(5, 3, dtype=torch.float64)

    def J(loc, log_scale):
        dist = TanhNormal(loc, log_scale)
        return obj(states, dist, generator=torch.Generator().manual_seed(4)).value

    loc = (0.3 * torch.randn(5, 2, dtype=torch.float64)).requires_grad_()
    log_scale = (-1 + 0.1 * torch.randn(5, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(J, (loc, log_scale), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_model_value_records_rollouts_and_lambda_zero_is_one_step():
    value = tiny_model_value(horizon=5, lam=0.0)
    value.record = []
    states, actions = (
        torch.randn(4, 3, dtype=torch.float64),
        torch.rand(6, 4, 2, dtype=torch.float64),
    )
    v = value(states, actions, generator=torch.Generator().manual_seed(0))
    (ro,) = value.record
    assert ro.states.shape == (6, 6, 4, 3) and ro.rewards.shape == (5, 6, 4)
    assert torch.allclose(v, ro.rewards[0] + 0.99 * (ro.q[1] - ro.kl[0]))


def test_every_planner_runs_on_the_model_objective():
    value = tiny_model_value(horizon=2, dtype=torch.float32)
    obj = mbplan.make_objective(value, alpha=0.1, n_samples=4, state_dim=3, action_dim=2)
    states = torch.randn(7, 3)
    for name in mbplan.PLANNERS:
        planner = mbplan.make_planner(name, state_dim=3, action_dim=2)
        res = planner.plan(obj, states, n_iters=2, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(res.trace.objective).all()
