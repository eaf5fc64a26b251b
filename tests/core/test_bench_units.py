"""Pure unit tests of bench/viz helpers (no MuJoCo, no subprocess)."""

import pytest
import torch
from conftest import quadratic_family

import mbplan
from mbplan.bench.iterations import Contender, load_finished, save_finished, summarize
from mbplan.bench.planners import Curve, SweepPoint, grid_edge, sweep_score, sweep_verdict, tune
from mbplan.bench.value_bias import soft_returns
from mbplan.errors import UserError
from mbplan.fit import finetune_direct
from mbplan.objective import make_objective
from mbplan.planners import DirectPlanner
from mbplan.report import spread_indices
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


def test_spread_indices_even_over_episodes_and_time():
    picks = spread_indices([1000] * 5, 7)
    per_episode = [[t for e, t in picks if e == k] for k in range(5)]
    assert [len(ts) for ts in per_episode] == [2, 2, 1, 1, 1]  # the first take the extra ones
    assert per_episode[0] == [250, 750] and per_episode[4] == [500]  # centres of equal stretches
    assert spread_indices([10, 10], 20) == [(e, t) for e in range(2) for t in range(10)]


def test_spread_indices_short_episode_gives_its_share_away():
    picks = spread_indices([2, 100, 100], 12)
    counts = [sum(e == k for e, _ in picks) for k in range(3)]
    assert counts == [2, 5, 5] and len(set(picks)) == 12  # no state twice
    with pytest.raises(UserError, match="fewer than 5"):
        spread_indices([2, 2], 5)


def _points(lrs, chosen):
    return [SweepPoint("adam", lr, float(i), 0.0, lr == chosen) for i, lr in enumerate(lrs)]


def test_sweep_verdict_names_the_winner_and_flags_an_edge():
    lrs = [1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
    assert grid_edge(_points(lrs, 0.3)) == ""
    assert grid_edge(_points(lrs, 3.0)) == "highest"
    assert grid_edge(_points(lrs, 1e-2)) == "lowest"
    assert grid_edge(_points([0.1], 0.1)) == ""  # a one-value grid has no inside
    inside = sweep_verdict(_points(lrs, 0.3))
    assert inside.startswith("adam: lr 0.3 won") and "WARNING" not in inside
    edge = sweep_verdict(_points(lrs, 3.0))
    assert "WARNING" in edge and "highest" in edge and "--adam-lrs" in edge


def test_finetune_direct_trains_a_copy_on_the_frozen_objective():
    S, A = 3, 2
    q_fn, _ = quadratic_family(S, A)
    objective = mbplan.make_objective(q_fn, alpha=0.05, state_dim=S, action_dim=A, n_samples=8)
    policy = DirectPlanner(S, A, hidden=32).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    states = torch.randn(64, S, generator=torch.Generator().manual_seed(1))

    def mean_j(p):
        with torch.no_grad():
            return float(
                objective(states, p(states), 64, torch.Generator().manual_seed(2)).value.mean()
            )

    tuned, losses = finetune_direct(policy, objective, states, steps=200, batch_size=32, lr=3e-3)
    assert len(losses) == 200 and mean_j(tuned) > mean_j(policy) + 0.1
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # untouched
    assert not any(p.requires_grad for p in tuned.parameters())
    again, _ = finetune_direct(policy, objective, states, steps=200, batch_size=32, lr=3e-3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())


def test_iterations_episode_store_resumes_only_the_same_settings(tmp_path):
    path, settings = tmp_path / "episodes.json", {"weights": "abc", "max_steps": 20}
    row = {"contender": "direct", "episode": 0, "return": 1.0, "steps": 20,
           "ms_per_action": 0.5, "J_gain": 2.0}  # fmt: skip
    assert load_finished(path, settings) == {}
    save_finished(path, settings, {("direct", 0): row})
    assert load_finished(path, settings) == {("direct", 0): row}
    assert load_finished(path, {**settings, "max_steps": 30}) == {}  # made otherwise: afresh
    path.write_text("{not json")
    with pytest.raises(UserError, match="not an episodes file"):
        load_finished(path, settings)


def test_iterations_summary_is_over_episodes():
    rows = [
        {"return": 10.0, "steps": 10, "ms_per_action": 1.0, "J_gain": 1.0},
        {"return": 20.0, "steps": 30, "ms_per_action": 3.0, "J_gain": float("nan")},
    ]
    out = summarize(Contender("direct", None, 1), rows)  # type: ignore[arg-type]
    assert out["episodes"] == 2 and out["return_mean"] == 15.0 and out["return_sd"] == 5.0
    assert out["ms/action"] == pytest.approx(2.5)  # per action, over both episodes
    assert out["J_gain"] == 1.0  # episodes without a finite gain are left out
