"""``mbplan viz plan``, ``viz video`` and ``viz surface`` on the bundled default (subprocess)."""

import csv
import json

import pytest
from cli_helpers import ok, one_line_error, run_cli, valid_png

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]


@pytest.fixture(scope="module")
def plans_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz") / "plans.safetensors"
    ok(run_cli("plan", "--planner", "iterative", "--horizon", 2, "--episodes", 1,
               "--max-steps", 3, "--save-plans", path, "--threads", 1))  # fmt: skip
    return path


PLAN_KEYS = {"where", "planner", "dims", "iteration", "objective", "loc", "states_mean",
             "states_std", "rewards_mean", "rewards_std", "q_mean", "q_std", "real"}  # fmt: skip


def test_viz_plan_live(tmp_path):
    out = ok(run_cli("viz", "plan", "--horizon", 2, "--iters", 2, "--samples", 3,
                     "--out", tmp_path))  # fmt: skip
    assert "on-policy state 0" in out
    data = json.loads((tmp_path / "viz-plan.json").read_text())
    assert set(data) >= PLAN_KEYS
    assert len(data["objective"]) == 3 and len(data["states_mean"]) == 3  # I + 1
    assert len(data["states_mean"][0]) == 3 and len(data["rewards_mean"][0]) == 2  # H + 1, H
    assert len(data["real"]["states"]) == 3 and len(data["real"]["rewards"]) == 2
    assert len(data["dims"]) == 2
    valid_png(tmp_path / "viz-plan.png")


def test_viz_plan_from_file(plans_file, tmp_path):
    out = ok(run_cli("viz", "plan", "--plans", plans_file, "--step", 1, "--dims", 0, 8,
                     "--out", tmp_path, "--stem", "f"))  # fmt: skip
    assert "step 1 of plans.safetensors" in out
    data = json.loads((tmp_path / "f.json").read_text())
    assert set(data) >= PLAN_KEYS and data["dims"] == [0, 8]
    assert len(data["objective"]) == len(data["states_mean"]) >= 2  # I + 1
    assert len(data["real"]["states"]) == 2  # steps 1 and 2 of a 3-step episode
    assert data["real"]["rewards"] is None
    valid_png(tmp_path / "f.png")


@pytest.mark.parametrize("objective", ["model-free", "model"])
def test_viz_surface(tmp_path, objective):
    out = ok(run_cli("viz", "surface", "--grid", 5, "--objective", objective, "--horizon", 2,
                     "--iters", 2, "--samples", 3, "--batch", 7, "--out", tmp_path))  # fmt: skip
    assert "best" in out
    with open(tmp_path / "viz-surface.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25 and list(rows[0]) == ["mu_x", "mu_y", "objective"]
    assert all(float(r["objective"]) > -1e30 for r in rows)
    valid_png(tmp_path / "viz-surface.png")


def test_viz_video(tmp_path):
    out = ok(run_cli("viz", "video", "--horizon", 2, "--iters", 2, "--samples", 3,
                     "--max-steps", 3, "--out", tmp_path, "--stem", "v"))  # fmt: skip
    assert "return" in out
    assert (tmp_path / "v.mp4").stat().st_size > 1000
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["steps"] == 3 and len(data["per_step"]) == 3
    assert {"t", "reward", "return", "one_step_rmse", "shown_rmse"} <= set(data["per_step"][0])
    assert data["right_half"] is not None  # HalfCheetah: the pose is set from the observation


@pytest.mark.parametrize(
    "args",
    [
        ["viz", "plan", "--checkpoint", "no/such/run"],
        ["viz", "video", "--checkpoint", "no/such/run"],
        ["viz", "surface", "--checkpoint", "no/such/run"],
        ["viz", "plan", "--state-index", "-1"],
        ["viz", "surface", "--state-index", "100000", "--grid", "5"],
        ["viz", "surface", "--dims", "0", "99", "--grid", "5"],
        ["viz", "surface", "--dims", "1", "1", "--grid", "5"],
        ["viz", "plan", "--plans", "no/such/plans.safetensors"],
    ],
)
def test_viz_bad_input(args):
    one_line_error(run_cli(*args))


@pytest.mark.parametrize("args", [["--step", "3"], ["--step", "-1"], ["--dims", "99"]])
def test_viz_plan_file_bad_input(plans_file, args):
    one_line_error(run_cli("viz", "plan", "--plans", plans_file, *args))


def test_pose_from_observation():
    import numpy as np

    from mbplan.envs import make_env
    from mbplan.viz.video import pose_layout

    env = make_env("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    data = env.unwrapped.data
    layout = pose_layout(env, obs)
    assert layout is not None and layout.skipped == 1
    qpos, qvel = layout.pose(obs, data.qpos[:1])
    assert np.allclose(qpos, data.qpos) and np.allclose(qvel, data.qvel)
    env.close()
    reacher = make_env("Reacher-v5")
    assert pose_layout(reacher, reacher.reset(seed=0)[0]) is None  # cos/sin angles, targets
    reacher.close()
