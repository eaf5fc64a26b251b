"""Model-based planning against a trained run.

Load the pieces, build Ĵ_MB, run receding-horizon control in the real env (``mbplan plan``).

A run folder gains two things on top of its training checkpoints:
``model/`` (dynamics and reward weights, from ``mbplan fit-model``) and
``optimizers/<objective>/`` (an iterative optimizer trained on a frozen objective, from
``mbplan fit-optimizer``). Each is written whole under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mbplan.agent import Agent
from mbplan.distributions import TanhNormal, kl_between
from mbplan.envs import render_frame
from mbplan.errors import UserError
from mbplan.model_value import ModelValue
from mbplan.models.dynamics import Dynamics, EulerSpec, Reward
from mbplan.objective import AnchoredObjective, Objective, make_objective
from mbplan.planners import (
    DirectPlanner,
    IterativePlanner,
    Planner,
    make_planner,
    train_amortized,
)
from mbplan.train import load_agent

OBJECTIVES = ("model-free", "model")


# -- folders of safetensors + JSON, replaced atomically -------------------------------------------


def save_folder(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``weights.safetensors`` + ``meta.json`` into ``path`` atomically (replacing it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cpu = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }
    save_file(cpu, str(tmp / "weights.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_folder`; :class:`UserError` when missing or corrupt."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        old = path.with_name(f".{path.name}.old")  # killed between the two renames
        if (old / "meta.json").is_file():
            path = old
        else:
            raise UserError(f"not found: {path}")
    try:
        return load_file(str(path / "weights.safetensors")), json.loads(
            (path / "meta.json").read_text()
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"corrupt {path}: {exc}") from None


# -- the pieces of a planning setup ---------------------------------------------------------------


@dataclass
class Setup:
    """Everything planning needs from one run (or the bundled default).

    Attributes:
        agent: Critic, target critic, planner (the agent's policy) and α.
        config: The run's training options plus ``env_spec``.
        dynamics: Learned dynamics (None for a run without a model).
        reward: Learned reward (None without a model).
        optimizers: Iterative optimizers fitted per objective (``model-free``, ``model``).
        distilled: A direct network distilled from an iterative agent by ``fit-model``.
    """

    agent: Agent
    config: dict[str, Any]
    dynamics: Dynamics | None = None
    reward: Reward | None = None
    optimizers: dict[str, IterativePlanner] = field(default_factory=dict)
    distilled: DirectPlanner | None = None

    @property
    def state_dim(self) -> int:
        """S."""
        return int(self.config["env_spec"]["state_dim"])

    @property
    def action_dim(self) -> int:
        """A."""
        return int(self.config["env_spec"]["action_dim"])

    def future_policy(self):
        """The amortized policy used after the first action of a rollout (a direct network)."""
        own = self.agent.future_policy()
        if own is not None:  # a model-based run: its direct policy or distilled network
            return own
        if self.agent.config.agent == "direct":
            return self.agent.planner
        if self.distilled is not None:
            return self.distilled
        raise UserError("this iterative run has no direct future policy: run `mbplan fit-model`")


def model_tensors(dynamics: Dynamics, reward: Reward) -> dict[str, torch.Tensor]:
    """Both models' weights and normaliser buffers, prefixed ``dynamics.`` / ``reward.``."""
    out = {f"dynamics.{k}": v for k, v in dynamics.state_dict().items()}
    out.update({f"reward.{k}": v for k, v in reward.state_dict().items()})
    return out


def build_models(S: int, A: int, meta: dict[str, Any]) -> tuple[Dynamics, Reward]:
    """Empty models with the sizes and layout recorded in a model folder's meta."""
    euler = None
    if meta.get("euler"):
        euler = EulerSpec(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["euler"].items()}
        )
    hidden = int(meta.get("hidden", 256))
    return Dynamics(S, A, hidden, euler), Reward(S, A, hidden)


def load_setup(path: str | Path) -> Setup:
    """Load a run folder's agent, and its model and fitted optimizers where present."""
    run = Path(path)
    agent, config = load_agent(run)
    agent.eval()
    setup = Setup(agent, config)
    S, A = setup.state_dim, setup.action_dim
    if agent.dynamics is not None:  # trained with --value model: the agent's own models
        setup.dynamics, setup.reward = agent.dynamics, agent.reward
    if (run / "model").exists() or (run / ".model.old").exists():  # fitted afterwards: preferred
        tensors, meta = load_folder(run / "model")
        dynamics, reward = build_models(S, A, meta)
        _load_prefixed(dynamics, tensors, "dynamics.")
        _load_prefixed(reward, tensors, "reward.")
        setup.dynamics, setup.reward = dynamics.eval(), reward.eval()
        if any(k.startswith("distilled.") for k in tensors):
            setup.distilled = DirectPlanner(S, A, int(meta.get("hidden", 256)))
            _load_prefixed(setup.distilled, tensors, "distilled.")
    for objective in OBJECTIVES:
        folder = run / "optimizers" / objective
        if folder.exists():
            tensors, meta = load_folder(folder)
            planner = IterativePlanner(S, A, **meta["hyperparameters"])
            _load_prefixed(planner, tensors, "")
            setup.optimizers[objective] = planner.eval()
    modules = [setup.agent, setup.dynamics, setup.reward, setup.distilled]
    for module in [*modules, *setup.optimizers.values()]:
        if module is not None:
            module.requires_grad_(False)
    return setup


def _load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"weights do not fit: {str(exc).splitlines()[0]}") from None


# -- objectives ------------------------------------------------------------------------------------


#: Samples K per state of the planning objectives unless a command says otherwise (DESIGN §2). Not
#: the run's own K: an agent trained with SAC's K = 1 would otherwise plan on one-sample estimates.
PLAN_SAMPLES = 10
#: Where :func:`run_mpc` starts each plan (see its ``init``).
PLAN_INITS = ("prior", "previous", "policy")


def model_free_objective(setup: Setup, samples: int | None = None) -> Objective:
    """Ĵ on the run's pessimistic target critics (its training objective), K = ``samples``."""
    objective = setup.agent.objective()
    objective.n_samples = samples or PLAN_SAMPLES
    return objective


def model_objective(
    setup: Setup, horizon: int, samples: int | None = None, lam: float = 0.9
) -> tuple[Objective, ModelValue]:
    """Ĵ_MB: H-step rollouts through the run's model, Retrace over its target critics."""
    if setup.dynamics is None or setup.reward is None:
        raise UserError("this run has no model: fit one with `mbplan fit-model --checkpoint RUN`")
    if horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {horizon}")
    cfg = setup.agent.config
    value = ModelValue(
        setup.dynamics, setup.reward, setup.agent.target_critic, setup.future_policy(), horizon,
        beta=cfg.beta, gamma=cfg.gamma, lam=lam, alpha=setup.agent.alpha,
    )  # fmt: skip
    objective = make_objective(
        value, alpha=setup.agent.alpha, n_samples=samples or PLAN_SAMPLES,
        state_dim=setup.state_dim, action_dim=setup.action_dim,
    )  # fmt: skip
    return objective, value


def planner_for(setup: Setup, name: str, objective_kind: str) -> Planner:
    """The planner to act with: the run's direct policy, a fitted iterative optimizer, adam, cem."""
    if name == "direct":
        return setup.future_policy()
    if name == "iterative":
        for kind in (objective_kind, *OBJECTIVES):
            if kind in setup.optimizers:
                return setup.optimizers[kind]
        if setup.agent.config.agent == "iterative":
            return setup.agent.planner
        raise UserError(
            "no iterative optimizer in this run: train one with "
            "`mbplan fit-optimizer --checkpoint RUN --objective model`"
        )
    try:
        return make_planner(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_trust(trust: float, planner: str = "") -> float:
    """The trust-region η to plan with: rejects negative or non-finite values; 0 for ``direct``.

    The direct policy does not optimize Ĵ (it is the anchor), so the trust region cannot apply.
    """
    if not (trust >= 0 and math.isfinite(trust)):
        raise UserError(f"--trust must be a finite number >= 0, got {trust}")
    return 0.0 if planner == "direct" else trust


# -- receding-horizon control ----------------------------------------------------------------------


@dataclass
class PlanStats:
    """Per-episode outcome of :func:`run_mpc`."""

    returns: list[float]
    ms_per_action: float
    improvement: float
    steps: int
    compile_seconds: float = 0.0


def run_mpc(
    setup: Setup,
    env,
    planner: Planner,
    objective: Objective,
    episodes: int,
    iters: int | None,
    seed: int,
    init: str = "prior",
    stochastic: bool = False,
    max_steps: int | None = None,
    on_step=None,
    plans: list | None = None,
    frames: list | None = None,
    trust: float = 0.0,
    compile: bool = False,
) -> PlanStats:
    """Plan λ at every real state against ``objective``, act, repeat.

    Args:
        setup: The loaded run.
        env: A real env (actions in (−1, 1)).
        planner: Any registered planner.
        objective: Ĵ (model-based or model-free).
        episodes: Episodes to run.
        iters: Planner iterations per action (None: the planner's default).
        seed: Seeds resets and sampling noise.
        init: Where each plan starts (:data:`PLAN_INITS`): ``prior`` the planner's λ_0,
            ``previous`` the previous step's λ (λ_0 at an episode's first step), ``policy`` the
            run's amortized direct policy λ = f(s) (the planner then refines the policy's proposal).
        stochastic: Act with a sample instead of tanh(μ).
        max_steps: Cap on steps per episode.
        on_step: Called after every env step with (episode, step).
        plans: If a list, receives one record per env step: state, action, the planner's trace,
            and (model-based) the rollouts of every objective evaluation in order — one per
            iteration, then the final record-keeping evaluation(s).
        frames: If a list, receives rendered frames of the first episode.
        trust: η of a trust region around the policy's proposal: plan against
            Ĵ − η·KL(π_λ ‖ π_f(s)) (:class:`~mbplan.objective.AnchoredObjective`); 0 = none. The
            reported improvement is measured on Ĵ itself.
        compile: Run an iterative planner's plans through
            :class:`~mbplan.fast_plan.FastIterativePlan` with ``torch.compile`` (compiled before
            the first episode, untimed; ``compile_seconds`` of the result says how long it took).
            Other planners, and runs that record the rollouts (``plans``), plan as usual.
    """
    if init not in PLAN_INITS:
        raise UserError(f"unknown plan start {init!r}; choose from {', '.join(PLAN_INITS)}")
    check_trust(trust)
    generator = torch.Generator().manual_seed(seed)
    policy = setup.future_policy() if init == "policy" or trust > 0 else None
    value = objective.q_fn if isinstance(objective.q_fn, ModelValue) else None
    plan, compile_seconds = planner.plan, 0.0
    if compile and isinstance(planner, IterativePlanner) and plans is None:  # records: the loop
        plan, compile_seconds = _compiled_plan(setup, planner, objective, policy, trust)
    returns, times, improvements = [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done, t, prev = 0.0, False, 0, None
        while not done:
            state = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)  # (1, S)
            if not torch.isfinite(state).all():
                raise UserError("the env returned a non-finite state")
            # Plan (timed: the planner's own evaluations only; rollouts kept when asked)
            if value is not None and plans is not None:
                value.record = []
            start = time.perf_counter()
            target = objective
            if policy is not None:
                with torch.no_grad():
                    proposal = policy(state)  # λ = f(s), [1, A] each
                if init == "policy":
                    prev = proposal
                if trust > 0:
                    target = AnchoredObjective(objective, proposal, trust)
            result = plan(target, state, init=prev, n_iters=iters, generator=generator,
                          record_objective=False)  # fmt: skip
            dist = result.dist
            action = dist.rsample(1, generator)[0][0] if stochastic else dist.mode()
            action = action.reshape(-1).numpy()
            times.append(time.perf_counter() - start)

            # Record Ĵ(λ_I) − Ĵ(λ_0) (untimed; with the rollouts when asked)
            trace = result.trace
            with torch.no_grad():
                j0 = trace.objective[0]
                if trust > 0 or not torch.isfinite(j0).all():
                    first = TanhNormal(trace.loc[0], trace.log_scale[0])
                    j0 = objective(state, first, generator=generator).value
                j_final = objective(state, dist, generator=generator).value
            improvements.append(float((j_final - j0).mean()))
            if plans is not None:
                plans.append({
                    "episode": ep, "t": t, "state": state[0], "action": torch.as_tensor(action),
                    "trace": trace, "objective_final": j_final,
                    "rollouts": value.record if value is not None else None,
                })  # fmt: skip
            if frames is not None and ep == 0:
                frames.append(render_frame(env))
            prev = TanhNormal(dist.loc, dist.log_scale) if init == "previous" else None
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            t += 1
            done = terminated or truncated or (max_steps is not None and t >= max_steps)
            if on_step is not None:
                on_step(ep, t)
        if value is not None:
            value.record = None
        returns.append(total)
    finite = [x for x in improvements if np.isfinite(x)]
    return PlanStats(
        returns=returns,
        ms_per_action=1e3 * float(np.mean(times)),
        improvement=float(np.mean(finite)) if finite else float("nan"),
        steps=len(times),
        compile_seconds=compile_seconds,
    )


def _compiled_plan(setup: Setup, planner: IterativePlanner, objective: Objective, policy, trust):
    """(plan function, seconds to compile it): the planner's plan as one compiled function."""
    from mbplan.fast_plan import FastIterativePlan

    fast = FastIterativePlan(planner, compile=True)

    def plan(objective, states, init, n_iters, generator, record_objective=False):
        return fast.plan(objective, states, init, n_iters, generator)

    state = torch.zeros(1, setup.state_dim)  # compile for one state, with the episode's settings
    target = objective
    if trust > 0:
        with torch.no_grad():
            target = AnchoredObjective(objective, policy(state), trust)
    start = time.perf_counter()
    try:
        fast.plan(target, state, generator=torch.Generator().manual_seed(0))
    except Exception as e:  # inductor needs a working C++ compiler
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--compile failed (torch.compile needs a C++ compiler): {first}") from e
    return plan, time.perf_counter() - start


# -- fitting ---------------------------------------------------------------------------------------


def replay_transitions(path: str | Path) -> dict[str, torch.Tensor]:
    """The replay buffer of a run's newest checkpoint, oldest transition first."""
    from mbplan.checkpoint import load_checkpoint

    groups, _ = load_checkpoint(path)
    if "replay" not in groups or groups["replay"]["states"].shape[0] < 2:
        raise UserError(f"no replay buffer in {path}")
    return groups["replay"]


def fit_optimizer(
    setup: Setup,
    objective: Objective,
    states: torch.Tensor,
    steps: int,
    batch_size: int = 256,
    lr: float = 3e-4,
    n_iters: int = 5,
    seed: int = 0,
    on_step=None,
) -> tuple[IterativePlanner, list[float]]:
    """Train a fresh iterative optimizer on a frozen objective, on replay states.

    Returns:
        (the optimizer, per-step mean improvement Ĵ(λ_N) − Ĵ(λ_0)).
    """
    torch.manual_seed(seed)
    planner = IterativePlanner(setup.state_dim, setup.action_dim, n_iters=n_iters)
    generator = torch.Generator().manual_seed(seed)

    def sample_states() -> torch.Tensor:
        return states[torch.randint(0, states.shape[0], (batch_size,), generator=generator)]

    log = train_amortized(planner, objective, sample_states, steps, lr, generator, on_step=on_step)
    return planner.eval().requires_grad_(False), log.improvements


def distill_direct(
    setup: Setup,
    states: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[DirectPlanner, float]:
    """Distil a direct network from an iterative agent: minimise KL(π_iter (detached) ‖ π_direct).

    The teacher is the agent's final-iterate policy on its model-free objective, at replay states.

    Returns:
        (the network, the mean KL over the last 50 steps).
    """
    torch.manual_seed(seed)
    student = DirectPlanner(setup.state_dim, setup.action_dim, setup.agent.config.hidden)
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.Adam(student.parameters(), lr=lr)
    kls = []
    for _ in range(steps):
        idx = torch.randint(0, states.shape[0], (batch_size,), generator=generator)
        teacher = setup.agent.policy(states[idx], generator)  # detached λ_N
        kl = kl_between(teacher, student(states[idx])).mean()
        optim.zero_grad(set_to_none=True)
        kl.backward()
        optim.step()
        kls.append(kl.item())
    tail = kls[-min(50, len(kls)) :]
    return student.eval().requires_grad_(False), sum(tail) / len(tail)


# -- lean planning bundles (the shipped default is one) --------------------------------------------

DEFAULT_BUNDLE = "default"


def export_bundle(run: str | Path, out: str | Path) -> Path:
    """Copy what planning needs from a run into ``out``.

    That is the newest checkpoint's weights (no replay, no optimizer state), ``model/`` and
    ``optimizers/``: a few MB for 2×256 networks; plus the run's ``config.json`` and
    ``metrics.jsonl`` (its training history, for ``mbplan viz training``).
    """
    from mbplan.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    run, out = Path(run), Path(out)
    groups, meta = load_checkpoint(run)
    lean_meta = {k: v for k, v in meta.items() if k in ("config", "env_spec", "mbplan_version")}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, int(meta["step"]), {"weights": groups["weights"]}, lean_meta, keep=1)
    for sub in ("model", *(f"optimizers/{o}" for o in OBJECTIVES)):
        if (run / sub).exists():
            tensors, sub_meta = load_folder(run / sub)
            (out / sub).parent.mkdir(parents=True, exist_ok=True)
            save_folder(out / sub, tensors, sub_meta)
    for name in ("config.json", "metrics.jsonl"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    (out / "source.json").write_text(json.dumps({"run": str(run), "checkpoint":
                                                 find_checkpoint(run).name}, indent=1))  # fmt: skip
    return out


def default_bundle() -> Path:
    """The bundled default checkpoint shipped inside the package.

    Raises:
        UserError: This build ships none.
    """
    from importlib.resources import files

    path = Path(str(files("mbplan") / "data" / DEFAULT_BUNDLE))
    if not (path / "latest").is_file():
        raise UserError("no bundled default checkpoint in this version: pass --checkpoint RUN")
    return path
