"""FastIterativePlan: the iterative planner's plan as one function equals Planner.plan."""

import pytest
import torch
from conftest import randomize, tiny_model_value, with_ensemble

import mbplan
from mbplan.distributions import TanhNormal
from mbplan.fast.fast_plan import FastIterativePlan, value_and_grad
from mbplan.objective import AnchoredObjective


def _setup(dtype=torch.float64, horizon=3, alpha=0.1, ensemble=None):
    value = randomize(tiny_model_value(horizon, dtype=dtype, alpha=alpha))
    if ensemble is not None:  # (E, propagation, κ)
        value = with_ensemble(value, *ensemble)
    objective = mbplan.make_objective(value, alpha=alpha, n_samples=4, state_dim=3, action_dim=2)
    planner = mbplan.make_planner("iterative", state_dim=3, action_dim=2, hidden=16).to(dtype)
    with torch.no_grad():  # a non-trivial optimizer (its last layer starts at zero)
        torch.nn.init.normal_(planner.net[-1].weight, std=0.3)
    planner.requires_grad_(False)
    states = torch.randn(3, 3, dtype=dtype, generator=torch.Generator().manual_seed(2))
    return objective, planner, states


def _assert_same_plan(planner, objective, states, init, fast, tol):
    kwargs = {"init": init, "n_iters": 4}
    ref = planner.plan(objective, states, **kwargs, generator=torch.Generator().manual_seed(9),
                       record_objective=False)  # fmt: skip
    out = fast.plan(objective, states, **kwargs, generator=torch.Generator().manual_seed(9))
    for a, b in ((out.trace.loc, ref.trace.loc), (out.trace.log_scale, ref.trace.log_scale),
                 (out.trace.objective[:-1], ref.trace.objective[:-1])):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert torch.isnan(out.trace.objective[-1]).all()  # Ĵ(λ_I) is not evaluated
    torch.testing.assert_close(out.dist.loc, ref.dist.loc, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("trust", [0.0, 0.7])
def test_fast_plan_equals_the_planner_loop(alpha, trust):
    objective, planner, states = _setup(alpha=alpha)
    init = None
    if trust:
        g = torch.Generator().manual_seed(4)
        like = {"generator": g, "dtype": torch.float64}
        anchor = TanhNormal(0.5 * torch.randn(3, 2, **like), -1 + 0.3 * torch.randn(3, 2, **like))
        objective, init = AnchoredObjective(objective, anchor, trust), anchor
    assert FastIterativePlan.applies(objective, states) is not None
    out = _assert_same_plan(planner, objective, states, init, FastIterativePlan(planner), 1e-9)
    assert (out.trace.loc[-1] != out.trace.loc[0]).any()  # the plan moved


@pytest.mark.parametrize("ensemble", [(2, "fixed", 0.0), (3, "fixed", 0.5), (2, "mean", 0.0)])
def test_fast_plan_on_an_ensemble_equals_the_planner_loop(ensemble):
    objective, planner, states = _setup(ensemble=ensemble)
    fused = FastIterativePlan.applies(objective, states)
    assert fused is not None and fused.n_members == ensemble[0]
    out = _assert_same_plan(planner, objective, states, None, FastIterativePlan(planner), 1e-9)
    assert (out.trace.loc[-1] != out.trace.loc[0]).any()


def test_fast_plan_gradient_ignores_non_finite_values_of_clamped_samples(monkeypatch):
    """As autograd's clamp backward: a clamped sample adds 0 even where ∂Q̂/∂a is not finite."""
    objective, planner, states = _setup()
    fused = FastIterativePlan.applies(objective, states)
    backward = type(fused).backward

    def nan_where_clamped(self, tape, actions, n_state):
        g = backward(self, tape, actions, n_state)
        return torch.where(actions.abs() >= 1 - 1e-6, torch.nan, g)

    monkeypatch.setattr(type(fused), "backward", nan_where_clamped)
    dist = TanhNormal(
        torch.full((3, 2), 0.3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    )
    dist.loc[:, 0] = 7.0  # most samples of dim 0 are clamped
    g = torch.Generator().manual_seed(1)
    _, grad_loc, grad_log_scale = planner.value_and_grad(objective, states, dist, g)
    K, B, A, H = 4, 3, 2, 3
    g = torch.Generator().manual_seed(1)
    eps0 = torch.randn(K, B, A, generator=g, dtype=torch.float64)
    eps_future = torch.stack([torch.randn((1, K * B, A), generator=g, dtype=torch.float64)[0]
                              for _ in range(H)])  # fmt: skip
    _, fast_loc, fast_log_scale = value_and_grad(fused, states, dist.loc, dist.log_scale, eps0,
                                                 eps_future, 0.1)  # fmt: skip
    assert torch.isfinite(grad_loc).all() and grad_loc[:, 0].abs().sum() > 0
    torch.testing.assert_close(fast_loc, grad_loc, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fast_log_scale, grad_log_scale, rtol=1e-9, atol=1e-10)


def test_fast_plan_falls_back_where_it_does_not_apply(quadratic):
    q_fn, _ = quadratic(3, 2, dtype=torch.float64)
    objective = mbplan.make_objective(q_fn, alpha=0.1, n_samples=4, state_dim=3, action_dim=2)
    _, planner, states = _setup()
    assert FastIterativePlan.applies(objective, states) is None
    _assert_same_plan(planner, objective, states, None, FastIterativePlan(planner), 0.0)


def test_fast_plan_rejects_bad_input():
    objective, planner, states = _setup()
    fast = FastIterativePlan(planner)
    with pytest.raises(ValueError, match="n_iters"):
        fast.plan(objective, states, n_iters=0)
    with pytest.raises(ValueError, match="NaN"):
        fast.plan(objective, states.clone().fill_(float("nan")))


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", [None, (2, "fixed", 0.0)])
def test_compiled_fast_plan_equals_the_planner_loop(ensemble):
    """torch.compile of one round (inductor, float32): equal to rounding, and one graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # α as a tensor, as checkpoints hold it: its float() must stay out of the compiled code
    objective, planner, states = _setup(
        dtype=torch.float32, horizon=2, alpha=torch.tensor(0.1), ensemble=ensemble
    )
    fast = FastIterativePlan(planner, compile=True)
    _assert_same_plan(planner, objective, states, None, fast, 1e-3)
    assert not counters["graph_break"], dict(counters["graph_break"])
