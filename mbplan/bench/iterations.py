"""``mbplan bench iterations``: returns with extra test-time iterations (Fig. 15, 16).

Four contenders act in the real env by planning λ at every state against the same objective
(Marino et al., NeurIPS 2021, App. C): (a) the direct policy; (b) direct + extra Adam iterations
warm-started from the direct λ; (c) the iterative optimizer with its N iterations; (d) the
iterative optimizer with N + extra iterations. Same seeds and episodes for all.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.envs import check_env_matches, env_spec, make_env
from mbplan.errors import UserError
from mbplan.mpc import MPC, PlanSettings, planner_for
from mbplan.objective import Objective
from mbplan.options import option
from mbplan.planners import Planner, PlanResult, make_planner
from mbplan.report import (
    OBJECTIVE_KINDS,
    CommonOptions,
    format_table,
    load,
    new_figure,
    objective_for,
    out_path,
    save_figure,
    write_csv,
)

COLUMNS = ("contender", "episode", "return")
STEM = "bench-iterations"


@dataclass
class IterationsOptions(CommonOptions):
    """Options of ``mbplan bench iterations``."""

    objective: str = option("model-free", "objective Ĵ planned against", choices=OBJECTIVE_KINDS)
    horizon: int = option(5, "model rollout horizon H (with --objective model)")
    episodes: int = option(3, "episodes per contender (reset seeds seed, seed+1, ...)")
    max_steps: int = option(1000, "cap on steps per episode")
    extra_adam: int = option(50, "Adam iterations after the direct λ (contender b)")
    adam_lr: float = option(1e-2, "step size of those Adam iterations")
    extra_iters: int = option(5, "iterations beyond the optimizer's N (contender d)")


@dataclass(frozen=True)
class WarmStarted:
    """A planner that runs ``first`` and continues with ``then`` from its λ (e.g. direct → adam).

    ``plan`` has the signature of :meth:`mbplan.planners.Planner.plan`; ``n_iters`` is the
    number of ``then`` iterations. The trace is ``then``'s (λ_0 is ``first``'s λ), with its
    times shifted by the time ``first`` took.

    Attributes:
        first: Gives the starting λ (called with its default iterations).
        then: Improves it.
    """

    first: Planner
    then: Planner

    name: ClassVar[str] = "warm-started"

    def plan(
        self,
        objective: Objective,
        states: Tensor,
        init: TanhNormal | None = None,
        n_iters: int | None = None,
        generator: torch.Generator | None = None,
        *,
        differentiable: bool = False,
        record_objective: bool = True,
    ) -> PlanResult:
        """``first`` from ``init`` (if it uses one), then ``n_iters`` of ``then`` from its λ."""
        start = self.first.plan(
            objective, states, init=init, generator=generator, record_objective=False
        )
        result = self.then.plan(
            objective,
            states,
            init=start.dist,
            n_iters=n_iters,
            generator=generator,
            differentiable=differentiable,
            record_objective=record_objective,
        )
        result.trace.elapsed += start.trace.elapsed[-1]
        return result


@dataclass
class Contender:
    """One way of acting: a planner and its iterations per action."""

    name: str
    planner: Planner | WarmStarted
    iters: int


def contenders(setup, opts: IterationsOptions) -> list[Contender]:
    """(a) direct, (b) direct + Adam, (c) iterative N, (d) iterative N + extra."""
    direct = planner_for(setup, "direct", opts.objective)
    iterative = planner_for(setup, "iterative", opts.objective)
    n = int(iterative.default_iters)
    adam = WarmStarted(direct, make_planner("adam", lr=opts.adam_lr))
    return [
        Contender("direct", direct, 1),
        Contender(f"direct + {opts.extra_adam} adam", adam, opts.extra_adam),
        Contender(f"iterative N={n}", iterative, n),
        Contender(f"iterative N={n}+{opts.extra_iters}", iterative, n + opts.extra_iters),
    ]


def plot(returns: dict[str, list[float]], title: str):
    """Bar chart of mean return ± std per contender, episodes as points."""
    fig, axes = new_figure(1, 1, size=(7.0, 4.4))
    ax = axes[0][0]
    names = list(returns)
    means = [statistics.fmean(returns[n]) for n in names]
    stds = [statistics.pstdev(returns[n]) for n in names]
    x = list(range(len(names)))
    ax.bar(x, means, yerr=stds, capsize=6, color=[f"C{i}" for i in x], alpha=0.75)
    for i, n in enumerate(names):
        ax.plot([i + 0.25] * len(returns[n]), returns[n], "o", color="k", ms=4)
    ax.set_xticks(x, names)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylabel("episode return (sum of env rewards)")
    ax.set_title(
        "bars: mean ± std over episodes; dots (right of each bar): episodes", fontsize="medium"
    )
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return fig


def run(opts: IterationsOptions) -> None:
    """Handler of ``mbplan bench iterations``: prints the table, writes the CSV and the figure."""
    if min(opts.episodes, opts.max_steps, opts.horizon, opts.extra_adam, opts.extra_iters) < 1:
        raise UserError(
            "--episodes, --max-steps, --horizon, --extra-adam, --extra-iters must be >= 1"
        )
    setup = load(opts)
    objective = objective_for(setup, opts.objective, opts.horizon)
    env = make_env(setup.config["env"], seed=opts.seed)
    check_env_matches(env_spec(env), setup.config["env_spec"])
    rows, returns = [], {}
    for c in contenders(setup, opts):
        mpc = MPC(setup, c.planner, objective, PlanSettings(c.iters, "prior", 0.0), opts.seed)
        stats = mpc.run(env, opts.episodes, opts.max_steps)
        returns[c.name] = stats.returns
        rows.append(
            {
                "contender": c.name,
                "iters": c.iters,
                "return_mean": statistics.fmean(stats.returns),
                "return_std": statistics.pstdev(stats.returns),
                "ms/action": stats.ms_per_action,
                "J_gain": stats.improvement,
            }
        )
    env.close()

    horizon = f", H={opts.horizon}" if opts.objective == "model" else ""
    print(
        f"test-time iterations on {setup.config['env']}: objective {opts.objective}{horizon}, "
        f"{opts.episodes} episodes of ≤ {opts.max_steps} steps, seed {opts.seed}; "
        "J_gain = mean over actions of Ĵ(final λ) − Ĵ(start λ) (start: λ_0 = (μ=0, σ=0.5); "
        "for direct + adam: the direct λ)"
    )
    print(format_table(rows))
    data = [
        {"contender": name, "episode": i, "return": r}
        for name, rs in returns.items()
        for i, r in enumerate(rs)
    ]
    csv = write_csv(out_path(opts, STEM, ".csv"), data, COLUMNS)
    title = (
        f"{setup.config['env']}: acting against the {opts.objective} objective{horizon}, "
        f"{opts.episodes} episodes of ≤ {opts.max_steps} steps"
    )
    figures = save_figure(plot(returns, title), opts, STEM)
    print(f"wrote {csv} and {', '.join(map(str, figures))}")


COMMAND = (
    "iterations",
    "returns of direct, direct + Adam, iterative N and N + extra iterations (Fig. 15, 16)",
    IterationsOptions,
    run,
)
