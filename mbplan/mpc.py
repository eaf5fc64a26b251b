"""Model-predictive control against a trained run: setup, objectives, planner choice, the loop.

:func:`load_setup` loads what planning needs from a run folder (or the bundled default);
:func:`model_objective` builds Ĵ_MB (H-step rollouts through the learned model, Retrace over the
target critics, DESIGN.md §6); :func:`planner_for` picks the planner; :class:`MPC` plans λ at a real
state and acts (``act``), and runs whole episodes (``run``) — ``mbplan plan``.

Shapes: B states (1 when acting) · K samples · A action dims · S state dims.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mbplan import fast
from mbplan.agent import Agent
from mbplan.checkpoint import (
    OBJECTIVES,
    has_folder,
    load_agent,
    load_model_folder,
    load_optimizer_folder,
    model_fit_horizon,
    read_evals,
)
from mbplan.distributions import TanhNormal
from mbplan.envs import render_frame
from mbplan.errors import UserError
from mbplan.fast.fast_plan import FastIterativePlan
from mbplan.model_value import ModelValue
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import PROPAGATIONS
from mbplan.objective import AnchoredObjective, Objective, make_objective
from mbplan.options import option
from mbplan.planners import (
    DirectPlanner,
    IterativePlanner,
    MPPIPlanner,
    Planner,
    PlanResult,
    make_planner,
    shift_sequence,
)

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
        evals: The run's evaluation lines of ``metrics.jsonl`` (its policy's returns), oldest
            first.
        model_horizon: The horizon the model was checked for: ``fit-model --horizon`` of a fitted
            model folder (its held-out open-loop errors), else the rollout horizon of a
            ``--value model`` run; None when not recorded.
    """

    agent: Agent
    config: dict[str, Any]
    dynamics: Dynamics | None = None
    reward: Reward | None = None
    optimizers: dict[str, IterativePlanner] = field(default_factory=dict)
    distilled: DirectPlanner | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    model_horizon: int | None = None

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


def load_setup(path: str | Path) -> Setup:
    """Load a run folder's agent, and its model and fitted optimizers where present."""
    run = Path(path)
    agent, config = load_agent(run)
    agent.eval()
    setup = Setup(agent, config)
    S, A = setup.state_dim, setup.action_dim
    if agent.dynamics is not None:  # trained with --value model: the agent's own models
        setup.dynamics, setup.reward = agent.dynamics, agent.reward
        setup.model_horizon = agent.config.horizon
    if has_folder(run / "model"):  # fitted afterwards: preferred
        dynamics, reward, setup.distilled = load_model_folder(run / "model", S, A)
        setup.dynamics, setup.reward = dynamics.eval(), reward.eval()
        setup.model_horizon = model_fit_horizon(run / "model")
    for objective in OBJECTIVES:
        folder = run / "optimizers" / objective
        if folder.exists():
            setup.optimizers[objective] = load_optimizer_folder(folder, S, A).eval()
    setup.evals = read_evals(run / "metrics.jsonl")
    modules = [setup.agent, setup.dynamics, setup.reward, setup.distilled]
    for module in [*modules, *setup.optimizers.values()]:
        if module is not None:
            module.requires_grad_(False)
    return setup


# -- objectives and planners ---------------------------------------------------------------------


#: Samples K per state of the planning objectives unless a command says otherwise (DESIGN.md
#: §2). Not the run's own K: an agent trained with SAC's K = 1 would otherwise plan on one-sample
#: estimates.
PLAN_SAMPLES = 10
#: Where :class:`MPC` starts each plan (see :class:`PlanSettings`).
PLAN_INITS = ("prior", "previous", "policy")
#: Where ``mbplan plan`` starts each plan by default: the amortized policy's proposal, refined.
DEFAULT_INIT = "policy"
#: η of the trust region around the policy's proposal that ``mbplan plan`` uses by default: on the
#: bundled default it keeps the gains of planning at H = 5 and removes the episodes in which the
#: planner flips the cheetah (docs/results.md, "Planning results on the default").
DEFAULT_TRUST = 1.0
INIT_HELP = (
    "where each plan starts: policy = the run's direct policy λ = f(s) (the planner refines it), "
    "prior = the planner's fixed λ_0, previous = the previous step's λ"
)


def init_option() -> str:
    """The ``--init`` field of every command that plans with :class:`MPC`."""
    return option(DEFAULT_INIT, INIT_HELP, choices=PLAN_INITS)


def trust_option() -> float:
    """The ``--trust`` field of every command that plans with :class:`MPC`."""
    return option(
        DEFAULT_TRUST,
        "η of a trust region: plan against Ĵ − η·KL(π_λ ‖ π_policy), keeping plans near the "
        "direct policy's proposal (0 = none; direct ignores it)",
    )


#: How Ĵ_MB rolls out an ensemble model unless a command says otherwise (:data:`PROPAGATIONS`;
#: chosen by measurement: docs/results.md, "Planning under model uncertainty").
DEFAULT_PROPAGATION = "fixed"
#: The ensemble's pessimism κ unless a command says otherwise (measured with the propagation).
DEFAULT_KAPPA = 0.0


def propagation_option() -> str:
    """The ``--propagation`` field of the commands that plan on Ĵ_MB."""
    return option(
        DEFAULT_PROPAGATION,
        "ensemble models: fixed = sample k follows member k mod E for its whole rollout (TS-∞), "
        "mean = the members' mean",
        choices=PROPAGATIONS,
    )


def kappa_option() -> float:
    """The ``--kappa`` field of the commands that plan on Ĵ_MB."""
    return option(
        DEFAULT_KAPPA,
        "ensemble models: pessimism κ, each model step's reward becomes r̂ − κ·u with u the "
        "members' disagreement on the next state (MOPO-style; 0 = off)",
    )


def check_kappa(kappa: float) -> float:
    """κ: finite and >= 0."""
    if not (math.isfinite(kappa) and kappa >= 0):
        raise UserError(f"--kappa must be a finite number >= 0, got {kappa}")
    return kappa


def compile_option() -> bool:
    """The ``--compile`` field of the commands that plan with the iterative optimizer."""
    return option(
        False,
        "iterative planner: run each plan as one torch.compile'd function (~2× lower latency; "
        "compiled before the first episode, 1–3 min the first time, less once inductor's disk "
        "cache has it; needs a C++ compiler)",
    )


def model_free_objective(setup: Setup, samples: int | None = None) -> Objective:
    """Ĵ on the run's pessimistic target critics (its training objective), K = ``samples``."""
    objective = setup.agent.objective()
    objective.n_samples = samples or PLAN_SAMPLES
    return objective


def model_objective(
    setup: Setup,
    horizon: int,
    samples: int | None = None,
    lam: float = 0.9,
    propagation: str = DEFAULT_PROPAGATION,
    kappa: float = DEFAULT_KAPPA,
) -> tuple[Objective, ModelValue]:
    """Ĵ_MB: H-step rollouts through the run's model, Retrace over its target critics.

    ``propagation`` and ``kappa`` apply to an ensemble model (see
    :class:`~mbplan.model_value.ModelValue`); a single model ignores them.
    """
    if setup.dynamics is None or setup.reward is None:
        raise UserError("this run has no model: fit one with `mbplan fit-model --checkpoint RUN`")
    if horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {horizon}")
    cfg = setup.agent.config
    value = ModelValue(
        setup.dynamics,
        setup.reward,
        setup.agent.target_critic,
        setup.future_policy(),
        horizon,
        beta=cfg.beta,
        gamma=cfg.gamma,
        lam=lam,
        alpha=setup.agent.alpha,
        propagation=propagation,
        kappa=kappa,
    )
    objective = make_objective(
        value,
        alpha=setup.agent.alpha,
        n_samples=samples or PLAN_SAMPLES,
        state_dim=setup.state_dim,
        action_dim=setup.action_dim,
    )
    return objective, value


def planner_for(setup: Setup, name: str, objective_kind: str, **hyperparameters: Any) -> Planner:
    """The planner to act with: the direct policy, a fitted iterative optimizer, adam, cem, mppi.

    ``hyperparameters`` go to the last three (e.g. ``policy_samples`` of mppi).
    """
    if name == "direct":
        return setup.future_policy()
    if name == "iterative":
        for kind in (objective_kind, *OBJECTIVES):
            if kind in setup.optimizers:
                if kind != objective_kind:
                    warnings.warn(
                        f"no iterative optimizer fitted on the {objective_kind} objective in this "
                        f"run: planning with the one fitted on the {kind} objective (zero-shot)",
                        stacklevel=2,
                    )
                return setup.optimizers[kind]
        if setup.agent.config.agent == "iterative":
            trained_on = setup.agent.config.value
            if objective_kind != trained_on:
                warnings.warn(
                    f"no iterative optimizer fitted on the {objective_kind} objective in this "
                    f"run: planning with the agent's own, trained on the {trained_on} objective "
                    "(zero-shot)",
                    stacklevel=2,
                )
            return setup.agent.planner
        raise UserError(
            "no iterative optimizer in this run: train one with "
            "`mbplan fit-optimizer --checkpoint RUN --objective model`"
        )
    try:
        return make_planner(name, **hyperparameters)
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


@dataclass(frozen=True)
class PlanSettings:
    """How :class:`MPC` plans at each real state (settings as data; the caller owns the budget).

    Attributes:
        iters: Planner iterations per action (None: the planner's default, iterative 5).
        init: Where each plan starts (:data:`PLAN_INITS`): ``prior`` the planner's λ_0,
            ``previous`` the previous step's λ (λ_0 at an episode's first step), ``policy`` the
            run's amortized direct policy λ = f(s) (the planner then refines its proposal).
        trust: η of a trust region around the policy's proposal: plan against
            Ĵ − η·KL(π_λ ‖ π_f(s)) (:class:`~mbplan.objective.AnchoredObjective`); 0 = none. The
            reported improvement is measured on Ĵ itself.
        stochastic: Act with a sample instead of tanh(μ).
        compile: Compile the iterative planner's plan with ``torch.compile`` (before the first
            episode, untimed). Without it, an iterative planner on Ĵ_MB still plans through
            :class:`~mbplan.fast.fast_plan.FastIterativePlan` (one function, uncompiled). Other
            planners, runs that record the rollouts, and ``MBPLAN_FAST=0`` take the planner's
            own loop.
    """

    iters: int | None = None
    init: str = DEFAULT_INIT
    trust: float = DEFAULT_TRUST
    stochastic: bool = False
    compile: bool = False


@dataclass
class PlanStats:
    """Per-run outcome of :meth:`MPC.run`."""

    returns: list[float]
    ms_per_action: float
    improvement: float
    steps: int
    compile_seconds: float = 0.0


class MPC:
    """Plans λ at every real state against ``objective`` and acts with it.

    Args:
        setup: The loaded run (its direct policy anchors ``init="policy"`` and the trust region).
        planner: Any registered planner.
        objective: Ĵ (model-based or model-free).
        settings: :class:`PlanSettings`.
        seed: Seeds the sampling noise (and, in :meth:`run`, the env resets).
    """

    def __init__(
        self,
        setup: Setup,
        planner: Planner,
        objective: Objective,
        settings: PlanSettings | None = None,
        seed: int = 0,
    ):
        settings = settings or PlanSettings()
        if settings.init not in PLAN_INITS:
            raise UserError(
                f"unknown plan start {settings.init!r}; choose from {', '.join(PLAN_INITS)}"
            )
        check_trust(settings.trust)
        if settings.iters is not None and settings.iters < 1:
            raise UserError(f"--iters must be >= 1, got {settings.iters}")
        self.setup, self.planner, self.objective = setup, planner, objective
        self.settings, self.seed = settings, seed
        self.generator = torch.Generator().manual_seed(seed)
        need_policy = settings.init == "policy" or settings.trust > 0
        self.policy = setup.future_policy() if need_policy else None
        self.value = objective.q_fn if isinstance(objective.q_fn, ModelValue) else None
        self.compile_seconds = 0.0
        # The iterative plan as one function (its planner loop's fast twin); compiled by compile()
        iterative = isinstance(planner, IterativePlanner)
        self._fast = FastIterativePlan(planner) if iterative else None
        self._prev: TanhNormal | None = None
        # Sequence planners (mppi): the previous plan's mean sequence, shifted by one step
        self._warm: Tensor | None = None
        if isinstance(planner, MPPIPlanner) and self.value is not None:
            fitted = setup.model_horizon
            if fitted is not None and self.value.horizon > fitted:
                warnings.warn(
                    f"mppi plans open-loop over H = {self.value.horizon} model steps, longer than "
                    f"the {fitted} steps the model was checked for at fit time: its predictions "
                    "past that are unchecked",
                    stacklevel=2,
                )

    def reset(self) -> None:
        """Forget the previous step's λ and sequence (call at the start of an episode)."""
        self._prev = None
        self._warm = None

    def act(self, state: Tensor) -> tuple[np.ndarray, PlanResult]:
        """Plan at one real state [S] (or [1, S]) and return (action in (−1, 1)^A, the plan)."""
        cfg = self.settings
        state = torch.as_tensor(state, dtype=torch.float32).reshape(1, -1)  # (1, S)
        if not torch.isfinite(state).all():
            raise UserError("the env returned a non-finite state")
        target, init = self.objective, self._prev
        if self.policy is not None:
            with torch.no_grad():
                proposal = self.policy(state)  # λ = f(s), [1, A] each
            if cfg.init == "policy":
                init = proposal
            if cfg.trust > 0:
                target = AnchoredObjective(self.objective, proposal, cfg.trust)
        # Sequence planners (mppi): steps 1… start at the shifted previous mean sequence, and with
        # init="previous" step 0 too (its second step); init="prior" starts afresh
        extra = {}
        if self._warm is not None and cfg.init != "prior":
            extra["warm"] = self._warm
            init = None if cfg.init == "previous" else init
        recording = self.value is not None and self.value.record is not None
        if self._fast is not None and not recording and fast.enabled():
            result = self._fast.plan(target, state, init, cfg.iters, self.generator)
        else:
            result = self.planner.plan(
                target, state, init, cfg.iters, self.generator, record_objective=False, **extra
            )
        self._warm = None if result.warm is None else shift_sequence(result.warm)
        dist = result.dist
        action = dist.rsample(1, self.generator)[0][0] if cfg.stochastic else dist.mode()
        self._prev = TanhNormal(dist.loc, dist.log_scale) if cfg.init == "previous" else None
        return action.reshape(-1).numpy(), result

    @torch.no_grad()
    def improvement(self, state: Tensor, result: PlanResult) -> tuple[float, Tensor]:
        """(mean Ĵ(λ_I) − Ĵ(λ_0) on Ĵ itself, Ĵ(λ_I) [1]) of a plan made at ``state``."""
        state = torch.as_tensor(state, dtype=torch.float32).reshape(1, -1)  # (1, S)
        trace, objective, g = result.trace, self.objective, self.generator
        j0 = trace.objective[0]
        if self.settings.trust > 0 or not torch.isfinite(j0).all():
            first = TanhNormal(trace.loc[0], trace.log_scale[0])
            j0 = objective(state, first, generator=g).value
        j_final = objective(state, result.dist, generator=g).value
        return float((j_final - j0).mean()), j_final

    def compile(self) -> float:
        """Compile an iterative planner's plan for one state (untimed); returns the seconds taken.

        Does nothing (0 s) for other planners, with ``compile=False`` or with ``MBPLAN_FAST=0``.
        """
        cfg = self.settings
        if not (cfg.compile and isinstance(self.planner, IterativePlanner) and fast.enabled()):
            return 0.0
        if self._fast is not None and self._fast.compile:
            return self.compile_seconds
        compiled = FastIterativePlan(self.planner, compile=True)
        state = torch.zeros(1, self.setup.state_dim)  # compile with the episode's settings
        target = self.objective
        if cfg.trust > 0:
            with torch.no_grad():
                target = AnchoredObjective(self.objective, self.policy(state), cfg.trust)
        start = time.perf_counter()
        try:
            compiled.plan(target, state, generator=torch.Generator().manual_seed(0))
        except Exception as e:  # inductor needs a working C++ compiler
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f"--compile failed (torch.compile needs a C++ compiler): {first}"
            raise UserError(why) from e
        self._fast = compiled
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def run(
        self,
        env,
        episodes: int,
        max_steps: int | None = None,
        on_step=None,
        plans: list | None = None,
        frames: list | None = None,
    ) -> PlanStats:
        """Plan, act, repeat for whole episodes of a real env (actions in (−1, 1)).

        Args:
            env: The real env.
            episodes: Episodes to run (reset with seeds ``seed``, ``seed + 1``, …).
            max_steps: Cap on steps per episode.
            on_step: Called after every env step with (episode, step).
            plans: If a list, receives one record per env step: state, action, the planner's trace,
                and (model-based) the rollouts of every objective evaluation in order — one per
                iteration, then the final record-keeping evaluation(s). Plans then run uncompiled.
            frames: If a list, receives rendered frames of the first episode.
        """
        if plans is None:
            self.compile()
        returns, times, improvements = [], [], []
        for ep in range(episodes):
            obs, _ = env.reset(seed=self.seed + ep)
            self.reset()
            total, done, t = 0.0, False, 0
            while not done:
                state = torch.as_tensor(obs, dtype=torch.float32)  # (S,)
                # Plan and act (timed: the planner's own evaluations; rollouts kept when asked)
                if self.value is not None and plans is not None:
                    self.value.record = []
                start = time.perf_counter()
                action, result = self.act(state)
                times.append(time.perf_counter() - start)

                # Record Ĵ(λ_I) − Ĵ(λ_0) (untimed; with the rollouts when asked)
                gain, j_final = self.improvement(state, result)
                improvements.append(gain)
                if plans is not None:
                    plans.append(
                        {
                            "episode": ep,
                            "t": t,
                            "state": state,
                            "action": torch.as_tensor(action),
                            "trace": result.trace,
                            "objective_final": j_final,
                            "rollouts": self.value.record if self.value is not None else None,
                        }
                    )
                if frames is not None and ep == 0:
                    frames.append(render_frame(env))
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                t += 1
                done = terminated or truncated or (max_steps is not None and t >= max_steps)
                if on_step is not None:
                    on_step(ep, t)
            if self.value is not None:
                self.value.record = None
            returns.append(total)
        finite = [x for x in improvements if np.isfinite(x)]
        return PlanStats(
            returns=returns,
            ms_per_action=1e3 * float(np.mean(times)),
            improvement=float(np.mean(finite)) if finite else float("nan"),
            steps=len(times),
            compile_seconds=self.compile_seconds,
        )
