"""``mbplan bench planners``: Ĵ vs iterations, evaluations and seconds per planner (Fig. 4c, 13).

Every planner optimizes λ from λ_0 on the same frozen objective, on the same on-policy states,
with the same seed and the same iteration budget (the iterative optimizer too runs past its
training N); ``direct`` is one network call, a single point. The iterative amortized optimizer
(Marino et al., NeurIPS 2021) is the reference: the target is the mean Ĵ it reaches at N = 5, and
the table reports the first iterate at which each other planner reaches it (iterations, objective
evaluations, seconds) and the ratio to the iterative optimizer's N = 5.

Ĵ per iterate is the planner's own estimate from its trace (:class:`~mbplan.planners.PlanTrace`):
K fresh samples per state (CEM: its population), averaged over the states. Seconds are the
planner's cumulative wall-clock time on the whole batch, after a one-iteration warm-up call.

Shapes: B states · I iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mbplan.analysis import (
    OBJECTIVE_KINDS,
    CommonOptions,
    load,
    new_figure,
    objective_for,
    on_policy_states,
    out_path,
    save_figure,
    write_csv,
)
from mbplan.cli_args import option
from mbplan.errors import UserError
from mbplan.objective import Objective
from mbplan.planners import Planner, PlanTrace, make_planner

PLANNER_NAMES = ("iterative", "adam", "cem", "direct")
COLUMNS = ("planner", "iteration", "n_evals", "seconds", "objective")
STEM = "bench-planners"
#: The iterative optimizer's iteration count whose Ĵ is the target (its training N).
REFERENCE_ITERS = 5


@dataclass
class PlannersOptions(CommonOptions):
    """Options of ``mbplan bench planners``."""

    objective: str = option("model", "objective Ĵ every planner optimizes", choices=OBJECTIVE_KINDS)
    horizon: int = option(5, "model rollout horizon H (with --objective model)")
    states: int = option(100, "on-policy states (the run's direct policy in the real env)")
    iters: int = option(250, "iteration budget of iterative, adam and cem (direct: 1 call)")
    samples: int = option(0, "samples K per state per objective evaluation (0 = the run's)")
    planners: list[str] = option(
        None, "planners to compare (iterative is the reference)", choices=PLANNER_NAMES,
        default_factory=lambda: list(PLANNER_NAMES),
    )  # fmt: skip
    adam_lr: float = option(1e-2, "Adam step size (reference 1e-2)")
    cem_lr: float = option(0.9, "CEM smoothing, weight on the new fit (reference analysis 0.01)")


@dataclass
class Curve:
    """Mean Ĵ over states per iterate of one planner.

    Attributes:
        iteration: k of λ_k, [I+1] (direct: the single point k = 1).
        n_evals: Cumulative objective evaluations spent to produce λ_k, [I+1].
        seconds: Cumulative wall-clock seconds at which λ_k was ready (whole batch), [I+1].
        objective: mean_B Ĵ(s, λ_k), [I+1]; −inf if any state's value was not finite.
    """

    iteration: Tensor
    n_evals: Tensor
    seconds: Tensor
    objective: Tensor


@dataclass
class Reach:
    """What one planner needed to reach the target Ĵ (None: not within the budget)."""

    planner: str
    final: float
    best: float
    iters: int | None
    evals: float | None
    seconds: float | None


def curve_of(trace: PlanTrace, single_point: bool = False) -> Curve:
    """The mean-over-states :class:`Curve` of a trace (``single_point``: only λ_I, e.g. direct)."""
    I = trace.n_iters
    curve = Curve(
        iteration=torch.arange(I + 1),
        n_evals=trace.n_evals.clone(),
        seconds=trace.elapsed.clone(),
        objective=trace.objective.mean(1),  # (I+1,)
    )
    if single_point:
        curve = Curve(*(v[-1:] for v in vars(curve).values()))
    return curve


def compare_planners(
    objective: Objective,
    states: Tensor,
    planners: dict[str, Planner],
    iters: int,
    seed: int = 0,
) -> dict[str, Curve]:
    """Run every planner from λ_0 on ``states`` [B, S] and record its mean-Ĵ curve.

    Each planner gets a fresh generator seeded with ``seed`` (the same noise stream), ``iters``
    iterations (a ``direct`` planner one network call, recorded as a single point) and a one-
    iteration warm-up call first, so that the timings do not include first-call overhead.

    Args:
        objective: The frozen Ĵ.
        states: [B, S].
        planners: name → planner; a name ``direct`` is run once.
        iters: I for all other planners.
        seed: Seed of every planner's sampling noise.
    """
    curves = {}
    for name, planner in planners.items():
        n_iters = 1 if name == "direct" else iters
        planner.plan(objective, states, n_iters=1, generator=torch.Generator().manual_seed(seed))
        result = planner.plan(
            objective, states, n_iters=n_iters, generator=torch.Generator().manual_seed(seed)
        )
        curves[name] = curve_of(result.trace, single_point=name == "direct")
    return curves


def reach(name: str, curve: Curve, target: float, at: int | None = None) -> Reach:
    """The first iterate whose mean Ĵ is at least ``target`` (iterations, evaluations, seconds).

    Args:
        name: Planner name.
        curve: Its curve.
        target: Ĵ to reach.
        at: Report this iterate instead (the reference: the iterative optimizer's N).
    """
    finite = curve.objective[torch.isfinite(curve.objective)]
    best = float(finite.max()) if finite.numel() else -math.inf
    final = float(curve.objective[-1])
    hit = (curve.objective >= target).nonzero()
    if at is None and hit.numel() == 0:
        return Reach(name, final, best, None, None, None)
    k = at if at is not None else int(hit[0, 0])
    it, evals, sec = int(curve.iteration[k]), float(curve.n_evals[k]), float(curve.seconds[k])
    return Reach(name, final, best, it, evals, sec)


def target_of(curves: dict[str, Curve]) -> tuple[float, int]:
    """(mean Ĵ of the iterative optimizer at N = 5 or its last iterate if fewer, that N)."""
    curve = curves["iterative"]
    n = min(REFERENCE_ITERS, int(curve.iteration[-1]))
    return float(curve.objective[n]), n


def csv_rows(curves: dict[str, Curve]) -> list[dict]:
    """One row per planner per iterate, with the columns of :data:`COLUMNS`."""
    return [
        {"planner": name, "iteration": int(it), "n_evals": float(ev), "seconds": float(sec),
         "objective": float(j)}
        for name, c in curves.items()
        for it, ev, sec, j in zip(c.iteration, c.n_evals, c.seconds, c.objective)
    ]  # fmt: skip


def plot(curves: dict[str, Curve], target: float, n_ref: int, title: str):
    """Three panels: mean Ĵ vs iterations, vs objective evaluations, vs seconds (log x)."""
    fig, axes = new_figure(1, 3, size=(5.0, 4.4))
    panels = [
        ("iteration", "iterations (log scale)"),
        ("n_evals", "objective evaluations, K samples per state each (log scale)"),
        ("seconds", "wall-clock seconds, all states in one batch (log scale)"),
    ]
    colors = {"iterative": "C0", "adam": "C1", "cem": "C2", "direct": "C3"}
    low, high = y_range(curves, target)
    for ax, (field, xlabel) in zip(axes[0], panels):
        for name, c in curves.items():
            x, y = getattr(c, field).double(), c.objective.double()
            if name == "direct":
                label = f"direct (1 network call, 0 evaluations): {float(y[-1]):.3g}"
                ax.axhline(float(y[-1]), color=colors[name], ls="-.", lw=1.2, label=label)
                if field == "iteration":
                    ax.plot(x, y, "*", color=colors[name], ms=11)
                continue
            keep = x > 0  # λ_0 (0 iterations, 0 evaluations) has no place on a log axis
            label = name
            if float(y[keep].min()) < low:
                label += f" (off scale below, down to {float(y[keep].min()):.3g})"
            ax.plot(x[keep], y[keep], color=colors.get(name), lw=1.5, label=label)
        ax.axhline(target, color="0.4", ls=":", lw=1.2,
                   label=f"target: iterative at N={n_ref}: {target:.3g}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(low, high)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Ĵ(s, λ), mean over states (reward units)")
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=5)
    fig.suptitle(title)
    return fig


def y_range(curves: dict[str, Curve], target: float) -> tuple[float, float]:
    """Y limits showing every curve, except that a collapse far below the start is cut off.

    The lower limit is at most twice the span (start to best) below the lowest start.
    """
    values = torch.cat([c.objective for c in curves.values()])
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return -1.0, 1.0
    start = min([target, *(float(c.objective[0]) for n, c in curves.items() if n != "direct")])
    high = max(float(values.max()), target)
    low = max(float(values.min()), start - 2 * (high - start))
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.3g}"


def run(opts: PlannersOptions) -> None:
    """Handler of ``mbplan bench planners``: prints the table, writes the CSV and the figure."""
    from mbplan.cli import format_table
    from mbplan.planning import planner_for

    if opts.states < 1 or opts.iters < 1 or opts.horizon < 1 or opts.samples < 0:
        raise UserError("--states, --iters, --horizon must be >= 1 and --samples >= 0")
    if "iterative" not in opts.planners:
        raise UserError("--planners must include iterative (the reference)")
    setup = load(opts)
    objective = objective_for(setup, opts.objective, opts.horizon, opts.samples or None)
    settings = {"adam": {"lr": opts.adam_lr}, "cem": {"lr": opts.cem_lr}}
    planners = {
        name: make_planner(name, **settings[name])
        if name in settings
        else planner_for(setup, name, opts.objective)
        for name in dict.fromkeys(opts.planners)
    }
    states = on_policy_states(setup, opts.states, opts.seed)  # (B, S)
    curves = compare_planners(objective, states, planners, opts.iters, opts.seed)
    target, n_ref = target_of(curves)
    reached = {name: reach(name, c, target) for name, c in curves.items()}
    ref = reached["iterative"] = reach("iterative", curves["iterative"], target, at=n_ref)

    kinds = [k for k in (opts.objective, *setup.optimizers) if k in setup.optimizers]
    fitted = f"fitted on {kinds[0]}" if kinds else "the agent's own"  # as planner_for picks
    horizon = f", H={opts.horizon}" if opts.objective == "model" else ""
    print(
        f"planners on {setup.config['env']}: objective {opts.objective}{horizon}, "
        f"{states.shape[0]} on-policy states, K={objective.n_samples}, budget {opts.iters} "
        f"iterations, seed {opts.seed}; iterative optimizer: {fitted}"
    )
    print(
        f"target Ĵ = {target:.4g}, the iterative optimizer's at N={n_ref}; what each planner "
        "needed to reach it first (ratios to the iterative optimizer's N):"
    )
    rows = [
        {"planner": r.planner, "final_J": r.final, "best_J": r.best,
         "iters": "never" if r.iters is None else r.iters,
         "evals": "never" if r.evals is None else f"{r.evals:g}",
         "seconds": "never" if r.seconds is None else f"{r.seconds:.3g}",
         "iters_ratio": _ratio(r.iters, ref.iters), "evals_ratio": _ratio(r.evals, ref.evals)}
        for r in reached.values()
    ]  # fmt: skip
    print(format_table(rows))

    csv = write_csv(out_path(opts, STEM, ".csv"), csv_rows(curves), COLUMNS)
    title = (
        f"{setup.config['env']}: {opts.objective} objective{horizon}, "
        f"{states.shape[0]} states, K={objective.n_samples}"
    )
    figures = save_figure(plot(curves, target, n_ref, title), opts, STEM)
    print(f"wrote {csv} and {', '.join(map(str, figures))}")


COMMAND = (
    "planners",
    "Ĵ vs iterations, evaluations and seconds: iterative vs adam vs cem vs direct (Fig. 4c)",
    PlannersOptions,
    run,
)
