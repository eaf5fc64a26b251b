"""Contract every registered planner must meet (a new registry entry is tested automatically)."""

import pytest
import torch
from conftest import make, quadratic_family

import mbplan
from mbplan.distributions import TanhNormal

NAMES = sorted(mbplan.PLANNERS)


def _objective(S, A, **kw):
    q_fn, _ = quadratic_family(S, A)
    return mbplan.make_objective(q_fn, alpha=0.05, state_dim=S, action_dim=A, **kw)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B", [1, 7, 1024])
@pytest.mark.parametrize("A", [1, 6])
def test_shapes_and_finite(name, B, A):
    S = 5
    planner = make(name, S, A)
    I = min(planner.default_iters, 5)  # no per-name table: any registered planner runs
    res = planner.plan(_objective(S, A), torch.randn(B, S), n_iters=I)
    assert res.dist.loc.shape == (B, A) and res.dist.log_scale.shape == (B, A)
    assert torch.isfinite(res.dist.loc).all() and torch.isfinite(res.dist.log_scale).all()
    tr = res.trace
    assert tr.n_iters == I
    assert tr.objective.shape == (I + 1, B)
    assert tr.loc.shape == (I + 1, B, A) and tr.log_scale.shape == (I + 1, B, A)
    assert tr.n_evals.shape == (I + 1,) and tr.elapsed.shape == (I + 1,)
    assert torch.isfinite(tr.objective).all()
    assert (tr.n_evals.diff() >= 0).all() and (tr.elapsed.diff() >= 0).all()
    assert torch.equal(tr.loc[-1], res.dist.loc)
    assert not res.dist.loc.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_default_start_and_warm_start(name):
    S, A, B = 3, 2, 4
    planner = make(name, S, A)
    obj = _objective(S, A)
    res = planner.plan(obj, torch.randn(B, S), n_iters=2)
    assert torch.equal(res.trace.loc[0], torch.zeros(B, A))
    assert torch.allclose(res.trace.log_scale[0], torch.full((B, A), 0.5).log())
    init = TanhNormal(torch.full((B, A), 0.3), torch.full((B, A), -1.0))
    res = planner.plan(obj, torch.randn(B, S), init=init, n_iters=2)
    assert torch.equal(res.trace.loc[0], init.loc)
    assert torch.equal(res.trace.log_scale[0], init.log_scale)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_generator(name):
    S, A, B = 4, 3, 16
    planner = make(name, S, A)
    obj, states = _objective(S, A), torch.randn(B, S)
    runs = [
        planner.plan(obj, states, n_iters=3, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].dist.loc, runs[1].dist.loc)
    assert torch.equal(runs[0].trace.objective, runs[1].trace.objective)


@pytest.mark.parametrize("name", NAMES)
def test_nan_objective_is_worst_and_lambda_stays_finite(name):
    S, A, B = 3, 2, 6
    q_fn, _ = quadratic_family(S, A)
    bad = torch.tensor([True, False, True, False, False, False])

    def nan_q(states, actions):
        q = q_fn(states, actions)  # (K, B)
        return torch.where(bad, torch.full_like(q, torch.nan), q)

    obj = mbplan.make_objective(nan_q, alpha=0.05, state_dim=S, action_dim=A)
    res = make(name, S, A).plan(obj, torch.randn(B, S), n_iters=3)
    assert torch.isfinite(res.dist.loc).all() and torch.isfinite(res.dist.log_scale).all()
    assert (res.trace.objective[:, bad] == -torch.inf).all()
    assert torch.isfinite(res.trace.objective[:, ~bad]).all()


@pytest.mark.parametrize("name", NAMES)
def test_bad_states_raise(name):
    S, A = 3, 2
    planner, obj = make(name, S, A), _objective(S, A)
    with pytest.raises(ValueError, match="width"):
        planner.plan(obj, torch.randn(4, S + 1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        planner.plan(obj, torch.tensor([[0.0, torch.nan, 0.0]]))
    with pytest.raises(ValueError, match="n_iters"):
        planner.plan(obj, torch.randn(4, S), n_iters=0)
    with pytest.raises(ValueError, match="init"):
        planner.plan(obj, torch.randn(4, S), init=TanhNormal(torch.zeros(3, A), torch.zeros(3, A)))


def test_unknown_planner_lists_names():
    with pytest.raises(ValueError, match="adam, cem"):
        mbplan.make_planner("newton")


def test_amortized_planner_needs_sizes():
    with pytest.raises(ValueError, match="state_dim"):
        mbplan.make_planner("iterative")


def test_evaluation_counts():
    S, A, B = 3, 2, 5
    obj, states = _objective(S, A), torch.randn(B, S)
    assert make("iterative", S, A).plan(obj, states).trace.n_evals.tolist() == [0, 1, 2, 3, 4, 5]
    assert make("adam", S, A).plan(obj, states, n_iters=3).trace.n_evals.tolist() == [0, 1, 2, 3]
    # CEM's population of 100 samples is 10 evaluations of K = 10 samples.
    assert make("cem", S, A).plan(obj, states, n_iters=2).trace.n_evals.tolist() == [0, 10, 20]
    assert make("direct", S, A).plan(obj, states).trace.n_evals.tolist() == [0, 0]
