"""``mbplan bench value-bias`` and ``mbplan bench modes`` on the bundled default (subprocess),
and the on-policy states every bench draws (in process)."""

import math

import pytest
import torch
from cli_helpers import ok, one_line_error, read_csv, run_cli, valid_png

from mbplan.report import CommonOptions, load, on_policy_states, run_policy, spread_indices

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]


def test_value_bias(tmp_path):
    out = ok(run_cli("bench", "value-bias", "--out", tmp_path, "--betas", 0, 1, "--episodes", 1,
                     "--episode-steps", 20, "--min-remaining", 10))  # fmt: skip
    assert "β=0: bias" in out and "β=1: bias" in out and "overestimation" in out
    rows = read_csv(tmp_path / "value_bias.csv", ["beta", "state", "t", "q", "mc_return", "bias"])
    assert {float(r["beta"]) for r in rows} == {0.0, 1.0}
    assert len(rows) <= 2 * 20
    for r in rows:
        assert float(r["bias"]) == pytest.approx(float(r["q"]) - float(r["mc_return"]), abs=1e-6)
    valid_png(tmp_path / "value_bias.png")


def test_modes(tmp_path):
    out = ok(run_cli("bench", "modes", "--out", tmp_path, "--states", 4, "--runs", 3,
                     "--action-samples", 20, "--state-index", 1))  # fmt: skip
    assert "mean" in out and "median" in out
    assert "4 on-policy states from 4 episodes (resets seeds 0–3" in out
    columns = ["state", "l2_mean_action", "l2_loc", "objective_a", "objective_b"]
    rows = read_csv(tmp_path / "modes.csv", columns)
    assert len(rows) == 4 and all(float(r["l2_mean_action"]) >= 0 for r in rows)
    assert all(math.isfinite(float(r["objective_a"])) for r in rows)
    assert "|Ĵ_a − Ĵ_b|" in out
    valid_png(tmp_path / "modes.png")


def test_modes_state_index_out_of_range(tmp_path):
    one_line_error(run_cli("bench", "modes", "--out", tmp_path, "--states", 3, "--state-index", 3))


def test_on_policy_states_spread_over_episodes():
    torch.set_num_threads(1)
    setup = load(CommonOptions(threads=1))
    states = on_policy_states(setup, 12, seed=3, episodes=5)  # (12, S)
    traj = run_policy(setup, 5 * 1000, seed=3, episodes=5)
    assert int(traj.episode.max()) == 4  # stopped after the 5th episode
    lengths = torch.bincount(traj.episode).tolist()
    starts = [sum(lengths[:e]) for e in range(5)]
    expected = [starts[e] + t for e, t in spread_indices(lengths, 12)]
    assert torch.equal(states, traj.states[expected])
    assert torch.equal(states, on_policy_states(setup, 12, seed=3, episodes=5))  # seeded
    other = on_policy_states(setup, 12, seed=3 + 5, episodes=5)  # the next 5 episodes
    assert not (torch.cdist(states, other) < 1e-6).any()  # disjoint
    assert on_policy_states(setup, 2, seed=3, episodes=5).shape[0] == 2  # one per episode
