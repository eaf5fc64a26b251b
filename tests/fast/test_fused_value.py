"""The fused model rollout (mbplan.fast.fused_value) equals the ModelValue loop through autograd."""

import copy

import pytest
import torch
from conftest import randomize, tiny_model_value, with_ensemble

from mbplan.model_value import ModelValue
from mbplan.models.dynamics import EulerSpec

H, N = 4, 6


def _value_and_grad(value: ModelValue) -> tuple[torch.Tensor, torch.Tensor]:
    """Q̂_MB and a weighted gradient w.r.t. the first actions, with fixed inputs and noise."""
    states = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    actions = 0.99 * (2 * torch.rand(6, 4, 2, dtype=torch.float64, generator=g) - 1)
    actions.requires_grad_()
    v = value(states, actions, generator=torch.Generator().manual_seed(0))
    weights = torch.linspace(-1, 2, 24, dtype=torch.float64).reshape(6, 4)
    (grad,) = torch.autograd.grad((v * weights).sum(), actions)
    return v.detach(), grad


def _assert_fused_equals_reference(value: ModelValue) -> None:
    fused = _value_and_grad(value)
    value.fused = False
    reference = _value_and_grad(value)
    value.fused = True
    for a, b in zip(fused, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("horizon", "lam", "members", "beta", "alpha"),
    [(1, 0.9, 2, 1.0, 0.1), (2, 0.0, 2, 1.0, 0.1), (3, 1.0, 3, 2.5, 0.3), (5, 0.9, 2, 1.0, None)],
)
def test_fused_rollout_equals_the_autograd_rollout(horizon, lam, members, beta, alpha):
    alpha = torch.tensor(0.2, dtype=torch.float64) if alpha is None else alpha  # a tensor α too
    value = randomize(tiny_model_value(horizon, lam=lam, members=members, beta=beta, alpha=alpha))
    _assert_fused_equals_reference(value)
    assert value.fused_rollout is not None  # the fused path ran


@pytest.mark.parametrize(
    ("members", "propagation", "kappa", "horizon", "mode"),
    [
        (3, "fixed", 0.0, 3, "split"),  # E divides K = 6: member e runs its samples' rows only
        (4, "fixed", 0.0, 2, "select"),  # E does not divide K
        (3, "fixed", 0.5, 3, "select"),  # κ > 0: every member on every row
        (3, "mean", 0.0, 2, "mean"),
        (2, "mean", 0.7, 4, "mean"),
        (1, "fixed", 0.3, 2, "one"),  # one member: no disagreement, κ has no effect
    ],
)
def test_fused_ensemble_rollout_equals_the_autograd_rollout(
    members, propagation, kappa, horizon, mode
):
    value = with_ensemble(randomize(tiny_model_value(horizon)), members, propagation, kappa)
    _assert_fused_equals_reference(value)
    assert value.fused_rollout is not None and value.fused_rollout.mode(6) == mode


def test_fused_ensemble_rollout_follows_propagation_and_kappa_changes():
    value = with_ensemble(randomize(tiny_model_value(2)), 3)
    fixed = _value_and_grad(value)
    value.propagation, value.kappa = "mean", 0.4  # rebuilt for the new settings
    _assert_fused_equals_reference(value)
    assert value.fused_rollout.settings.kappa == 0.4
    assert not torch.allclose(_value_and_grad(value)[0], fixed[0])


def test_fused_rollout_follows_weight_changes_and_swaps():
    value = randomize(tiny_model_value(3))
    _assert_fused_equals_reference(value)
    with torch.no_grad():
        value.critic.head.bias.add_(1.0)  # in place, as an optimizer or Polyak step does
        value.future_policy.bounds.log_scale_max.sub_(0.3)
        value.dynamics.delta_scale.std.mul_(1.5)
    _assert_fused_equals_reference(value)
    policy = value.future_policy
    value.future_policy = lambda s: policy(s)  # not a network it can fuse: the reference path
    v_swapped = _value_and_grad(value)
    assert value.fused_rollout is None
    value.future_policy = policy
    v_back = _value_and_grad(value)
    assert value.fused_rollout is not None
    torch.testing.assert_close(v_swapped, v_back, rtol=1e-9, atol=1e-10)
    # Tensors replaced (not changed in place) and a submodule swapped inside a network
    state = {k: 1.5 * t for k, t in value.critic.state_dict().items()}
    value.critic.load_state_dict(state, assign=True)
    _assert_fused_equals_reference(value)
    value.dynamics.net[-1] = copy.deepcopy(value.dynamics.net[-1]).requires_grad_(False)
    with torch.no_grad():
        value.dynamics.net[-1].weight.mul_(0.5)
    _assert_fused_equals_reference(value)


def test_fused_rollout_rejects_networks_of_another_form():
    value = tiny_model_value(2)
    value.reward.net[1].eps = 1e-3  # reward's LayerNorm eps differs from the dynamics'
    v = _value_and_grad(value)
    assert value.fused_rollout is None
    value.fused = False
    torch.testing.assert_close(v, _value_and_grad(value))


def test_fused_rollout_only_where_it_applies():
    states, actions = torch.randn(4, 3, dtype=torch.float64), torch.rand(2, 4, 2).double()
    value = tiny_model_value(2)
    value.record = []  # recording needs the step-by-step rollout
    value(states, actions)
    assert value.fused_rollout is None and len(value.record) == 1
    value.dynamics.euler = EulerSpec((0,), (1,), (0,), 0.05)  # not fused: the reference path
    value.record = None
    value(states, actions)
    assert value.fused_rollout is None
    trained = tiny_model_value(2)
    trained.reward.requires_grad_(True)  # weights being trained: gradients must reach them
    trained(states, actions).sum().backward()
    assert trained.fused_rollout is None and trained.reward.net[0].weight.grad is not None


def test_fused_rollout_refuses_second_order_gradients():
    value = tiny_model_value(2)
    actions = torch.rand(2, 4, 2, dtype=torch.float64, requires_grad=True)
    v = value(torch.randn(4, 3, dtype=torch.float64), actions)
    assert value.fused_rollout is not None
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        torch.autograd.grad(v.sum(), actions, create_graph=True)
