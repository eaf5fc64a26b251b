"""Dynamics and reward models, Retrace, and the model-based objective (DESIGN.md §6)."""

import copy

import pytest
import torch

import mbplan
from mbplan.distributions import TanhNormal
from mbplan.model_fit import fit_models, open_loop_errors, sequence_starts, split_holdout
from mbplan.model_value import ModelValue
from mbplan.models.critic import EnsembleQ
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


def _tiny_model_value(horizon, dtype=torch.float64, lam=0.9, members=2, beta=1.0, alpha=0.1):
    torch.manual_seed(1)
    S, A = 3, 2
    dyn = Dynamics(S, A, hidden=16).to(dtype)
    rew = Reward(S, A, hidden=16).to(dtype)
    for m in (dyn, rew):
        torch.nn.init.normal_(m.net[-1].weight, std=0.3)  # non-trivial models
    critic = EnsembleQ(S, A, n_members=members, hidden=16).to(dtype)
    torch.nn.init.normal_(critic.head.weight, std=0.3)
    policy = mbplan.make_planner("direct", state_dim=S, action_dim=A, hidden=16).to(dtype)
    torch.nn.init.normal_(policy.net[-1].weight, std=0.3)
    for m in (dyn, rew, critic, policy):
        m.requires_grad_(False)
    return ModelValue(dyn, rew, critic, policy, horizon, beta=beta, gamma=0.99, lam=lam,
                      alpha=alpha)  # fmt: skip


def test_model_objective_gradient_matches_finite_differences():
    value = _tiny_model_value(horizon=3)
    obj = mbplan.make_objective(value, alpha=0.1, n_samples=4)
    states = torch.randn(5, 3, dtype=torch.float64)

    def J(loc, log_scale):
        dist = TanhNormal(loc, log_scale)
        return obj(states, dist, generator=torch.Generator().manual_seed(4)).value

    loc = (0.3 * torch.randn(5, 2, dtype=torch.float64)).requires_grad_()
    log_scale = (-1 + 0.1 * torch.randn(5, 2, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(J, (loc, log_scale), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_model_value_records_rollouts_and_lambda_zero_is_one_step():
    value = _tiny_model_value(horizon=5, lam=0.0)
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
    value = _tiny_model_value(horizon=2, dtype=torch.float32)
    obj = mbplan.make_objective(value, alpha=0.1, n_samples=4, state_dim=3, action_dim=2)
    states = torch.randn(7, 3)
    for name in mbplan.PLANNERS:
        planner = mbplan.make_planner(name, state_dim=3, action_dim=2)
        res = planner.plan(obj, states, n_iters=2, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(res.trace.objective).all()


def _randomize(value: ModelValue) -> ModelValue:
    """Non-trivial normalizers, LayerNorm affines and soft-clamp bounds (the fusion folds them)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (value.dynamics, value.reward, value.future_policy):
            for p in module.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for model in (value.dynamics, value.reward):
            model.inputs.mean.normal_(generator=g)
            model.inputs.std.uniform_(0.5, 2.0, generator=g)
        value.dynamics.delta_scale.std.uniform_(0.5, 2.0, generator=g)
        value.reward.scale.fill_(1.7)
        value.reward.offset.fill_(-0.4)
    return value


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
    value = _randomize(_tiny_model_value(horizon, lam=lam, members=members, beta=beta, alpha=alpha))
    _assert_fused_equals_reference(value)
    assert value.fused_rollout is not None  # the fused path ran


def test_fused_rollout_follows_weight_changes_and_swaps():
    value = _randomize(_tiny_model_value(3))
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
    value = _tiny_model_value(2)
    value.reward.net[1].eps = 1e-3  # reward's LayerNorm eps differs from the dynamics'
    v = _value_and_grad(value)
    assert value.fused_rollout is None
    value.fused = False
    torch.testing.assert_close(v, _value_and_grad(value))


def test_fused_rollout_only_where_it_applies():
    states, actions = torch.randn(4, 3, dtype=torch.float64), torch.rand(2, 4, 2).double()
    value = _tiny_model_value(2)
    value.record = []  # recording needs the step-by-step rollout
    value(states, actions)
    assert value.fused_rollout is None and len(value.record) == 1
    value.dynamics.euler = EulerSpec((0,), (1,), (0,), 0.05)  # not fused: the reference path
    value.record = None
    value(states, actions)
    assert value.fused_rollout is None
    trained = _tiny_model_value(2)
    trained.reward.requires_grad_(True)  # weights being trained: gradients must reach them
    trained(states, actions).sum().backward()
    assert trained.fused_rollout is None and trained.reward.net[0].weight.grad is not None


def test_fused_rollout_refuses_second_order_gradients():
    value = _tiny_model_value(2)
    actions = torch.rand(2, 4, 2, dtype=torch.float64, requires_grad=True)
    v = value(torch.randn(4, 3, dtype=torch.float64), actions)
    assert value.fused_rollout is not None
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        torch.autograd.grad(v.sum(), actions, create_graph=True)


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
