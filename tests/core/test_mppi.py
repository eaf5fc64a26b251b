"""mppi: the sequence score, the update, NaN handling, determinism and the warm start."""

import math
import warnings

import pytest
import torch
from conftest import quadratic_family, tiny_model_value

import mbplan
from mbplan.checkpoint import default_bundle
from mbplan.distributions import TanhNormal, squash
from mbplan.mpc import MPC, PlanSettings, load_setup, model_objective
from mbplan.objective import AnchoredObjective, pessimistic
from mbplan.planners import MPPIPlanner, shift_sequence
from mbplan.planners.mppi import planning_horizon, policy_sequences, sequence_value

S, A = 3, 2


def _model_objective(horizon, K=4):
    value = tiny_model_value(horizon)
    objective = mbplan.make_objective(value, alpha=0.1, n_samples=K, state_dim=S, action_dim=A)
    return objective, value


def _score(value, states, loc):
    """Score of the mean sequence [H, B, A] (pre-tanh) of a plan, [B]."""
    return sequence_value(value, states, squash(loc).unsqueeze(1))[0]


def _plan(planner, objective, states, seed=0, **kw):
    return planner.plan(objective, states, generator=torch.Generator().manual_seed(seed), **kw)


def test_sequence_score_is_the_hand_computation_at_h2():
    objective, value = _model_objective(horizon=2)
    g = torch.Generator().manual_seed(0)
    states = torch.randn(4, S, generator=g, dtype=torch.float64)
    actions = torch.rand(2, 5, 4, A, generator=g, dtype=torch.float64) * 2 - 1  # (H, N, B, A)
    got = sequence_value(value, states, actions)  # (N, B)
    gamma = value.gamma
    for n in range(5):
        s0, a0, a1 = states, actions[0, n], actions[1, n]
        s1 = value.dynamics(s0, a0)
        s2 = value.dynamics(s1, a1)
        end = torch.tanh(value.future_policy(s2).loc)
        q = pessimistic(value.critic(s2, end), value.beta)
        want = value.reward(s0, a0) + gamma * value.reward(s1, a1) + gamma**2 * q
        torch.testing.assert_close(got[n], want)
    # The policy candidates are scored by the same formula, in the same pass
    pre, scores = policy_sequences(value, states, 6, torch.Generator().manual_seed(1))
    assert pre.shape == (2, 6, 4, A) and scores.shape == (6, 4)
    torch.testing.assert_close(scores, sequence_value(value, states, squash(pre)))
    assert planning_horizon(objective) == 2


def test_improves_over_iterations_and_beats_random():
    objective, value = _model_objective(horizon=3)
    states = torch.randn(8, S, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    planner = mbplan.make_planner("mppi")
    scores = [_score(value, states, _plan(planner, objective, states, n_iters=i).warm)
              for i in (1, 3, 6)]  # fmt: skip
    start = _score(value, states, torch.zeros(3, 8, A, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    random = torch.rand(3, 512, 8, A, generator=g, dtype=torch.float64) * 2 - 1
    random_mean = sequence_value(value, states, random).mean(0)  # (B,)
    assert scores[0].mean() > start.mean()
    assert scores[0].mean() < scores[1].mean() < scores[2].mean()
    assert (scores[2] > random_mean).all()
    assert (scores[2] > start).all()


def test_evaluation_counts_and_no_policy_candidates():
    objective, value = _model_objective(horizon=2, K=4)
    states = torch.randn(5, S, dtype=torch.float64)
    # 24 policy + 488 sampled sequences, then 488 per iteration; K = 4 rows per evaluation
    res = _plan(mbplan.make_planner("mppi"), objective, states, n_iters=3)
    assert res.trace.n_evals.tolist() == [0, 128, 250, 372]
    plain = _plan(MPPIPlanner(policy_samples=0), objective, states, n_iters=3)
    assert plain.trace.n_evals.tolist() == [0, 128, 256, 384]
    assert torch.isfinite(plain.trace.objective).all() and torch.isfinite(plain.warm).all()
    start = _score(value, states, torch.zeros(2, 5, A, dtype=torch.float64))
    assert _score(value, states, plain.warm).mean() > start.mean()
    # Without a model (an analytic q_fn) H = 1 and every candidate is sampled
    q_fn, target = quadratic_family(S, A)
    analytic = mbplan.make_objective(q_fn, alpha=0.05, state_dim=S, action_dim=A)
    states = torch.randn(6, S)
    res = _plan(mbplan.make_planner("mppi"), analytic, states)
    assert res.warm.shape == (1, 6, A)
    assert res.trace.n_evals.tolist() == pytest.approx([51.2 * k for k in range(7)])
    assert (res.dist.mode() - target(states)).abs().max() < 0.05


def test_nan_scores_rank_last():
    target = torch.tensor([0.5, -0.3])

    def q_nan(states, actions):  # optimum at a_0 = 0.5, but NaN wherever a_0 > 0
        q = -(actions - target).square().sum(-1)  # (K, B)
        return torch.where(actions[..., 0] > 0, torch.full_like(q, torch.nan), q)

    objective = mbplan.make_objective(q_nan, alpha=0.05, state_dim=S, action_dim=A)
    res = _plan(mbplan.make_planner("mppi"), objective, torch.randn(4, S))
    # NaN as 0 (TD-MPC2's nan_to_num) would beat every finite value and pull a_0 above 0
    assert (res.dist.loc[:, 0] <= 0).all()
    assert (res.dist.mode()[:, 1] - target[1]).abs().max() < 0.05
    assert torch.isfinite(res.dist.loc).all() and torch.isfinite(res.dist.log_scale).all()


def test_same_generator_same_result():
    objective, _ = _model_objective(horizon=2)
    states = torch.randn(3, S, dtype=torch.float64)
    planner = mbplan.make_planner("mppi")
    a, b = (_plan(planner, objective, states, seed=5, n_iters=2) for _ in range(2))
    c = _plan(planner, objective, states, seed=6, n_iters=2)
    assert torch.equal(a.warm, b.warm) and torch.equal(a.dist.log_scale, b.dist.log_scale)
    assert torch.equal(a.trace.objective, b.trace.objective)
    assert not torch.equal(a.warm, c.warm)


def test_warm_start_shift():
    seq = torch.arange(12.0).reshape(3, 2, 2)
    shifted = shift_sequence(seq)
    assert torch.equal(shifted[:2], seq[1:]) and torch.equal(shifted[2], torch.zeros(2, 2))

    objective, value = _model_objective(horizon=3)
    states = torch.randn(4, S, dtype=torch.float64)
    plain = MPPIPlanner(policy_samples=0)
    done = _plan(plain, objective, states)
    assert done.warm.shape == (3, 4, A) and torch.equal(done.warm[0], done.dist.loc)
    # Without init, step 0 starts at the warm sequence's first mean with σ = init_scale
    res = _plan(plain, objective, states, n_iters=1, warm=done.warm)
    assert torch.equal(res.trace.loc[0], done.warm[0])
    assert torch.allclose(res.trace.log_scale[0], torch.full((4, A), math.log(2.0)).double())
    # From the previous plan's sequence one iteration scores higher than one from scratch
    cold = _plan(plain, objective, states, n_iters=1)
    assert _score(value, states, res.warm).mean() > _score(value, states, cold.warm).mean()
    # init still gives step 0
    init = TanhNormal(torch.full((4, A), 0.3).double(), torch.full((4, A), -1.0).double())
    res = _plan(plain, objective, states, n_iters=1, init=init, warm=shift_sequence(done.warm))
    assert torch.equal(res.trace.loc[0], init.loc)
    with pytest.raises(ValueError, match=r"warm must be .*\[3, 4, 2\]"):
        plain.plan(objective, states, warm=done.warm[:2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        plain.plan(objective, states, warm=torch.full_like(done.warm, torch.nan))
    with pytest.raises(ValueError, match="no warm start"):
        mbplan.make_planner("cem").plan(objective, states, warm=done.warm)


def test_trust_region_pulls_the_first_action_to_the_anchor():
    objective, _ = _model_objective(horizon=2)
    states = torch.randn(4, S, dtype=torch.float64)
    anchor = TanhNormal(torch.full((4, A), 0.6).double(), torch.full((4, A), -2.0).double())
    free = _plan(mbplan.make_planner("mppi"), objective, states)
    tied = _plan(mbplan.make_planner("mppi"), AnchoredObjective(objective, anchor, 100.0), states)
    assert (tied.dist.loc - 0.6).abs().max() < 0.1 < (free.dist.loc - 0.6).abs().max()


def test_bad_hyperparameters():
    for bad in ({"policy_samples": 512}, {"elites": 0}, {"elites": 513}, {"temperature": 0.0},
                {"scale_bounds": (0.0, 2.0)}, {"init_scale": math.nan}):  # fmt: skip
        with pytest.raises(ValueError):
            MPPIPlanner(**bad)


def test_mpc_warm_starts_and_warns_past_the_fitted_horizon():
    setup = load_setup(default_bundle())
    assert setup.model_horizon == 5
    planner = MPPIPlanner(samples=32, policy_samples=4, elites=8)
    objective, _ = model_objective(setup, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # H = 2 <= 5: no warning
        mpc = MPC(setup, planner, objective, PlanSettings(iters=2, init="previous"))
    state = torch.randn(setup.state_dim, generator=torch.Generator().manual_seed(0))
    _, first = mpc.act(state)
    assert torch.equal(mpc._warm, shift_sequence(first.warm))
    _, second = mpc.act(state)
    assert torch.equal(second.trace.loc[0], first.warm[1])  # init "previous": the shifted mean
    mpc.reset()
    assert mpc._warm is None
    objective, _ = model_objective(setup, 6)
    with pytest.warns(UserWarning, match=r"H = 6 model steps, longer than the 5 steps"):
        MPC(setup, planner, objective, PlanSettings(iters=1))
