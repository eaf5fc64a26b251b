"""``mbplan fit-model``, ``eval-model``, ``fit-optimizer``, ``plan``, ``transfer``, ``export``.

Options (one dataclass per command) and handlers: argument checks and printing only; the work is
done by :mod:`mbplan.fit`, :mod:`mbplan.mpc` and :mod:`mbplan.checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mbplan.checkpoint import (
    export_bundle,
    is_empty_folder,
    model_tensors,
    replay_transitions,
    require_run,
    run_lock,
    run_or_default,
    save_folder,
    save_plans,
)
from mbplan.envs import check_env_matches, env_spec, make_env, write_video
from mbplan.errors import UserError
from mbplan.fast.malloc import tune_malloc
from mbplan.fit import (
    distill_direct,
    ensemble_errors,
    fit_models,
    fit_optimizer,
    keep_elites,
    open_loop_errors,
    split_holdout,
)
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward
from mbplan.mpc import (
    MPC,
    PlanSettings,
    check_kappa,
    check_trust,
    compile_option,
    init_option,
    kappa_option,
    load_setup,
    model_free_objective,
    model_objective,
    planner_for,
    propagation_option,
    trust_option,
)
from mbplan.options import (
    MAX_HORIZON,
    MAX_ITERS,
    SEED_RANGE,
    THREAD_RANGE,
    check_ranges,
    option,
)
from mbplan.planners import PLANNERS, MPPIPlanner


@dataclass
class FitModelOptions:
    """Options of ``mbplan fit-model``."""

    checkpoint: str = option(
        "", "run folder whose replay buffer the model is fitted on", required=True
    )
    steps: int = option(5000, "gradient steps")
    batch_size: int = option(256, "transitions per step")
    lr: float = option(3e-4, "Adam learning rate")
    hidden: int = option(256, "width of the 2-layer LayerNorm/LeakyReLU MLPs")
    horizon: int = option(5, "open-loop horizon of the reported prediction error")
    holdout: float = option(0.05, "newest fraction of the replay held out for the errors")
    seed: int = option(0, "seed of initialisation and batches")
    threads: int = option(0, "torch CPU threads (0 = one per core)")
    distill_steps: int = option(
        500, "for an iterative run: steps distilling the direct future policy of the rollouts"
    )
    ensemble: int = option(
        5, "ensemble members E (one batched network, bootstrap data per member); 1 = one model"
    )
    elites: int = option(0, "keep the E' members with the lowest held-out error (0 = all E)")


@dataclass
class EvalModelOptions:
    """Options of ``mbplan eval-model``."""

    checkpoint: str = option("", "run folder with a fitted model", required=True)
    horizon: int = option(5, "open-loop horizon")
    holdout: float = option(0.05, "newest fraction of the replay used (held out at fit time)")
    seed: int = option(0, "seed of the sampled sequences")


@dataclass
class FitOptimizerOptions:
    """Options of ``mbplan fit-optimizer``."""

    checkpoint: str = option(
        "", "run folder (its critics, model and policy stay frozen)", required=True
    )
    objective: str = option("model", "objective to fit on", choices=("model-free", "model"))
    steps: int = option(
        2000,
        "gradient steps (each costs about 1 s on a 2-core CPU, N+1 objective evaluations of "
        "256 states: 2000 steps ≈ 35 min; a progress bar shows the ETA)",
    )
    horizon: int = option(2, "rollout horizon H of the model objective")
    propagation: str = propagation_option()
    kappa: float = kappa_option()
    iters: int = option(5, "iterations N of the optimizer")
    samples: int = option(10, "samples K per state")
    batch_size: int = option(256, "replay states per step")
    lr: float = option(3e-4, "Adam learning rate")
    seed: int = option(0, "seed")
    threads: int = option(0, "torch CPU threads (0 = one per core)")


@dataclass
class PlanOptions:
    """Options of ``mbplan plan``."""

    planner: str = option("iterative", "planner", choices=tuple(PLANNERS))
    horizon: int = option(5, "model rollout horizon H (any H >= 1)")
    propagation: str = propagation_option()
    kappa: float = kappa_option()
    checkpoint: str = option("", "run folder with a model (default: the bundled checkpoint)")
    env: str = option("", "env id (default: the run's)")
    episodes: int = option(1, "episodes")
    iters: int = option(0, "planner iterations per action (0 = planner default: iterative 5)")
    samples: int = option(0, "samples K per state (0 = 10)")
    seed: int = option(0, "seed of resets and sampling")
    max_steps: int = option(0, "cap on steps per episode (0 = the env's time limit)")
    init: str = init_option()
    trust: float = trust_option()
    compile: bool = compile_option()
    stochastic: bool = option(False, "act with a sample instead of tanh(μ)")
    policy_samples: int = option(
        MPPIPlanner.policy_samples,
        "mppi: of its candidate sequences, how many are rolled out from the policy "
        "(0 = the plain open-loop planner of the PETS family)",
    )
    video: str = option("", "write the first episode as an MP4 here")
    save_plans: str = option("", "write every step's plans (safetensors) here")
    threads: int = option(
        1, "torch CPU threads (one state per step: more threads barely help; 0 = one per core)"
    )


def plan_objective(setup, opts):
    """Ĵ_MB of the plan and transfer commands: their H, K, propagation and κ."""
    kappa = check_kappa(opts.kappa)
    return model_objective(
        setup, opts.horizon, opts.samples or None, propagation=opts.propagation, kappa=kappa
    )[0]


def check_plan_sizes(horizon: int, iters: int, samples: int, episodes: int, max_steps: int) -> None:
    """Bounds of the planning sizes: values past them would only hang or exhaust memory."""
    if not 1 <= horizon <= MAX_HORIZON:
        raise UserError(f"--horizon must be in [1, {MAX_HORIZON}], got {horizon}")
    if not 0 <= iters <= MAX_ITERS:
        raise UserError(
            f"--iters must be in [0, {MAX_ITERS}] (0 = the planner's default), got {iters}"
        )
    if not 0 <= samples <= 10**5:
        raise UserError(f"--samples must be in [0, 100000] (0 = 10), got {samples}")
    if not 1 <= episodes <= 10**6 or not 0 <= max_steps <= 10**7:
        raise UserError("--episodes must be in [1, 1000000] and --max-steps in [0, 10000000]")


def check_writable(path: str) -> None:
    """Refuse an output file whose folder is missing or not writable (before any work is done)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{path} is a folder: give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: folder {folder} is not writable")


def policy_reference(setup) -> str | None:
    """The direct policy's own return at the end of its training (its last eval line), if known."""
    evals = setup.evals
    if not evals:
        return None
    last = evals[-1]
    n = len(last.get("eval_returns", [])) or "?"
    return (
        f"reference: the run's own policy scored {last['eval_return_mean']:.1f} ± "
        f"{last.get('eval_return_std', float('nan')):.1f} (SD over {n} eval episodes at step "
        f"{last.get('step')}, no planning)"
    )


def _threads(n: int) -> None:
    """Process settings of a compute command: torch threads (n > 0) and glibc's malloc tuning."""
    tune_malloc()  # ~20% off a compiled plan's step in an env loop (measured 27 → 22 ms)
    if n > 0:
        torch.set_num_threads(n)


@dataclass
class ExportOptions:
    """Options of ``mbplan export``."""

    checkpoint: str = option("", "run folder (with a model and fitted optimizers)", required=True)
    out: str = option("", "new (or empty) folder for the lean planning bundle", required=True)


def export_cmd(opts: ExportOptions) -> None:
    """Write a lean planning bundle (weights, model, optimizers; no replay or optimizer state)."""
    run = require_run(opts.checkpoint)
    if not opts.out:
        raise UserError("--out is required")
    if (
        Path(opts.out).resolve() == run.resolve()
        or run.resolve() in Path(opts.out).resolve().parents
    ):
        raise UserError("--out must be a new folder outside the run, not the run itself")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise UserError(f"--out {opts.out} is a file")
    with run_lock(opts.out, "export") as folder:
        if not is_empty_folder(folder):
            raise UserError(f"--out {opts.out} is not empty: export writes only into a new folder")
        out = export_bundle(run, folder)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"planning bundle written to {out} ({size / 1e6:.1f} MB)")


def _run_to_write(path: str) -> Path:
    """``--checkpoint`` of a command that saves into the run: the run folder, not a checkpoint.

    A fit saved inside ``RUN/ckpt-<step>`` would be deleted with it by the checkpoint rotation.
    """
    run = require_run(path)
    if (run / "meta.json").is_file():
        raise UserError(
            f"--checkpoint {path} is a single checkpoint: give its run folder ({run.parent}), "
            "where the fit is saved"
        )
    return run


def fit_model_cmd(opts: FitModelOptions) -> None:
    """Fit dynamics and reward on a run's replay; save ``RUN/model``; print open-loop errors."""
    run = _run_to_write(opts.checkpoint)
    if opts.steps < 1 or opts.horizon < 1 or not 0 < opts.holdout < 1:
        raise UserError("--steps and --horizon must be >= 1 and 0 < --holdout < 1")
    check_fit_options(opts)
    with run_lock(run, "fit-model"):
        _fit_model(run, opts)


def check_fit_options(opts) -> None:
    """Ranges shared by fit-model and fit-optimizer (a NaN or huge rate only diverges)."""
    if not (math.isfinite(opts.lr) and 0 < opts.lr <= 1):
        raise UserError(f"--lr must be in (0, 1], got {opts.lr}")
    check_ranges(opts, {"batch_size": (1, 10**6), "seed": SEED_RANGE, "threads": THREAD_RANGE})


def _fit_model(run, opts: FitModelOptions) -> None:
    if not 1 <= opts.hidden <= 65536 or opts.distill_steps < 0 or opts.horizon > MAX_HORIZON:
        raise UserError("--hidden must be in [1, 65536], --distill-steps >= 0, --horizon <= 1000")
    if not 1 <= opts.ensemble <= 256:
        raise UserError(f"--ensemble must be in [1, 256], got {opts.ensemble}")
    if not 0 <= opts.elites <= opts.ensemble:
        raise UserError(f"--elites must be in [0, --ensemble = {opts.ensemble}], got {opts.elites}")
    _threads(opts.threads)
    data = replay_transitions(run)
    train, held = split_holdout(data, opts.holdout)
    S, A = data["states"].shape[1], data["actions"].shape[1]
    torch.manual_seed(opts.seed)
    E = opts.ensemble
    if E > 1:
        dynamics, reward = (
            EnsembleDynamics(S, A, E, opts.hidden),
            EnsembleReward(S, A, E, opts.hidden),
        )
    else:
        dynamics, reward = Dynamics(S, A, opts.hidden), Reward(S, A, opts.hidden)
    g = torch.Generator().manual_seed(opts.seed)
    log = fit_models(dynamics, reward, train, opts.steps, opts.batch_size, opts.lr, g)
    elites = None
    if E > 1 and 0 < opts.elites < E:
        elites = keep_elites(dynamics, reward, held, opts.elites)
    errors = open_loop_errors(dynamics, reward, held, opts.horizon, generator=g)
    setup = load_setup(run)
    student, distill_kl = None, None
    if setup.agent.config.agent == "iterative" and setup.agent.future_policy() is None:
        # The rollouts act with a direct network: distil one from the iterative agent.
        student, distill_kl = distill_direct(
            setup.agent, train["states"], opts.distill_steps, seed=opts.seed
        )
    tensors = model_tensors(dynamics, reward, student)
    meta = {
        "hidden": opts.hidden,
        "members": getattr(dynamics, "n_members", 1),
        "elites_of": E if elites is not None else None,
        "elite_members": elites,
        "euler": None,
        "fit": asdict(opts),
        "held_out_errors": errors,
        "final_losses": log[-1],
        "transitions": int(data["states"].shape[0]),
        "distill_kl": distill_kl,
    }
    save_folder(run / "model", tensors, meta)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"model_fit": meta}) + "\n")
    _print_errors(
        errors, f"model fitted on {train['states'].shape[0]} transitions, saved to {run}/model"
    )
    if distill_kl is not None:
        print(f"direct future policy distilled from the iterative agent: KL {distill_kl:.4f}")


def _print_errors(errors: dict, header: str) -> None:
    print(header)
    print("open-loop error on held-out real transitions (h = steps ahead):")
    print("   h  state_rmse  state_nrmse  reward_rmse")
    for h, (a, b, c) in enumerate(
        zip(errors["state_rmse"], errors["state_nrmse"], errors["reward_rmse"], strict=True)
    ):
        print(f"{h + 1:4d}  {a:10.4f}  {b:11.4f}  {c:11.4f}")


def eval_model_cmd(opts: EvalModelOptions) -> None:
    """Print open-loop errors of a run's fitted model on its held-out replay."""
    run = require_run(opts.checkpoint)
    if opts.horizon < 1:
        raise UserError("--horizon must be >= 1")
    setup = load_setup(run)
    if setup.dynamics is None:
        raise UserError(f"{run} has no model: run `mbplan fit-model --checkpoint {run}` first")
    _, held = split_holdout(replay_transitions(run), opts.holdout)
    g = torch.Generator().manual_seed(opts.seed)
    errors = open_loop_errors(setup.dynamics, setup.reward, held, opts.horizon, generator=g)
    _print_errors(errors, f"model of {run}")
    if isinstance(setup.dynamics, EnsembleDynamics):
        g = torch.Generator().manual_seed(opts.seed)
        report = ensemble_errors(setup.dynamics, setup.reward, held, opts.horizon, generator=g)
        E = setup.dynamics.n_members
        print(f"ensemble of {E} members: open-loop state NRMSE per member and of the mean; rank")
        print("correlation (Spearman) of the members' disagreement with the mean's actual error")
        head = "".join(f"  member{e}" for e in range(E))
        print(f"   h{head}      mean  disagreement~error")
        for h in range(opts.horizon):
            cells = "".join(f"  {report['member_state_nrmse'][e][h]:7.4f}" for e in range(E))
            print(f"{h + 1:4d}{cells}  {report['mean_state_nrmse'][h]:8.4f}  "
                  f"{report['disagreement_rank_corr'][h]:18.3f}")  # fmt: skip


def fit_optimizer_cmd(opts: FitOptimizerOptions) -> None:
    """Train an iterative optimizer on a run's frozen objective; save ``RUN/optimizers/<obj>``."""
    run = _run_to_write(opts.checkpoint)
    if min(opts.steps, opts.iters, opts.samples, opts.batch_size, opts.horizon) < 1:
        raise UserError("--steps, --iters, --samples, --batch-size and --horizon must be >= 1")
    if opts.horizon > MAX_HORIZON or opts.iters > 1000 or opts.samples > 10**5:
        raise UserError("--horizon must be <= 1000, --iters <= 1000 and --samples <= 100000")
    check_fit_options(opts)
    with run_lock(run, "fit-optimizer"):
        _fit_optimizer(run, opts)


def _fit_optimizer(run, opts: FitOptimizerOptions) -> None:
    _threads(opts.threads)
    setup = load_setup(run)
    if opts.objective == "model":
        objective, _ = model_objective(
            setup,
            opts.horizon,
            opts.samples,
            propagation=opts.propagation,
            kappa=check_kappa(opts.kappa),
        )
    else:
        objective = model_free_objective(setup, opts.samples)
    states = replay_transitions(run)["states"]
    bar = tqdm(total=opts.steps, unit="step", desc=f"fit {opts.objective}", mininterval=1.0)
    history: list[list[float]] = []  # [step, mean improvement, mean loss, seconds] every 10 steps
    window: list[tuple[float, float]] = []
    start = time.perf_counter()

    def on_step(step: int, loss: float, improvement: float) -> None:
        bar.update(1)
        window.append((improvement, loss))
        if len(window) == 10 or step + 1 == opts.steps:  # step counts from 0
            imp, los = (statistics.fmean(col) for col in zip(*window))
            history.append([step + 1, imp, los, time.perf_counter() - start])
            window.clear()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", improvement=f"{improvement:.3f}")

    try:
        planner, improvements = fit_optimizer(
            objective, states, opts.steps, opts.batch_size, opts.lr, opts.iters, opts.seed, on_step
        )
    finally:
        bar.close()
    tail = improvements[-min(100, len(improvements)) :]
    meta = {
        "hyperparameters": planner.hyperparameters() | {"n_iters": opts.iters},
        "objective": opts.objective,
        "fit": asdict(opts),
        "final_improvement": statistics.fmean(tail),
        "history_columns": ["step", "improvement", "loss", "seconds"],
        "history": history,
    }
    meta["hyperparameters"].pop("state_dim")
    meta["hyperparameters"].pop("action_dim")
    save_folder(run / "optimizers" / opts.objective, dict(planner.state_dict()), meta)
    print(
        f"iterative optimizer fitted on the {opts.objective} objective ({opts.steps} steps); "
        f"mean Ĵ(λ_N) − Ĵ(λ_0) over the last {len(tail)} steps: {meta['final_improvement']:.3f}; "
        f"saved to {run}/optimizers/{opts.objective}"
    )


def plan_cmd(opts: PlanOptions) -> None:
    """Receding-horizon control with a planner against the model-based objective."""
    check_plan_sizes(opts.horizon, opts.iters, opts.samples, opts.episodes, opts.max_steps)
    trust = check_trust(opts.trust, opts.planner)
    check_ranges(opts, {"seed": SEED_RANGE, "threads": THREAD_RANGE})
    for path in (opts.save_plans, opts.video):
        if path:
            check_writable(path)
    _threads(opts.threads)
    setup = load_setup(run_or_default(opts.checkpoint))
    objective = plan_objective(setup, opts)
    mppi = {"policy_samples": opts.policy_samples} if opts.planner == "mppi" else {}
    planner = planner_for(setup, opts.planner, "model", **mppi)
    env = make_env(opts.env or setup.config["env"], seed=opts.seed, render=bool(opts.video))
    check_env_matches(env_spec(env), setup.config["env_spec"])
    plans: list | None = [] if opts.save_plans else None
    frames: list | None = [] if opts.video else None
    if opts.compile and (opts.planner != "iterative" or opts.save_plans):
        why = "--save-plans records rollouts" if opts.save_plans else f"{opts.planner} has none"
        print(
            f"note: --compile compiles the iterative planner's plan ({why}); planning uncompiled",
            file=sys.stderr,
        )
    elif opts.save_plans and opts.planner == "iterative":
        print(
            "note: --save-plans records rollouts, so the iterative planner runs its loop, not the "
            "faster one-function plan: same plans to rounding, but episodes can drift apart",
            file=sys.stderr,
        )
    settings = PlanSettings(opts.iters or None, opts.init, trust, opts.stochastic, opts.compile)
    mpc = MPC(setup, planner, objective, settings, opts.seed)  # its warnings before the bar
    limit = opts.max_steps or env_spec(env).max_episode_steps or 1000
    bar = tqdm(
        total=opts.episodes * limit, unit="step", desc=f"plan {opts.planner}", mininterval=1.0
    )
    try:
        stats = mpc.run(
            env, opts.episodes, opts.max_steps or None, lambda ep, t: bar.update(1), plans, frames
        )
    finally:
        bar.close()
    for i, r in enumerate(stats.returns):
        print(f"episode {i}: return {r:.1f}")
    mean = statistics.fmean(stats.returns)
    std = statistics.pstdev(stats.returns) if len(stats.returns) > 1 else 0.0
    print(
        f"{opts.planner} H={opts.horizon}: return {mean:.1f} ± {std:.1f} "
        f"over {len(stats.returns)} episodes; {stats.ms_per_action:.1f} ms/action; "
        f"mean Ĵ(λ_I) − Ĵ(λ_0) = {stats.improvement:.3f}"
    )
    reference = policy_reference(setup)
    if reference:
        print(reference)
    if stats.compile_seconds:
        print(f"compiled the plan in {stats.compile_seconds:.1f} s (not in ms/action)")
    if opts.video and frames:
        dt = setup.config["env_spec"].get("dt") or 1 / 30
        write_video(frames, opts.video, fps=round(1 / dt))
        print(f"video written to {opts.video}")
    if plans is not None:
        save_plans(opts.save_plans, plans, {"planner": opts.planner, "horizon": str(opts.horizon)})
        print(f"plans of {len(plans)} steps written to {opts.save_plans}")


@dataclass
class TransferOptions:
    """Options of ``mbplan transfer``."""

    checkpoint: str = option("", "run folder with a model and fitted optimizers")
    optimizer_from: str = option(
        "", "run folder whose model-free optimizer is transferred (default: --checkpoint's)"
    )
    horizon: int = option(2, "model rollout horizon H")
    propagation: str = propagation_option()
    kappa: float = kappa_option()
    episodes: int = option(3, "episodes per policy (same seeds for all)")
    max_steps: int = option(0, "cap on steps per episode (0 = the env's time limit)")
    samples: int = option(0, "samples K per state (0 = 10)")
    seed: int = option(0, "seed of resets and sampling")
    init: str = init_option()
    trust: float = trust_option()
    compile: bool = compile_option()
    threads: int = option(
        1, "torch CPU threads (one state per step: more threads barely help; 0 = one per core)"
    )


def transfer_cmd(opts: TransferOptions) -> None:
    """Zero-shot MF → MB transfer (paper Fig. 8d).

    Plans against Ĵ_MB with an iterative optimizer trained only on the model-free objective, beside
    the one trained on Ĵ_MB and the direct policy, with the same seeds.
    """
    check_plan_sizes(opts.horizon, 0, opts.samples, opts.episodes, opts.max_steps)
    check_trust(opts.trust)
    _threads(opts.threads)
    setup = load_setup(run_or_default(opts.checkpoint))
    source = load_setup(require_run(opts.optimizer_from)) if opts.optimizer_from else setup
    if "model-free" not in source.optimizers:
        raise UserError(
            "no model-free optimizer: run `mbplan fit-optimizer --objective model-free`"
        )
    transferred = source.optimizers["model-free"]
    if (transferred.state_dim, transferred.action_dim) != (setup.state_dim, setup.action_dim):
        raise UserError("the transferred optimizer was trained for other state/action sizes")
    contenders = {"iterative (model-free, zero-shot)": transferred}
    if "model" in setup.optimizers:
        contenders["iterative (model-based)"] = setup.optimizers["model"]
    contenders["direct"] = setup.future_policy()
    objective = plan_objective(setup, opts)
    env = make_env(setup.config["env"], seed=opts.seed)
    check_env_matches(env_spec(env), setup.config["env_spec"])
    print(
        f"zero-shot transfer on {setup.config['env']}, H={opts.horizon}, {opts.episodes} episodes"
    )
    for name, planner in contenders.items():
        trust = check_trust(opts.trust, name)
        settings = PlanSettings(None, opts.init, trust, compile=opts.compile)
        mpc = MPC(setup, planner, objective, settings, opts.seed)
        stats = mpc.run(env, opts.episodes, opts.max_steps or None)
        mean = statistics.fmean(stats.returns)
        std = statistics.pstdev(stats.returns) if len(stats.returns) > 1 else 0.0
        compiled = f"  (compiled in {stats.compile_seconds:.1f} s)" if stats.compile_seconds else ""
        print(
            f"{name:36s} return {mean:9.1f} ± {std:7.1f}  {stats.ms_per_action:7.1f} ms/action  "
            f"Ĵ(λ_I) − Ĵ(λ_0) {stats.improvement:7.3f}{compiled}"
        )
