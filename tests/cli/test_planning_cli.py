"""fit-model, eval-model, fit-optimizer and plan on a small trained run (end to end, subprocess)."""

import pytest
from cli_helpers import ok, one_line_error, run_cli
from safetensors import safe_open

import mbplan

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]


@pytest.fixture(scope="module")
def run_with_model(tmp_path_factory):
    run = tmp_path_factory.mktemp("plan") / "run"
    ok(run_cli("train", "--env", "InvertedPendulum-v5", "--agent", "direct", "--steps", 400,
               "--warmup", 200, "--batch-size", 32, "--samples", 2, "--eval-interval", 0,
               "--checkpoint-interval", 400, "--out", run, "--threads", 1))  # fmt: skip
    out = ok(run_cli("fit-model", "--checkpoint", run, "--steps", 50, "--horizon", 3))
    assert "state_rmse" in out and (run / "model" / "weights.safetensors").is_file()
    return run


def test_plan_needs_a_model(tmp_path):
    run = tmp_path / "r"
    ok(run_cli("train", "--env", "InvertedPendulum-v5", "--steps", 60, "--warmup", 50,
               "--batch-size", 8, "--samples", 2, "--eval-interval", 0, "--out", run))  # fmt: skip
    one_line_error(run_cli("plan", "--checkpoint", run, "--planner", "adam", "--max-steps", 2))


def test_eval_model_prints_errors(run_with_model):
    out = ok(run_cli("eval-model", "--checkpoint", run_with_model, "--horizon", 2))
    assert "reward_rmse" in out and "disagreement" in out  # the default model is an ensemble
    rows = [ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in ("1", "2")]
    assert len(rows) == 4 and len(rows[-1]) == 1 + 5 + 2  # h, 5 members, mean, rank corr.


def test_single_model_and_elites(run_with_model, tmp_path):
    import json
    import shutil

    single = tmp_path / "single"
    shutil.copytree(run_with_model, single)
    ok(run_cli("fit-model", "--checkpoint", single, "--steps", 20, "--ensemble", 1))
    meta = json.loads((single / "model" / "meta.json").read_text())
    assert meta["members"] == 1
    out = ok(run_cli("eval-model", "--checkpoint", single, "--horizon", 2))
    assert "disagreement" not in out
    ok(run_cli("fit-model", "--checkpoint", single, "--steps", 20, "--ensemble", 4,
               "--elites", 2))  # fmt: skip
    meta = json.loads((single / "model" / "meta.json").read_text())
    assert meta["members"] == 2 and meta["elites_of"] == 4 and len(meta["elite_members"]) == 2
    out = ok(run_cli("plan", "--checkpoint", single, "--planner", "adam", "--horizon", 2,
                     "--max-steps", 2, "--iters", 2, "--samples", 4, "--propagation", "mean",
                     "--kappa", "0.5"))  # fmt: skip
    assert "ms/action" in out


@pytest.mark.parametrize(
    "args",
    [
        ["fit-model", "--ensemble", "0"],
        ["fit-model", "--ensemble", "3", "--elites", "4"],
        ["plan", "--kappa", "-1"],
        ["plan", "--kappa", "nan"],
        ["plan", "--propagation", "random"],
    ],
)
def test_ensemble_bad_input(run_with_model, args):
    one_line_error(
        run_cli(*args, "--checkpoint", run_with_model, "--max-steps", 1)
        if args[0] == "plan"
        else run_cli(*args, "--checkpoint", run_with_model)
    )


@pytest.mark.parametrize("objective", ["model", "model-free"])
def test_fit_optimizer_saves(run_with_model, objective):
    out = ok(run_cli("fit-optimizer", "--checkpoint", run_with_model, "--objective", objective,
                     "--steps", 5, "--batch-size", 16, "--samples", 3, "--horizon", 2))  # fmt: skip
    assert "saved to" in out
    assert (run_with_model / "optimizers" / objective / "meta.json").is_file()


@pytest.mark.parametrize("planner", sorted(mbplan.PLANNERS))
def test_plan_each_planner(run_with_model, planner):
    if planner == "iterative" and not (run_with_model / "optimizers" / "model").exists():
        ok(run_cli("fit-optimizer", "--checkpoint", run_with_model, "--steps", 3,
                   "--batch-size", 8, "--samples", 2))  # fmt: skip
    out = ok(run_cli("plan", "--checkpoint", run_with_model, "--planner", planner, "--horizon", 2,
                     "--max-steps", 3, "--iters", 2, "--samples", 3))  # fmt: skip
    assert "ms/action" in out and "return" in out


def test_plan_saves_plans(run_with_model, tmp_path):
    path = tmp_path / "plans.safetensors"
    ok(run_cli("plan", "--checkpoint", run_with_model, "--planner", "cem", "--horizon", 3,
               "--max-steps", 2, "--iters", 2, "--samples", 2, "--save-plans", path))  # fmt: skip
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert "000001/trace/objective" in keys
        states = f.get_tensor("000000/rollout00/states")
    assert states.shape[0] == 4  # H + 1


@pytest.mark.parametrize(
    "args",
    [
        ["--planner", "newton"],
        ["--init", "nowhere"],
        ["--trust", "-1"],
        ["--trust", "nan"],
        ["--horizon", "0"],
        ["--iters", "-1"],
        ["--env", "HalfCheetah-v5"],
    ],
)
def test_plan_bad_input(run_with_model, args):
    one_line_error(run_cli("plan", "--checkpoint", run_with_model, "--max-steps", 2, *args))


def test_plan_missing_or_corrupt(run_with_model, tmp_path):
    one_line_error(run_cli("plan", "--checkpoint", tmp_path / "nope"))
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_with_model, bad)
    (bad / "model" / "weights.safetensors").write_bytes(b"garbage" * 5)
    one_line_error(run_cli("plan", "--checkpoint", bad, "--max-steps", 2))


def test_transfer_reports_all_contenders(run_with_model):
    for objective in ("model-free", "model"):
        if not (run_with_model / "optimizers" / objective).exists():
            ok(run_cli("fit-optimizer", "--checkpoint", run_with_model, "--objective", objective,
                       "--steps", 3, "--batch-size", 8, "--samples", 2))  # fmt: skip
    out = ok(run_cli("transfer", "--checkpoint", run_with_model, "--episodes", 1,
                     "--max-steps", 3, "--samples", 2))  # fmt: skip
    assert "zero-shot" in out and "model-based" in out and "direct" in out


def test_transfer_needs_a_model_free_optimizer(run_with_model, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_with_model, copy)
    shutil.rmtree(copy / "optimizers", ignore_errors=True)
    one_line_error(run_cli("transfer", "--checkpoint", copy, "--episodes", 1))


def test_iterative_run_gets_a_distilled_future_policy(tmp_path):
    run = tmp_path / "it"
    ok(run_cli("train", "--env", "InvertedPendulum-v5", "--agent", "iterative", "--steps", 130,
               "--warmup", 100, "--batch-size", 8, "--samples", 2, "--iters", 2,
               "--eval-interval", 0, "--out", run, "--threads", 1))  # fmt: skip
    one_line_error(run_cli("plan", "--checkpoint", run, "--planner", "adam", "--max-steps", 2))
    out = ok(run_cli("fit-model", "--checkpoint", run, "--steps", 20, "--horizon", 2,
                     "--distill-steps", 10))  # fmt: skip
    assert "distilled" in out
    result = run_cli("plan", "--checkpoint", run, "--planner", "iterative", "--horizon", 2,
                     "--max-steps", 2, "--samples", 2)  # fmt: skip
    assert "ms/action" in ok(result)
    # the agent's optimizer was trained on the model-free objective: said, not silent
    assert "trained on the model-free objective (zero-shot)" in result.stderr


def test_export_bundle_plans_without_replay(run_with_model, tmp_path):
    bundle = tmp_path / "bundle"
    out = ok(run_cli("export", "--checkpoint", run_with_model, "--out", bundle))
    assert "MB" in out
    assert not list(bundle.rglob("replay.safetensors")) and not list(bundle.rglob("optim_*"))
    assert (bundle / "metrics.jsonl").is_file() and (bundle / "config.json").is_file()
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 10e6
    out = ok(run_cli("plan", "--checkpoint", bundle, "--planner", "cem", "--horizon", 2,
                     "--max-steps", 2, "--iters", 2, "--samples", 2))  # fmt: skip
    assert "ms/action" in out
