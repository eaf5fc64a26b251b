"""The critic's custom nodes (_EnsembleHead, _FrozenActionGrad, the Jacobian) equal autograd."""

import copy

import pytest
import torch

import mbplan
from mbplan.models.critic import EnsembleQ

H, N = 4, 6


def test_critic_gradients_equal_the_plain_formulation():
    """The ensemble head's hand-written backward: input, weight and second-order gradients."""
    torch.manual_seed(0)
    critic = EnsembleQ(5, 3, hidden=8).double()
    states = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    actions = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)

    def plain(s, a):  # one baddbmm per layer, autograd's own backward
        x = torch.cat([s.expand(2, 4, 5), a], -1).reshape(-1, 8)
        for layer in critic.hidden:
            x = layer(x).relu()
        return critic.head(x).reshape(2, 2, 4)

    assert torch.autograd.gradcheck(critic, (states, actions))
    assert torch.autograd.gradgradcheck(critic, (states, actions))
    grads = []
    for fn in (critic, plain):
        critic.zero_grad()
        fn(states, actions).square().sum().backward()
        grads.append([p.grad.clone() for p in critic.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1024, 3])
def test_frozen_critic_action_gradient_equals_autograd(monkeypatch, chunk):
    """Frozen critics differentiated to the actions only (Ĵ): the fused Jacobian path, any block."""
    monkeypatch.setattr("mbplan.models.critic._FROZEN_CHUNK", chunk)
    torch.manual_seed(0)
    critic = EnsembleQ(5, 3, hidden=8).double()
    frozen = copy.deepcopy(critic).requires_grad_(False)
    states = torch.randn(4, 5, dtype=torch.float64)
    actions = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 7, 4, dtype=torch.float64)
    q_frozen = frozen(states, actions)
    assert "FrozenActionGrad" in str(q_frozen.grad_fn.next_functions)  # the fused path ran
    q_plain = critic(states, actions)  # trainable weights: autograd's path
    torch.testing.assert_close(q_frozen, q_plain, rtol=1e-12, atol=1e-12)
    (g_frozen,) = torch.autograd.grad((weight * q_frozen).sum(), actions)
    (g_plain,) = torch.autograd.grad((weight * q_plain).sum(), actions)
    torch.testing.assert_close(g_frozen, g_plain, rtol=1e-12, atol=1e-12)
    flat = actions.detach().reshape(-1, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: frozen(states.repeat(7, 1), a), (flat,))
    # Second derivatives (through the pessimistic combination) equal autograd's.
    hess = [
        torch.autograd.functional.hessian(
            lambda a, c=c: mbplan.pessimistic(c(states[:1], a[None]), 1.0).sum(), actions[0, :1]
        )
        for c in (frozen, critic)
    ]
    assert hess[1].abs().max() > 0
    torch.testing.assert_close(hess[0], hess[1], rtol=1e-10, atol=1e-12)
    # Under autocast (reduced-precision products) the plain path runs.
    frozen32 = copy.deepcopy(frozen).float()
    actions32 = actions.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen32(states.float(), actions32).isfinite().all()
    # Gradients to the states, or no gradient at all, take the plain path.
    s = states.clone().requires_grad_()
    torch.testing.assert_close(frozen(s, actions), q_plain)
    with torch.no_grad():
        torch.testing.assert_close(frozen(states, actions), q_plain.detach())


@pytest.mark.parametrize("grad_rows", [0, 5, 11, 12, 28])
def test_values_and_action_jacobian_for_leading_rows_only(monkeypatch, grad_rows):
    """The Jacobian of the first ``grad_rows`` rows equals the full one's, across blocks."""
    monkeypatch.setattr("mbplan.models.critic._FROZEN_CHUNK", 12)
    torch.manual_seed(0)
    critic = EnsembleQ(5, 3, hidden=8).double().requires_grad_(False)
    states = torch.randn(28, 5, dtype=torch.float64)
    actions = torch.randn(28, 3, dtype=torch.float64)
    q_all, jac_all = critic.values_and_action_jacobian(states, actions)  # (E, N), (E, A, N)
    q, jac = critic.values_and_action_jacobian(states, actions, grad_rows=grad_rows)
    torch.testing.assert_close(q, q_all, rtol=0, atol=0)
    assert jac.shape == (2, 3, grad_rows)
    torch.testing.assert_close(jac, jac_all[..., :grad_rows], rtol=1e-12, atol=1e-12)
