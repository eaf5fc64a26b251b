"""The distribution and the objective Ĵ(s, λ) (DESIGN.md §3)."""

import math

import pytest
import torch
from conftest import quadratic_family

import mbplan
from mbplan.distributions import TanhNormal, kl_to_uniform, target_kl, uniform_log_prob


def test_log_prob_matches_change_of_variables():
    loc, log_scale = torch.tensor([[0.3, -0.5]]), torch.tensor([[-0.7, 0.1]])
    dist = TanhNormal(loc, log_scale)
    actions, pre_tanh = dist.rsample(5, torch.Generator().manual_seed(0))
    base = torch.distributions.Normal(loc, log_scale.exp())
    expected = (base.log_prob(pre_tanh) - torch.log(1 - torch.tanh(pre_tanh) ** 2 + 1e-6)).sum(-1)
    assert torch.allclose(dist.log_prob(pre_tanh), expected, atol=1e-5)
    assert actions.shape == (5, 1, 2) and (actions.abs() < 1).all()


def test_uniform_prior_and_kl_target():
    assert uniform_log_prob(6) == pytest.approx(-6 * math.log(2))
    assert target_kl(6) == pytest.approx(6 * (1 + math.log(2)))


def test_kl_of_near_uniform_policy_is_small():
    # A wide tanh-Normal is close to uniform only in spirit; a sanity bound on the MC estimate.
    dist = TanhNormal(torch.zeros(1, 1), torch.zeros(1, 1) + math.log(0.8))
    _, u = dist.rsample(200_000, torch.Generator().manual_seed(0))
    kl = kl_to_uniform(dist, u)
    assert 0 < kl.item() < 0.2


def test_objective_value_is_mean_q_minus_alpha_kl():
    S, A, B, K = 3, 2, 4, 10
    q_fn, _ = quadratic_family(S, A)
    obj = mbplan.make_objective(q_fn, alpha=0.3, n_samples=K)
    dist = TanhNormal(torch.randn(B, A), torch.randn(B, A) * 0.1)
    states = torch.randn(B, S)
    out = obj(states, dist, generator=torch.Generator().manual_seed(1))
    assert out.sample_values.shape == (K, B) and out.actions.shape == (K, B, A)
    expected = out.sample_values.mean(0) - 0.3 * kl_to_uniform(dist, out.pre_tanh)
    assert torch.allclose(out.value, expected)


def test_alpha_tensor_is_detached():
    q_fn, _ = quadratic_family(3, 2)
    log_alpha = torch.zeros((), requires_grad=True)
    obj = mbplan.make_objective(q_fn, alpha=log_alpha.exp())
    dist = TanhNormal(torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 2))
    obj(torch.randn(2, 3), dist).value.sum().backward()
    assert log_alpha.grad is None and dist.loc.grad is not None


def test_gradient_matches_finite_differences_float64():
    S, A, B = 3, 4, 5
    q_fn, _ = quadratic_family(S, A, dtype=torch.float64)
    obj = mbplan.make_objective(lambda s, a: q_fn(s, a) + torch.sin(3 * a).sum(-1), alpha=0.2)
    states = torch.randn(B, S, dtype=torch.float64)

    def J(loc, log_scale):
        # Same noise at every call: Ĵ is then a smooth deterministic function of λ.
        return obj(
            states, TanhNormal(loc, log_scale), generator=torch.Generator().manual_seed(3)
        ).value

    loc = (0.3 * torch.randn(B, A, dtype=torch.float64)).requires_grad_()
    log_scale = (-1 + 0.2 * torch.randn(B, A, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(J, (loc, log_scale), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_pessimism_beyond_min():
    q = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # (E=2, N=2)
    pess = mbplan.pessimistic(q, beta=1.0)
    assert pess[0] == pytest.approx(2.0 - math.sqrt(2.0 + 1e-6), abs=1e-6)
    assert pess[0] < q[:, 0].min()
    assert pess[1] == pytest.approx(2.0 - 1e-3, abs=1e-6)


def test_anchored_objective_is_a_trust_region_around_the_anchor():
    from mbplan.distributions import kl_between
    from mbplan.objective import AnchoredObjective

    q = lambda s, a: -((a - 0.5) ** 2).sum(-1)  # noqa: E731
    base = mbplan.make_objective(q, alpha=0.0, n_samples=64, action_dim=2)
    anchor = TanhNormal(torch.full((4, 2), -1.0), torch.full((4, 2), -1.0))
    dist = TanhNormal(torch.zeros(4, 2), torch.full((4, 2), -0.5))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = base(torch.zeros(4, 3), dist, generator=g())
    anchored = AnchoredObjective(base, anchor, 2.0)(torch.zeros(4, 3), dist, generator=g())
    torch.testing.assert_close(anchored.value, plain.value - 2.0 * kl_between(dist, anchor))
    states = torch.zeros(4, 3)
    at_anchor = AnchoredObjective(base, anchor, 2.0)(states, anchor, generator=g())
    torch.testing.assert_close(at_anchor.value, base(states, anchor, generator=g()).value)
    # The larger η, the closer every planner's optimum stays to the anchor's action tanh(−1).
    for name in ("adam", "cem"):
        modes = []
        for eta in (0.0, 1.0, 10.0):
            objective = AnchoredObjective(base, anchor, eta)
            result = mbplan.make_planner(name).plan(
                objective, torch.zeros(4, 3), n_iters=200, generator=g()
            )
            modes.append(result.dist.mode()[:, 0].mean().item())
        assert modes[0] > 0.4 and modes[0] > modes[1] > modes[2] - 0.05 and modes[2] < -0.6, name
