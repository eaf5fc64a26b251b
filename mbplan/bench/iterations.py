"""``mbplan bench iterations``: returns with extra test-time iterations (Fig. 15, 16).

Four contenders act in the real env by planning λ at every state against the same objective
(Marino et al., NeurIPS 2021, App. C): (a) the direct policy; (b) direct + extra Adam iterations
warm-started from the direct λ; (c) the iterative optimizer with its N iterations; (d) the
iterative optimizer with N + extra iterations. Same seeds and episodes for all: episode e of
every contender resets the env with seed + e and seeds its sampling noise with seed + e, so an
episode's outcome does not depend on the episodes run before it.

The run is long (``--episodes`` 10 × 1000 steps per contender; direct + 50 Adam iterations cost
0.04–0.1 s per action on one thread), so it resumes: every finished episode of every contender is
added to ``<out>/bench-iterations-episodes.json`` (rewritten atomically), and a rerun with the
same settings on the same weights skips the episodes found there (more ``--episodes`` extends
the run). A file made with other settings or weights is started afresh. The report gives the
mean ± population SD of the return over the episodes of each contender.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan import fast
from mbplan.distributions import TanhNormal
from mbplan.envs import check_env_matches, env_spec, make_env
from mbplan.errors import UserError
from mbplan.mpc import MPC, PlanSettings, Setup, planner_for
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
    write_json,
)

COLUMNS = ("contender", "episode", "return", "steps", "ms_per_action", "J_gain")
STEM = "bench-iterations"
#: Finished episodes of every contender, kept for a rerun: ``<out>/<STEM><EPISODES_SUFFIX>``.
EPISODES_SUFFIX = "-episodes.json"


@dataclass
class IterationsOptions(CommonOptions):
    """Options of ``mbplan bench iterations``."""

    objective: str = option("model-free", "objective Ĵ planned against", choices=OBJECTIVE_KINDS)
    horizon: int = option(5, "model rollout horizon H (with --objective model)")
    episodes: int = option(
        10,
        "episodes per contender (episode e: reset and noise seeded seed + e); finished ones are "
        f"kept in <out>/{STEM}{EPISODES_SUFFIX} and skipped on a rerun",
    )
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


def weights_digest(setup: Setup) -> str:
    """A short hash of every weight of the run: the agent, its model and fitted optimizers."""
    modules = [setup.agent, setup.dynamics, setup.reward, setup.distilled]
    modules += [setup.optimizers[k] for k in sorted(setup.optimizers)]
    digest = hashlib.sha256()
    for module in filter(None, modules):
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def settings_of(setup: Setup, opts: IterationsOptions) -> dict[str, Any]:
    """What an episode's outcome depends on besides its index (stored with the episodes).

    On Ĵ_MB the iterative contenders plan through ``FastIterativePlan`` unless ``MBPLAN_FAST=0``
    (the loop): same plans to rounding, but rounding changes episodes, so the path is recorded.
    """
    settings = {
        "env": setup.config["env"],
        "weights": weights_digest(setup),
        "objective": opts.objective,
        "horizon": opts.horizon if opts.objective == "model" else None,
        "max_steps": opts.max_steps,
        "extra_adam": opts.extra_adam,
        "adam_lr": opts.adam_lr,
        "extra_iters": opts.extra_iters,
        "seed": opts.seed,
    }
    if opts.objective == "model":
        settings["iterative_plan"] = "one function" if fast.enabled() else "loop"
    return settings


def load_finished(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int], dict]:
    """Finished episodes stored at ``path`` by (contender, episode); none if made otherwise.

    Raises:
        UserError: The file exists but is not a readable episodes file.
    """
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        rows, same = stored["episodes"], stored["settings"] == settings
        return {(r["contender"], int(r["episode"])): r for r in rows} if same else {}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not an episodes file ({exc}): move it away") from None


def save_finished(path: Path, settings: dict[str, Any], finished: dict[tuple[str, int], dict]):
    """Write every finished episode to ``path`` (atomically)."""
    write_json(path, {"settings": settings, "episodes": list(finished.values())})


def run_episode(
    setup: Setup, c: Contender, objective: Objective, env, episode: int, opts: IterationsOptions
) -> dict:
    """Episode ``episode`` of contender ``c``: one row with the columns of :data:`COLUMNS`."""
    settings = PlanSettings(c.iters, "prior", 0.0)
    mpc = MPC(setup, c.planner, objective, settings, opts.seed + episode)
    stats = mpc.run(env, 1, opts.max_steps)  # resets with mpc's seed + 0
    return {
        "contender": c.name,
        "episode": episode,
        "return": stats.returns[0],
        "steps": stats.steps,
        "ms_per_action": stats.ms_per_action,
        "J_gain": stats.improvement,
    }


def summarize(c: Contender, rows: list[dict]) -> dict:
    """Mean ± population SD of the return over one contender's episodes; per-action means."""
    returns = [r["return"] for r in rows]
    steps = sum(r["steps"] for r in rows)
    gains = [r for r in rows if math.isfinite(r["J_gain"])]  # NaN: no finite gain recorded
    gain_steps = sum(r["steps"] for r in gains)
    gain = sum(r["J_gain"] * r["steps"] for r in gains) / gain_steps if gain_steps else math.nan
    return {
        "contender": c.name,
        "iters": c.iters,
        "episodes": len(rows),
        "return_mean": statistics.fmean(returns),
        "return_sd": statistics.pstdev(returns),
        "ms/action": sum(r["ms_per_action"] * r["steps"] for r in rows) / steps,
        "J_gain": gain,
    }


def plot(returns: dict[str, list[float]], title: str):
    """Bar chart of mean return ± population SD over episodes per contender, episodes as points."""
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
    n_episodes = len(returns[names[0]]) if names else 0
    ax.set_title(
        f"bars: mean ± SD over the {n_episodes} episodes; dots (right of each bar): episodes",
        fontsize="medium",
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
    arms = contenders(setup, opts)
    horizon = f", H={opts.horizon}" if opts.objective == "model" else ""
    store = out_path(opts, STEM, EPISODES_SUFFIX)
    settings = settings_of(setup, opts)
    finished = load_finished(store, settings)
    if store.exists() and not finished:
        print(f"{store} was made with other settings or weights: starting afresh")
    todo = [(e, c) for e in range(opts.episodes) for c in arms if (c.name, e) not in finished]
    print(
        f"test-time iterations on {setup.config['env']}: objective {opts.objective}{horizon}, "
        f"{opts.episodes} episodes of ≤ {opts.max_steps} steps per contender (episode e: reset "
        f"and noise seeded {opts.seed} + e); {len(arms) * opts.episodes - len(todo)} of "
        f"{len(arms) * opts.episodes} episodes already finished in {store}",
        flush=True,
    )

    # Run the missing episodes, saving each as it finishes
    for episode, c in todo:
        row = run_episode(setup, c, objective, env, episode, opts)
        finished[c.name, episode] = row
        save_finished(store, settings, finished)
        print(
            f"  {c.name}, episode {episode + 1}/{opts.episodes}: return {row['return']:.1f} "
            f"({row['steps']} steps, {row['ms_per_action']:.3g} ms/action)",
            flush=True,
        )
    env.close()

    per_arm = {c.name: [finished[c.name, e] for e in range(opts.episodes)] for c in arms}
    print(
        f"return_mean ± return_sd: mean and population SD over the {opts.episodes} episodes of "
        "each contender; J_gain = mean over actions of Ĵ(final λ) − Ĵ(start λ) (start: "
        "λ_0 = (μ=0, σ=0.5); for direct + adam: the direct λ)"
    )
    print(format_table([summarize(c, per_arm[c.name]) for c in arms]))
    data = [r for rows in per_arm.values() for r in rows]
    csv = write_csv(out_path(opts, STEM, ".csv"), data, COLUMNS)
    returns = {name: [r["return"] for r in rows] for name, rows in per_arm.items()}
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
