"""``mbplan bench value-bias`` and ``mbplan bench modes`` on the bundled default (subprocess)."""

import pytest
from cli_helpers import ok, one_line_error, read_csv, run_cli, valid_png

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
    rows = read_csv(tmp_path / "modes.csv", ["state", "l2_mean_action", "l2_loc"])
    assert len(rows) == 4 and all(float(r["l2_mean_action"]) >= 0 for r in rows)
    valid_png(tmp_path / "modes.png")


def test_modes_state_index_out_of_range(tmp_path):
    one_line_error(run_cli("bench", "modes", "--out", tmp_path, "--states", 3, "--state-index", 3))
