"""The bundled default checkpoint: shipped in the package, small, and every planner runs on it."""

import pytest
from cli_helpers import run_cli

import mbplan
from mbplan.checkpoint import default_bundle
from mbplan.mpc import MPC, PlanSettings, load_setup

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]


def test_bundle_is_complete_and_small():
    path = default_bundle()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 10e6, f"{size / 1e6:.1f} MB"
    setup = load_setup(path)
    assert setup.config["env"] == "HalfCheetah-v5"
    assert (setup.state_dim, setup.action_dim) == (17, 6)
    assert setup.dynamics is not None and setup.reward is not None
    assert set(setup.optimizers) == {"model-free", "model"}


@pytest.mark.parametrize("planner", sorted(mbplan.PLANNERS))
def test_plan_runs_on_the_default(planner):
    out = run_cli("plan", "--planner", planner, "--horizon", 2, "--episodes", 1, "--max-steps", 3,
                  "--iters", 2 if planner in ("adam", "cem") else 0, "--threads", 1)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{planner} H=2: return" in out.stdout and "ms/action" in out.stdout


def test_plan_compiled_on_the_default():
    out = run_cli("plan", "--planner", "iterative", "--horizon", 2, "--episodes", 1, "--max-steps",
                  3, "--compile", "--threads", 1)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iterative H=2: return" in out.stdout and "compiled the plan in" in out.stdout
    out = run_cli("plan", "--planner", "direct", "--episodes", 1, "--max-steps", 2, "--compile")
    assert out.returncode == 0 and "compiled" not in out.stdout, out.stderr[-3000:]
    assert "note: --compile compiles the iterative planner's plan (direct has none)" in out.stderr


def test_transfer_runs_on_the_default():
    out = run_cli("transfer", "--episodes", 1, "--max-steps", 3, "--threads", 1)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("zero-shot", "model-based", "direct"):
        assert name in out.stdout


def test_default_refuses_an_env_of_other_sizes():
    out = run_cli("plan", "--env", "Hopper-v5", "--max-steps", 2)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_planning_objectives_use_ten_samples_not_the_runs_k():
    """The default was trained with SAC's K = 1; planning must not inherit one-sample estimates."""
    from mbplan.mpc import PLAN_SAMPLES, model_free_objective, model_objective

    setup = load_setup(default_bundle())
    assert setup.agent.config.n_samples == 1 and PLAN_SAMPLES == 10
    assert model_free_objective(setup).n_samples == 10
    assert model_objective(setup, 2)[0].n_samples == 10
    assert model_objective(setup, 2, samples=3)[0].n_samples == 3


def test_plan_starts_where_init_says():
    """policy: λ_0 = f(s) of the direct policy; previous: λ_0 = the last step's λ; prior: fixed."""
    import torch

    from mbplan.envs import make_env
    from mbplan.errors import UserError
    from mbplan.mpc import model_objective, planner_for

    setup = load_setup(default_bundle())
    objective, _ = model_objective(setup, 1, samples=2)
    adam, policy = planner_for(setup, "adam", "model"), setup.future_policy()
    env = make_env("HalfCheetah-v5")
    starts = {}
    for init in ("prior", "previous", "policy"):
        plans: list = []
        mpc = MPC(setup, adam, objective, PlanSettings(2, init, trust=0.0), seed=0)
        mpc.run(env, 1, max_steps=2, plans=plans)
        starts[init] = plans
    second = starts["policy"][1]
    with torch.no_grad():
        proposal = policy(second["state"][None])
    assert torch.equal(second["trace"].loc[0], proposal.loc)
    assert torch.equal(second["trace"].log_scale[0], proposal.log_scale)
    prev = starts["previous"]
    assert torch.equal(prev[1]["trace"].loc[0], prev[0]["trace"].loc[-1])
    assert torch.count_nonzero(starts["prior"][1]["trace"].loc[0]) == 0
    with pytest.raises(UserError, match="unknown plan start"):
        MPC(setup, adam, objective, PlanSettings(2, "elsewhere"), seed=0)


def test_trust_region_keeps_plans_near_the_policy():
    """--trust η: the larger η, the closer the planned λ stays to the policy's proposal."""
    import torch

    from mbplan.distributions import TanhNormal, kl_between
    from mbplan.envs import make_env
    from mbplan.mpc import model_objective, planner_for

    setup = load_setup(default_bundle())
    objective, _ = model_objective(setup, 1, samples=4)
    planner, policy = planner_for(setup, "iterative", "model"), setup.future_policy()
    env = make_env("HalfCheetah-v5")
    kls = []
    for trust in (0.0, 100.0):
        plans: list = []
        mpc = MPC(setup, planner, objective, PlanSettings(None, "policy", trust), seed=0)
        mpc.run(env, 1, max_steps=3, plans=plans)
        with torch.no_grad():
            finals = [TanhNormal(p["trace"].loc[-1], p["trace"].log_scale[-1]) for p in plans]
            kl = [kl_between(final, policy(p["state"][None])).item()
                  for final, p in zip(finals, plans, strict=True)]  # fmt: skip
        kls.append(sum(kl) / len(kl))
    assert kls[1] < 0.5 * kls[0]  # a learned optimizer does not converge onto the anchor


def test_mpc_act_plans_one_state_and_matches_its_episode_loop():
    """MPC.act(state) -> (action, PlanResult); run() is act() in a loop with the same draws."""
    import numpy as np
    import torch

    from mbplan.envs import make_env
    from mbplan.mpc import model_objective, planner_for

    setup = load_setup(default_bundle())
    objective, _ = model_objective(setup, 2, samples=4)
    planner = planner_for(setup, "iterative", "model")
    env = make_env("HalfCheetah-v5")
    loop = MPC(setup, planner, objective, PlanSettings(), seed=3)
    plans: list = []
    loop.run(env, 1, max_steps=3, plans=plans)

    mpc = MPC(setup, planner, objective, PlanSettings(), seed=3)
    obs, _ = env.reset(seed=3)
    for p in plans:
        mpc.value.record = []  # the loop recorded rollouts: the same (unfused) evaluation path
        action, result = mpc.act(torch.as_tensor(obs, dtype=torch.float32))
        assert action.shape == (6,) and np.all(np.abs(action) < 1)
        assert result.dist.loc.shape == (1, 6)
        torch.testing.assert_close(result.trace.loc, p["trace"].loc, rtol=0, atol=0)
        mpc.improvement(torch.as_tensor(obs, dtype=torch.float32), result)  # the loop's draws
        obs, *_ = env.step(action)


def test_mpc_plans_iterative_as_one_function_unless_fast_is_off():
    """MPC.act plans through FastIterativePlan by default (its trace times only λ_I), the loop
    with MBPLAN_FAST=0.

    Both plan the same λ from the same draws, to float32 rounding.
    """
    import torch

    from mbplan import fast
    from mbplan.mpc import model_objective, planner_for

    setup = load_setup(default_bundle())
    objective, _ = model_objective(setup, 2, samples=4)
    planner = planner_for(setup, "iterative", "model")
    state = torch.as_tensor(_first_state(), dtype=torch.float32)
    _, quick = MPC(setup, planner, objective, PlanSettings(), seed=5).act(state)
    with fast.disabled():
        _, loop = MPC(setup, planner, objective, PlanSettings(), seed=5).act(state)
    assert torch.isnan(quick.trace.elapsed[1:-1]).all()  # the one function: no per-iterate times
    assert torch.isfinite(loop.trace.elapsed).all()
    torch.testing.assert_close(quick.trace.loc[1], loop.trace.loc[1], rtol=1e-4, atol=1e-4)


def _first_state():
    """The first state of a HalfCheetah-v5 episode (reset seed 0)."""
    from mbplan.envs import make_env

    obs, _ = make_env("HalfCheetah-v5").reset(seed=0)
    return obs
