"""Ensemble dynamics and reward models: propagation, pessimism, bootstrap fits and elites."""

import pytest
import torch
from conftest import tiny_model_value

import mbplan
from mbplan.checkpoint import build_models, load_prefixed, model_tensors
from mbplan.distributions import TanhNormal
from mbplan.errors import UserError
from mbplan.fit import ensemble_errors, fit_models, keep_elites, rank_correlation
from mbplan.model_value import ModelValue
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward, select_members

S, A = 3, 2


def _ensemble(E=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    dyn, rew = EnsembleDynamics(S, A, E, hidden=16), EnsembleReward(S, A, E, hidden=16)
    for m in (dyn, rew):
        for p in m.net.parameters():
            torch.nn.init.normal_(p, std=0.3)  # distinct, non-trivial members
    return dyn.to(dtype).requires_grad_(False), rew.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("K", [10, 7])  # E divides K (regrouped rows) or not (zero rows padded)
def test_fixed_propagation_follows_member_k_mod_e(K):
    dyn, rew = _ensemble()
    B = 4
    s, a = torch.randn(K * B, S, dtype=torch.float64), torch.rand(K * B, A, dtype=torch.float64)
    every = dyn.members(s, a)  # (E, K·B, S)
    got = dyn.propagate(s, a, K, "fixed")
    for k in range(K):
        rows = slice(k * B, (k + 1) * B)
        torch.testing.assert_close(got[rows], every[k % 5, rows])
    torch.testing.assert_close(rew.propagate(s, a, K, "fixed"),
                               select_members(rew.members(s, a)[..., None], K)[:, 0])  # fmt: skip
    torch.testing.assert_close(dyn.propagate(s, a, K, "mean"), every.mean(0))


def test_one_member_ensemble_has_no_disagreement():
    dyn, _ = _ensemble(E=1)
    preds = dyn.members(
        torch.randn(6, S, dtype=torch.float64), torch.rand(6, A, dtype=torch.float64)
    )
    assert torch.equal(dyn.disagreement(preds), torch.zeros(6, dtype=torch.float64))


def _value(dyn, rew, **kw):
    base = tiny_model_value(horizon=1)
    return ModelValue(dyn, rew, base.critic, base.future_policy, 1, beta=1.0, gamma=0.99,
                      lam=0.0, alpha=0.1, **kw)  # fmt: skip


def test_pessimism_subtracts_kappa_times_disagreement_inside_retrace():
    """H = 1, λ_R = 0: Q̂ = r̂ − κ·u + γ(Q_1 − KL_1); κ changes Q̂ by exactly −κ·u."""
    dyn, rew = _ensemble()
    states = torch.randn(4, S, dtype=torch.float64)
    actions = 0.9 * torch.rand(6, 4, A, dtype=torch.float64)
    plain = _value(dyn, rew)(states, actions, torch.Generator().manual_seed(0))
    pessimistic = _value(dyn, rew, kappa=2.0)(states, actions, torch.Generator().manual_seed(0))
    s = states.expand(6, 4, S).reshape(24, S)
    u = dyn.disagreement(dyn.members(s, actions.reshape(24, A))).reshape(6, 4)
    torch.testing.assert_close(pessimistic, plain - 2.0 * u)
    assert (u > 0).all()


@pytest.mark.parametrize("propagation", ["fixed", "mean"])
def test_ensemble_objective_gradient_matches_finite_differences(propagation):
    dyn, rew = _ensemble()
    value = _value(dyn, rew, propagation=propagation, kappa=0.3)
    value.horizon = 2
    obj = mbplan.make_objective(value, alpha=0.1, n_samples=5)
    states = torch.randn(3, S, dtype=torch.float64)

    def J(loc, log_scale):
        return obj(
            states, TanhNormal(loc, log_scale), generator=torch.Generator().manual_seed(4)
        ).value

    loc = (0.3 * torch.randn(3, A, dtype=torch.float64)).requires_grad_()
    log_scale = (-1 + 0.1 * torch.randn(3, A, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(J, (loc, log_scale), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bad_propagation_and_kappa_are_refused():
    dyn, rew = _ensemble()
    with pytest.raises(ValueError, match="propagation"):
        _value(dyn, rew, propagation="random")
    with pytest.raises(ValueError, match="κ"):
        _value(dyn, rew, kappa=-1.0)
    with pytest.raises(ValueError, match="member"):
        EnsembleDynamics(S, A, 0)


def _linear_data(n=3000, seed=0):
    """One long trajectory of s' = 0.9·s + W·a (so open-loop sequences exist)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(A, S, generator=g) * 0.5
    a = torch.rand(n, A, generator=g) * 2 - 1
    states = [torch.randn(S, generator=g)]
    for t in range(n):
        states.append(0.9 * states[-1] + a[t] @ W)
    s = torch.stack(states)  # (n + 1, S)
    r = (s[:-1] * a.sum(-1, keepdim=True)).sum(-1)
    return {"states": s[:-1], "actions": a, "rewards": r, "next_states": s[1:],
            "terminated": torch.zeros(n)}  # fmt: skip


def test_bootstrap_fit_learns_and_members_differ_then_elites_keep_the_best():
    data = _linear_data()
    train = {k: v[:2500] for k, v in data.items()}
    held = {k: v[2500:] for k, v in data.items()}
    torch.manual_seed(0)
    dyn, rew = EnsembleDynamics(S, A, 4, hidden=32), EnsembleReward(S, A, 4, hidden=32)
    log = fit_models(dyn, rew, train, 300, 64, 3e-3, torch.Generator().manual_seed(0))
    assert log[-1]["dynamics_loss"] < 0.5 * log[0]["dynamics_loss"]
    with torch.no_grad():
        preds = dyn.members(held["states"], held["actions"])
    assert (preds[0] - preds[1]).abs().mean() > 1e-4  # bootstrap + init: members differ
    from mbplan.fit import member_errors

    errors = member_errors(dyn, rew, held)
    kept = keep_elites(dyn, rew, held, 2)
    assert kept == sorted(errors.argsort()[:2].tolist()) and dyn.n_members == 2
    assert rew.n_members == 2 and rew.members(held["states"], held["actions"]).shape[0] == 2
    report = ensemble_errors(dyn, rew, held, 2)
    assert len(report["member_state_nrmse"]) == 2 and len(report["mean_state_nrmse"]) == 2
    assert all(-1 <= c <= 1 for c in report["disagreement_rank_corr"])


def test_rank_correlation():
    x = torch.arange(10.0)
    assert rank_correlation(x, x**3) == pytest.approx(1.0)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)


def test_model_folder_round_trip_and_member_count_mismatch():
    dyn, rew = _ensemble(E=3, dtype=torch.float32)
    tensors = model_tensors(dyn, rew)
    d2, r2 = build_models(S, A, {"members": 3, "hidden": 16})
    load_prefixed(d2, tensors, "dynamics.")
    load_prefixed(r2, tensors, "reward.")
    s, a = torch.randn(5, S), torch.rand(5, A)
    torch.testing.assert_close(d2(s, a), dyn(s, a))
    d4, _ = build_models(S, A, {"members": 4, "hidden": 16})
    with pytest.raises(UserError, match="do not fit"):
        load_prefixed(d4, tensors, "dynamics.")
    with pytest.raises(UserError, match="members"):
        build_models(S, A, {"members": 0})


@pytest.mark.parametrize("propagation", ["fixed", "mean"])
def test_model_based_agent_trains_an_ensemble(propagation):
    from conftest import make_batch

    from mbplan.agent import Agent, AgentConfig

    config = AgentConfig(agent="iterative", value="model", horizon=2, n_samples=6, n_iters=2,
                         hidden=16, ensemble=3, propagation=propagation, kappa=0.1)  # fmt: skip
    agent = Agent(S, A, config)
    assert isinstance(agent.dynamics, EnsembleDynamics) and agent.dynamics.n_members == 3
    before = agent.dynamics.net.net[0].weight.clone()
    for seed in range(2):
        metrics = agent.update(make_batch(16, seed=seed), torch.Generator().manual_seed(seed))
        assert all(torch.isfinite(v) for v in metrics.values())
    assert not torch.equal(before, agent.dynamics.net.net[0].weight)
    value = agent.objective().q_fn
    assert value.propagation == propagation and value.kappa == 0.1
