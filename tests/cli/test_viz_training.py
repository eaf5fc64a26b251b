"""``mbplan viz training`` on tiny trained runs and ``mbplan viz lambda`` on the bundled default."""

import pytest
from cli_helpers import ok, one_line_error, read_csv, run_cli, valid_png

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for agent in ("direct", "iterative"):
        ok(run_cli("train", "--env", "InvertedPendulum-v5", "--agent", agent, "--steps", 300,
                   "--warmup", 200, "--batch-size", 16, "--samples", 2, "--iters", 2,
                   "--eval-interval", 100, "--eval-episodes", 1, "--log-interval", 50,
                   "--threads", 1, "--out", root / agent))  # fmt: skip
    return root


COLUMNS = ["kind", "group", "step", "seconds", "mean", "std", "n_seeds"]


def test_training_curves(runs, tmp_path):
    out = ok(run_cli("viz", "training", "--runs", runs / "direct", runs / "iterative",
                     "--out", tmp_path))  # fmt: skip
    assert "InvertedPendulum-v5 direct" in out and "InvertedPendulum-v5 iterative" in out
    rows = read_csv(tmp_path / "training.csv", COLUMNS)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {int(r["step"]) for r in evals} == {100, 200, 300}
    assert all(r["n_seeds"] == "1" for r in evals)
    improvement = [r for r in rows if r["kind"] == "improvement"]
    assert improvement and {r["group"] for r in improvement} == {"InvertedPendulum-v5 iterative"}
    valid_png(tmp_path / "training.png")


def test_training_wall_clock(runs, tmp_path):
    ok(run_cli("viz", "training", "--runs", runs / "direct", "--x", "seconds", "--out", tmp_path))
    rows = read_csv(tmp_path / "training.csv", COLUMNS)
    assert all(float(r["seconds"]) >= 0 for r in rows)
    valid_png(tmp_path / "training.png")


def test_training_bad_runs(runs, tmp_path):
    one_line_error(run_cli("viz", "training", "--runs", tmp_path / "missing", "--out", tmp_path))
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("viz", "training", "--runs", tmp_path / "empty", "--out", tmp_path))


def test_training_default_bundle(tmp_path):
    """No --runs: the bundled default's training curve and its optimizers' fit curves."""
    out = ok(run_cli("viz", "training", "--out", tmp_path))
    rows = read_csv(tmp_path / "training.csv", COLUMNS)
    assert any(r["kind"] == "eval" for r in rows)
    fitted = {r["group"] for r in rows if r["kind"] == "improvement"}
    assert {f"HalfCheetah-v5 fit-optimizer ({o})" for o in ("model", "model-free")} <= fitted
    assert "fit-optimizer (model)" in out
    valid_png(tmp_path / "training.png")


def test_lambda(tmp_path):
    out = ok(run_cli("viz", "lambda", "--out", tmp_path, "--steps", 4, "--iters", 3,
                     "--eval-samples", 20, "--dim", 0))  # fmt: skip
    assert "0→1" in out and "2→3" in out
    rows = read_csv(tmp_path / "lambda.csv", ["step", "iteration", "loc", "scale", "objective"])
    assert len(rows) == 4 * 4
    assert {int(r["iteration"]) for r in rows} == {0, 1, 2, 3}
    assert all(float(r["scale"]) > 0 for r in rows)
    valid_png(tmp_path / "lambda.png")


def test_lambda_dim_out_of_range(tmp_path):
    one_line_error(run_cli("viz", "lambda", "--out", tmp_path, "--steps", 2, "--dim", 99))
