"""Policy modes: do independent runs of the iterative optimizer land on the same λ? (Fig. 2, 18).

At each of ``--states`` on-policy states (spread over ``--state-episodes`` episodes of the direct
policy, or of the agent itself for an iterative run without one; see
:func:`mbplan.report.on_policy_states`) the run's iterative optimizer is run twice from the same
λ_0 = (μ = 0, σ = 0.5), with different sampling noise (generators seeded ``seed + 1`` and
``seed + 2``). The L2 distance between the two final policy means, ‖tanh(μ_a) − tanh(μ_b)‖ (in
action space) and ‖μ_a − μ_b‖ (pre-tanh), measures how often noise alone sends the optimizer to a
different mode of Ĵ. Each final λ is also scored on Ĵ with one fixed draw of ``--eval-samples``
samples per state (the same draw for both runs), so that separate estimates can be told apart:
two high-value modes score alike, while an optimizer that was sent astray by its noise scores
lower than its twin. The summary splits the states at ``--separate`` (L2 between the final mean
actions) and gives |Ĵ_a − Ĵ_b| for each group. At one state (``--state-index``) it is run
``--runs`` times (run r with generator ``seed + 1 + r``) and samples of each final policy are
drawn over two action dims.

Shapes: N states · S state dims · A action dims · R runs · M samples per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mbplan.bench.gap import evaluate
from mbplan.distributions import TanhNormal
from mbplan.errors import UserError
from mbplan.mpc import planner_for
from mbplan.objective import Objective
from mbplan.options import option
from mbplan.planners import Planner
from mbplan.report import (
    OBJECTIVE_KINDS,
    StateOptions,
    format_table,
    load,
    new_figure,
    objective_for,
    on_policy_states,
    out_path,
    save_figure,
    states_text,
    write_csv,
)

COLUMNS = ("state", "l2_mean_action", "l2_loc", "objective_a", "objective_b")


@dataclass
class ModesOptions(StateOptions):
    """Options of ``mbplan bench modes``."""

    objective: str = option("model-free", "objective Ĵ optimized", choices=OBJECTIVE_KINDS)
    states: int = option(100, "on-policy states for the pairwise distances")
    state_index: int = option(0, "state whose repeated runs are drawn")
    runs: int = option(10, "repeated runs at --state-index")
    dims: list[int] = option(None, "two action dims to draw", default_factory=lambda: [0, 1])
    action_samples: int = option(200, "action samples drawn per run at --state-index")
    iters: int = option(0, "optimizer iterations (0 = its own N)")
    samples: int = option(0, "samples K per state in Ĵ (0 = 10)")
    horizon: int = option(2, "model rollout horizon H (--objective model)")
    eval_samples: int = option(100, "samples per state of the fixed draw scoring each final λ on Ĵ")
    separate: float = option(
        0.5, "L2 between two runs' final mean actions above which they count as separate estimates"
    )


def plan_final(
    planner: Planner, objective: Objective, states: torch.Tensor, iters: int | None, seed: int
) -> TanhNormal:
    """The optimizer's final λ_I from the default λ_0, noise from a generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return planner.plan(
        objective, states, n_iters=iters, generator=generator, record_objective=False
    ).dist


def pairwise_runs(
    planner: Planner, objective: Objective, states: torch.Tensor, iters: int | None, seed: int
) -> tuple[TanhNormal, TanhNormal]:
    """Two independent runs' final λ at every state (noise seeded ``seed + 1``, ``seed + 2``)."""
    return tuple(plan_final(planner, objective, states, iters, seed + r) for r in (1, 2))


def pairwise_distances(a: TanhNormal, b: TanhNormal) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distances between two runs' final means, in action and pre-tanh space.

    Returns:
        (‖tanh μ_a − tanh μ_b‖ [N], ‖μ_a − μ_b‖ [N]).
    """
    return (a.mode() - b.mode()).norm(dim=-1), (a.loc - b.loc).norm(dim=-1)


def repeated_runs(
    planner: Planner,
    objective: Objective,
    state: torch.Tensor,
    runs: int,
    n_samples: int,
    iters: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the optimizer ``runs`` times at one state [S] and sample each final policy.

    Returns:
        (action samples [R, M, A], final means tanh μ [R, A]).
    """
    samples, means = [], []
    for r in range(runs):
        dist = plan_final(planner, objective, state.unsqueeze(0), iters, seed + 1 + r)
        generator = torch.Generator().manual_seed(seed + 1 + r)
        actions, _ = dist.rsample(n_samples, generator)  # (M, 1, A)
        samples.append(actions[:, 0])
        means.append(dist.mode()[0])
    return torch.stack(samples), torch.stack(means)


def _check(opts: ModesOptions, action_dim: int, explicit: set[str]) -> list[int]:
    """Validate the options against A; returns the dims to draw (one when A = 1 by default)."""
    if min(opts.states, opts.runs, opts.action_samples, opts.state_episodes) < 1:
        raise UserError("--states, --runs, --action-samples and --state-episodes must be >= 1")
    if not 0 <= opts.state_index < opts.states:
        raise UserError(
            f"--state-index {opts.state_index} out of range: there are {opts.states} states"
        )
    if opts.iters < 0 or opts.samples < 0:
        raise UserError("--iters and --samples must be >= 0")
    if opts.eval_samples < 1 or not opts.separate > 0:
        raise UserError("--eval-samples must be >= 1 and --separate > 0")
    dims = list(opts.dims)
    if action_dim == 1 and "dims" not in explicit:
        dims = [0]
    if not 1 <= len(dims) <= 2 or len(set(dims)) != len(dims):
        raise UserError(f"--dims takes one or two distinct action dims, got {dims}")
    bad = [d for d in dims if not 0 <= d < action_dim]
    if bad:
        raise UserError(f"--dims {bad[0]} out of range: the action has {action_dim} dims")
    return dims


@dataclass
class ModesRow:
    """Summary over the states."""

    distance: str
    states: int
    mean: float
    median: float
    max: float


def run(opts: ModesOptions, explicit: set[str] | None = None) -> None:
    """Measure run-to-run distances, write ``modes.csv`` and ``modes.png``, print a summary."""
    setup = load(opts)
    dims = _check(opts, setup.action_dim, explicit or set())
    planner = planner_for(setup, "iterative", opts.objective)
    source = next((k for k, p in setup.optimizers.items() if p is planner), "agent's own")
    objective = objective_for(setup, opts.objective, opts.horizon, opts.samples or None)
    iters = opts.iters or None
    states = on_policy_states(setup, opts.states, opts.seed, opts.state_episodes)  # (N, S)

    a, b = pairwise_runs(planner, objective, states, iters, opts.seed)
    l2_action, l2_loc = pairwise_distances(a, b)
    # Ĵ of each run's final λ [N], the same fixed draw for both
    j_a, j_b = (evaluate(objective, states, d, opts.eval_samples, opts.seed) for d in (a, b))
    samples, means = repeated_runs(
        planner,
        objective,
        states[opts.state_index],
        opts.runs,
        opts.action_samples,
        iters,
        opts.seed,
    )
    rows = [
        {
            "state": i,
            "l2_mean_action": float(l2_action[i]),
            "l2_loc": float(l2_loc[i]),
            "objective_a": float(j_a[i]),
            "objective_b": float(j_b[i]),
        }
        for i in range(len(states))
    ]
    csv_path = write_csv(out_path(opts, "modes", ".csv"), rows, COLUMNS)
    n_iters = iters or planner.default_iters
    figures = _plot(opts, setup, l2_action.numpy(), samples.numpy(), means.numpy(), dims, n_iters)

    summary = [
        ModesRow(name, len(d), float(np.mean(d)), float(np.median(d)), float(np.max(d)))
        for name, d in (
            ("‖tanh μ_a − tanh μ_b‖", l2_action.numpy()),
            ("‖μ_a − μ_b‖", l2_loc.numpy()),
        )
    ]
    print(
        f"policy modes on {setup.config['env']}: iterative optimizer ({source}, {n_iters} "
        f"iterations) on the {opts.objective} objective, two runs per state with different "
        f"noise; {states_text(len(states), opts.state_episodes, opts.seed)}"
    )
    print(format_table(summary))
    print(
        f"L2 between final mean actions: mean {summary[0].mean:.4f}, median {summary[0].median:.4f}"
    )
    print(separate_estimates(l2_action, j_a, j_b, opts.separate, opts.eval_samples))
    print(f"wrote {csv_path} and {', '.join(map(str, figures))}")


def separate_estimates(
    l2_action: torch.Tensor, j_a: torch.Tensor, j_b: torch.Tensor, threshold: float, samples: int
) -> str:
    """How far apart the two runs score on Ĵ, at states with separate estimates and the rest."""
    gap = (j_a - j_b).abs()  # (N,)
    parts = []
    for name, mask in (("separate", l2_action > threshold), ("alike", l2_action <= threshold)):
        if mask.any():
            g = gap[mask]
            parts.append(
                f"{name} (L2 {'>' if name == 'separate' else '<='} {threshold:g}): "
                f"{int(mask.sum())} states, |Ĵ_a − Ĵ_b| mean {float(g.mean()):.4f}, "
                f"max {float(g.max()):.4f}"
            )
        else:
            parts.append(f"{name}: no states")
    return f"Ĵ of each run's final λ (one fixed draw of {samples} samples per state): " + "; ".join(
        parts
    )


def _plot(
    opts: ModesOptions,
    setup,
    l2_action: np.ndarray,
    samples: np.ndarray,
    means: np.ndarray,
    dims: list[int],
    n_iters: int,
) -> list:
    fig, axes = new_figure(1, 2)
    hist, scatter = axes[0]
    A = setup.action_dim
    hist.hist(l2_action, bins=min(30, max(5, len(l2_action) // 3)), color="C0", alpha=0.8)
    hist.axvline(
        np.mean(l2_action), color="k", ls="--", lw=1, label=f"mean {np.mean(l2_action):.3g}"
    )
    hist.axvline(
        np.median(l2_action), color="k", ls=":", lw=1, label=f"median {np.median(l2_action):.3g}"
    )
    hist.set_xlabel(f"‖tanh μ_a − tanh μ_b‖ (L2 over A = {A} action dims; max {2 * A**0.5:.2g})")
    hist.set_ylabel("states")
    hist.set_title(
        f"{setup.config['env']}: two runs of the iterative optimizer per state\n"
        f"({len(l2_action)} on-policy states, {opts.objective} Ĵ, {n_iters} iterations)",
        fontsize="medium",
    )
    hist.legend(fontsize="small")

    cmap = _run_colors(len(samples))
    for r, (s, m) in enumerate(zip(samples, means)):
        x = s[:, dims[0]]
        if len(dims) == 2:
            y = s[:, dims[1]]
        else:  # one dim: one jittered row per run
            y = r + np.random.default_rng(r).uniform(-0.3, 0.3, len(x))
        mx = m[dims[0]]
        my = m[dims[1]] if len(dims) == 2 else r
        scatter.scatter(x, y, s=5, alpha=0.35, color=cmap[r], linewidths=0)
        scatter.scatter(
            [mx],
            [my],
            s=90,
            marker="X",
            color=cmap[r],
            edgecolors="k",
            label=f"run {r}" if len(dims) == 2 else None,
        )
    scatter.set_xlim(-1.05, 1.05)
    scatter.set_xlabel(f"action dim {dims[0]}")
    if len(dims) == 2:
        scatter.set_ylim(-1.05, 1.05)
        scatter.set_ylabel(f"action dim {dims[1]}")
    else:
        scatter.set_ylabel("run")
    scatter.set_title(
        f"state {opts.state_index}: {len(samples)} runs, {samples.shape[1]} samples each "
        "(✕ = tanh μ)",
        fontsize="medium",
    )
    if len(dims) == 2 and len(samples) <= 10:
        scatter.legend(fontsize="x-small", loc="best", ncol=2, markerscale=0.6)
    return save_figure(fig, opts, "modes")


def _run_colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


COMMAND = (
    "modes",
    "L2 distance between independent iterative-optimizer runs at the same states (Fig. 2, 18)",
    ModesOptions,
    run,
)
