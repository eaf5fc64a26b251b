"""``mbplan bench planners``: Ĵ vs iterations, evaluations and seconds per planner (Fig. 4c, 13).

Every planner optimizes λ from λ_0 on the same frozen objective, on the same on-policy states,
with the same seed and the same iteration budget (the iterative optimizer too runs past its
training N); ``direct`` is one network call, a single point. The iterative amortized optimizer
(Marino et al., NeurIPS 2021) is the reference: the target is the mean Ĵ it reaches at N = 5, and
the table reports the first iterate at which each other planner reaches it (iterations, objective
evaluations, seconds) and the ratio to the iterative optimizer's N = 5.

Fair comparison (DESIGN.md §4): the paper compared against Adam and CEM at single settings, so each
baseline runs twice on the evaluation states, at its fixed setting and at the best step size of a
sweep, and both are reported:

* fixed: ``--adam-lr`` (default 1e-2, the reference analysis's) and ``--cem-lr`` (default 0.9,
  mbplan's default; the reference analysis used 0.01). The row's setting names which it is:
  ``reference`` (the reference analysis's step size), ``default`` (mbplan's) or ``fixed``.
* tuned: the best of ``--adam-lrs`` (1e-2, 3e-2, 0.1, 0.3, 1, 3; the tuned value was at the
  top of the earlier grid, which ended at 0.3) and ``--cem-lrs`` (0.01, 0.1, 0.5, 0.9), chosen on
  held-out states: a second on-policy set of ``--sweep-states`` states from episodes reset with
  seed + :data:`SWEEP_SEED_OFFSET` + e (the evaluation episodes use seed + e, so the two sets never
  share an episode); the sweep's sampling noise is seeded the same way.
  Criterion: the area under the mean-Ĵ curve per iteration over ``--sweep-iters`` iterations,
  i.e. the mean of mean_B Ĵ(s, λ_k) over k = 1 … I (:func:`sweep_score`). It rewards reaching a
  high Ĵ early, which is what iterations-to-target measures, penalises a late collapse, and is
  less noisy than the single final estimate. A non-finite value scores −inf (the worst); ties go
  to the earlier step size. A tuned step size equal to the fixed one is run once and reported in
  both rows. The report names the winner of each sweep and flags a winner at either end of its
  grid (:func:`grid_edge`): the best step size may then lie outside the grid.

States: both sets are spread over ``--state-episodes`` episodes of the direct policy and over time
within each (:func:`mbplan.report.on_policy_states`).

Ĵ per iterate is the planner's own estimate from its trace (:class:`~mbplan.planners.PlanTrace`):
K fresh samples per state (CEM: its population), averaged over the states. Seconds are the
planner's cumulative wall-clock time on the whole batch, after a one-iteration warm-up call.

Shapes: B states · I iterations.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from mbplan.errors import UserError
from mbplan.mpc import planner_for
from mbplan.objective import Objective
from mbplan.options import option
from mbplan.planners import Planner, PlanTrace, make_planner
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

PLANNER_NAMES = ("iterative", "adam", "cem", "direct", "mppi")
#: Run unless ``--planners`` says otherwise. mppi rolls ~500 sequences per state out through the
#: model every iteration (~50 evaluations of K = 10; 3–6 s per iteration on the default's 100
#: states, one thread), so the default budget of 250 iterations would add 15–25 min: ask for it
#: with ``--planners iterative mppi --iters 6`` (its own default; ~30 s).
DEFAULT_PLANNERS = ("iterative", "adam", "cem", "direct")
#: Baselines run at a fixed and at a tuned step size.
TUNED_PLANNERS = ("adam", "cem")
COLUMNS = ("planner", "setting", "lr", "iteration", "n_evals", "seconds", "objective")
SWEEP_COLUMNS = ("planner", "lr", "score", "final", "chosen")
STEM = "bench-planners"
#: The iterative optimizer's iteration count whose Ĵ is the target (its training N).
REFERENCE_ITERS = 5
#: Step sizes of the reference analysis (what the paper compared against).
REFERENCE_LR = {"adam": 1e-2, "cem": 0.01}
#: Step sizes swept (DESIGN.md §4; Adam's grid extended up to 3: 0.3, the earlier top, won).
SWEEP_LRS = {"adam": (1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0), "cem": (0.01, 0.1, 0.5, 0.9)}
#: Held-out states and sweep noise use seed + this (episodes disjoint from the evaluation's).
SWEEP_SEED_OFFSET = 10_000

K = TypeVar("K", bound=Hashable)


@dataclass
class PlannersOptions(StateOptions):
    """Options of ``mbplan bench planners``."""

    objective: str = option("model", "objective Ĵ every planner optimizes", choices=OBJECTIVE_KINDS)
    horizon: int = option(5, "model rollout horizon H (with --objective model)")
    states: int = option(100, "on-policy states (the run's direct policy in the real env)")
    iters: int = option(250, "iteration budget of iterative, adam and cem (direct: 1 call)")
    samples: int = option(0, "samples K per state per objective evaluation (0 = 10)")
    planners: list[str] = option(
        None,
        "planners to compare (iterative is the reference)",
        choices=PLANNER_NAMES,
        default_factory=lambda: list(DEFAULT_PLANNERS),
    )
    adam_lr: float = option(1e-2, "Adam step size of the fixed row (reference 1e-2)")
    cem_lr: float = option(
        0.9,
        "CEM smoothing of the fixed row, weight on the new fit (mbplan's default; "
        "reference analysis 0.01)",
    )
    sweep: bool = option(
        True,
        "also run adam and cem at the best step size of a sweep on held-out states (default: on)",
    )
    sweep_states: int = option(
        20,
        f"held-out on-policy states of the sweep (episodes reset with seed + {SWEEP_SEED_OFFSET} "
        "+ e)",
    )
    sweep_iters: int = option(0, "iterations of each sweep run (0 = --iters)")
    adam_lrs: list[float] = option(
        None, "Adam step sizes swept", default_factory=lambda: list(SWEEP_LRS["adam"])
    )
    cem_lrs: list[float] = option(
        None, "CEM smoothings swept", default_factory=lambda: list(SWEEP_LRS["cem"])
    )


@dataclass(frozen=True)
class Entry:
    """One compared run: a planner at one setting.

    Attributes:
        planner: Planner name.
        setting: ``reference``, ``default``, ``fixed`` or ``tuned`` for adam and cem (see the
            module docstring); empty for iterative and direct.
        lr: Step size (CEM: smoothing) of adam and cem; None for the others.
    """

    planner: str
    setting: str = ""
    lr: float | None = None

    @property
    def label(self) -> str:
        """E.g. ``adam (lr 0.3, tuned)``; the bare name for iterative and direct."""
        if self.lr is None:
            return self.planner
        return f"{self.planner} (lr {self.lr:g}, {self.setting})"


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


@dataclass
class SweepPoint:
    """One step size of a sweep, scored on the held-out states.

    Attributes:
        planner: Planner name.
        lr: Step size (CEM: smoothing).
        score: :func:`sweep_score` of its curve (higher is better).
        final: mean_B Ĵ(s, λ_I) at the sweep's last iterate.
        chosen: Whether this step size won the sweep.
    """

    planner: str
    lr: float
    score: float
    final: float
    chosen: bool = False


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
    planners: dict[K, Planner],
    iters: int,
    seed: int = 0,
    warm_up: bool = True,
) -> dict[K, Curve]:
    """Run every planner from λ_0 on ``states`` [B, S] and record its mean-Ĵ curve.

    Each planner gets a fresh generator seeded with ``seed`` (the same noise stream), ``iters``
    iterations (a ``direct`` planner one network call, recorded as a single point) and, with
    ``warm_up``, a one-iteration warm-up call first, so that the timings do not include first-call
    overhead.

    Args:
        objective: The frozen Ĵ.
        states: [B, S].
        planners: Any key (a name, an :class:`Entry`, a step size) → planner.
        iters: I for all planners but ``direct``.
        seed: Seed of every planner's sampling noise.
        warm_up: Make the warm-up call (only the timings need it).

    Returns:
        The same keys → :class:`Curve`.
    """
    curves = {}
    for key, planner in planners.items():
        direct = planner.name == "direct"
        if warm_up:
            planner.plan(
                objective, states, n_iters=1, generator=torch.Generator().manual_seed(seed)
            )
        result = planner.plan(
            objective,
            states,
            n_iters=1 if direct else iters,
            generator=torch.Generator().manual_seed(seed),
        )
        curves[key] = curve_of(result.trace, single_point=direct)
    return curves


def sweep_score(curve: Curve) -> float:
    """Area under the mean-Ĵ curve per iteration: mean over k = 1 … I of mean_B Ĵ(s, λ_k).

    Returns −inf (the worst) if any value is not finite, so a NaN never wins a sweep.
    """
    values = curve.objective[1:] if curve.objective.numel() > 1 else curve.objective
    return float(values.mean()) if bool(torch.isfinite(values).all()) else -math.inf


def tune(
    objective: Objective,
    states: Tensor,
    name: str,
    lrs: Sequence[float],
    iters: int,
    seed: int = 0,
) -> list[SweepPoint]:
    """Run planner ``name`` at every step size on (held-out) ``states`` and pick the best.

    Args:
        objective: The frozen Ĵ.
        states: Held-out states [B, S], not the ones the comparison is reported on.
        name: A planner with an ``lr`` hyperparameter (``adam``, ``cem``).
        lrs: Step sizes to try (duplicates run once).
        iters: Iterations per run.
        seed: Seed of the sampling noise (the same for every step size).

    Returns:
        One :class:`SweepPoint` per distinct step size, in order; the one with the highest
        :func:`sweep_score` (the first of ties) has ``chosen`` set.
    """
    planners = {lr: make_planner(name, lr=lr) for lr in dict.fromkeys(lrs)}
    curves = compare_planners(objective, states, planners, iters, seed, warm_up=False)
    points = [
        SweepPoint(name, lr, sweep_score(c), float(c.objective[-1])) for lr, c in curves.items()
    ]
    max(points, key=lambda p: p.score).chosen = True  # max keeps the first of ties
    return points


def grid_edge(points: Sequence[SweepPoint]) -> str:
    """``lowest`` or ``highest`` when the chosen step size is that end of a grid of ≥ 2, else ''."""
    lrs = [p.lr for p in points]
    chosen = next(p.lr for p in points if p.chosen)
    if len(set(lrs)) < 2:
        return ""
    return "lowest" if chosen == min(lrs) else "highest" if chosen == max(lrs) else ""


def sweep_verdict(points: Sequence[SweepPoint]) -> str:
    """One line: which step size won a sweep, flagged when it sits at an end of the grid."""
    best = next(p for p in points if p.chosen)
    grid = ", ".join(f"{p.lr:g}" for p in points)
    line = f"{best.planner}: lr {best.lr:g} won (score {best.score:.4g}) of {{{grid}}}"
    edge = grid_edge(points)
    if edge:
        cap = " (at most 1)" if best.planner == "cem" else ""
        line += (
            f"; WARNING: it is the {edge} step size of the grid, so the best one may lie beyond "
            f"it: extend --{best.planner}-lrs{cap}"
        )
    return line


def fixed_setting(name: str, lr: float) -> str:
    """What a fixed step size of ``name`` is: ``reference``, ``default`` (mbplan's) or ``fixed``."""
    if math.isclose(lr, REFERENCE_LR[name]):
        return "reference"
    if math.isclose(lr, make_planner(name).hyperparameters()["lr"]):
        return "default"
    return "fixed"


def reach(name: str, curve: Curve, target: float, at: int | None = None) -> Reach:
    """The first iterate whose mean Ĵ is at least ``target`` (iterations, evaluations, seconds).

    Args:
        name: Planner label.
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


def target_of(curves: dict[Entry, Curve]) -> tuple[float, int]:
    """(mean Ĵ of the iterative optimizer at N = 5 or its last iterate if fewer, that N)."""
    curve = next(c for e, c in curves.items() if e.planner == "iterative")
    n = min(REFERENCE_ITERS, int(curve.iteration[-1]))
    return float(curve.objective[n]), n


def csv_rows(curves: dict[Entry, Curve]) -> list[dict]:
    """One row per compared run per iterate, with the columns of :data:`COLUMNS`."""
    return [
        {
            "planner": e.planner,
            "setting": e.setting,
            "lr": e.lr,
            "iteration": int(it),
            "n_evals": float(ev),
            "seconds": float(sec),
            "objective": float(j),
        }
        for e, c in curves.items()
        for it, ev, sec, j in zip(c.iteration, c.n_evals, c.seconds, c.objective)
    ]


def sweep_rows(sweeps: dict[str, list[SweepPoint]]) -> list[dict]:
    """One row per swept step size, with the columns of :data:`SWEEP_COLUMNS`."""
    return [vars(p) for points in sweeps.values() for p in points]


def plot(curves: dict[Entry, Curve], target: float, n_ref: int, title: str):
    """Three panels: mean Ĵ vs iterations, vs objective evaluations, vs seconds (log x).

    One colour per planner; tuned baselines are dashed, fixed settings solid.
    """
    fig, axes = new_figure(1, 3, size=(5.0, 4.6))
    panels = [
        ("iteration", "iterations (log scale)"),
        ("n_evals", "objective evaluations, K samples per state each (log scale)"),
        ("seconds", "wall-clock seconds, all states in one batch (log scale)"),
    ]
    colors = {"iterative": "C0", "adam": "C1", "cem": "C2", "direct": "C3", "mppi": "C4"}
    low, high = y_range(curves, target)
    for ax, (field, xlabel) in zip(axes[0], panels):
        for e, c in curves.items():
            x, y = getattr(c, field).double(), c.objective.double()
            color = colors.get(e.planner)
            if e.planner == "direct":
                label = f"direct (1 network call, 0 evaluations): {float(y[-1]):.3g}"
                ax.axhline(float(y[-1]), color=color, ls="-.", lw=1.2, label=label)
                if field == "iteration":
                    ax.plot(x, y, "*", color=color, ms=11)
                continue
            keep = x > 0  # λ_0 (0 iterations, 0 evaluations) has no place on a log axis
            label = e.label
            if float(y[keep].min()) < low:
                label += f" (off scale below, down to {float(y[keep].min()):.3g})"
            ls = "--" if e.setting == "tuned" else "-"
            ax.plot(x[keep], y[keep], color=color, ls=ls, lw=1.5, label=label)
        ax.axhline(
            target,
            color="0.4",
            ls=":",
            lw=1.2,
            label=f"target: iterative at N={n_ref}: {target:.3g}",
        )
        ax.set_xscale("log")
        ax.set_ylim(low, high)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Ĵ(s, λ), mean over states (reward units)")
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=4)
    fig.suptitle(title)
    return fig


def y_range(curves: dict[Entry, Curve], target: float) -> tuple[float, float]:
    """Y limits showing every curve, except that a collapse far below the start is cut off.

    The lower limit is at most twice the span (start to best) below the lowest start.
    """
    values = torch.cat([c.objective for c in curves.values()])
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return -1.0, 1.0
    starts = [float(c.objective[0]) for e, c in curves.items() if e.planner != "direct"]
    start = min([target, *(s for s in starts if math.isfinite(s))])
    high = max(float(values.max()), target)
    low = max(float(values.min()), start - 2 * (high - start))
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def _ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` as text: ``never`` if not reached, ``-`` if undefined."""
    if value is None:
        return "never"
    if not reference:
        return "-"
    return f"{value / reference:.3g}"


def _check(opts: PlannersOptions) -> None:
    if opts.states < 1 or opts.iters < 1 or opts.horizon < 1 or opts.samples < 0:
        raise UserError("--states, --iters, --horizon must be >= 1 and --samples >= 0")
    if "iterative" not in opts.planners:
        raise UserError("--planners must include iterative (the reference)")
    if opts.sweep_states < 1 or opts.sweep_iters < 0:
        raise UserError("--sweep-states must be >= 1 and --sweep-iters >= 0 (0 = --iters)")
    if opts.state_episodes < 1:
        raise UserError("--state-episodes must be >= 1")
    if opts.adam_lr <= 0 or not opts.adam_lrs or min(opts.adam_lrs) <= 0:
        raise UserError("--adam-lr and --adam-lrs (at least one) must be > 0")
    cem = [opts.cem_lr, *opts.cem_lrs]
    if not opts.cem_lrs or not all(0 < lr <= 1 for lr in cem):
        raise UserError("--cem-lr and --cem-lrs (at least one) must be in (0, 1]")


def run(opts: PlannersOptions) -> None:
    """Handler of ``mbplan bench planners``: prints the tables, writes the CSVs and the figure."""
    _check(opts)
    setup = load(opts)
    objective = objective_for(setup, opts.objective, opts.horizon, opts.samples or None)
    names = list(dict.fromkeys(opts.planners))
    fixed = {"adam": opts.adam_lr, "cem": opts.cem_lr}
    grids = {"adam": opts.adam_lrs, "cem": opts.cem_lrs}
    kinds = [k for k in (opts.objective, *setup.optimizers) if k in setup.optimizers]
    fitted = f"fitted on {kinds[0]}" if kinds else "the agent's own"  # as planner_for picks
    horizon = f", H={opts.horizon}" if opts.objective == "model" else ""
    states = on_policy_states(setup, opts.states, opts.seed, opts.state_episodes)  # (B, S)
    print(
        f"planners on {setup.config['env']}: objective {opts.objective}{horizon}, "
        f"{states_text(states.shape[0], opts.state_episodes, opts.seed)}, "
        f"K={objective.n_samples}, budget {opts.iters} "
        f"iterations, seed {opts.seed}; iterative optimizer: {fitted}",
        flush=True,
    )

    # Sweep the baselines' step sizes on held-out states
    sweeps: dict[str, list[SweepPoint]] = {}
    tuned = [n for n in names if n in TUNED_PLANNERS] if opts.sweep else []
    if tuned:
        sweep_seed = opts.seed + SWEEP_SEED_OFFSET
        sweep_iters = opts.sweep_iters or opts.iters
        held_out = on_policy_states(setup, opts.sweep_states, sweep_seed, opts.state_episodes)
        for name in tuned:
            sweeps[name] = tune(objective, held_out, name, grids[name], sweep_iters, sweep_seed)
        print(
            f"sweep on held-out states: "
            f"{states_text(held_out.shape[0], opts.state_episodes, sweep_seed)}; "
            f"{sweep_iters} iterations; score = mean Ĵ over iterates "
            f"1..{sweep_iters} (area under the curve); the best is run on the evaluation states:"
        )
        table = [
            {
                "planner": p.planner,
                "lr": f"{p.lr:g}",
                "score": p.score,
                "final_J": p.final,
                "chosen": "*" if p.chosen else "",
            }
            for pts in sweeps.values()
            for p in pts
        ]
        print(format_table(table))
        for points in sweeps.values():
            print(sweep_verdict(points), flush=True)

    # Run every planner on the evaluation states
    planners: dict[Entry, Planner] = {}
    for name in names:
        if name not in TUNED_PLANNERS:
            planners[Entry(name)] = planner_for(setup, name, opts.objective)
            continue
        lr = fixed[name]
        planners[Entry(name, fixed_setting(name, lr), lr)] = make_planner(name, lr=lr)
        if name in sweeps:
            lr = next(p.lr for p in sweeps[name] if p.chosen)
            planners[Entry(name, "tuned", lr)] = make_planner(name, lr=lr)
    unique = {(e.planner, e.lr): p for e, p in planners.items()}  # a tuned = fixed lr runs once
    runs = compare_planners(objective, states, unique, opts.iters, opts.seed)
    curves = {e: runs[e.planner, e.lr] for e in planners}
    target, n_ref = target_of(curves)
    reached = {
        e: reach(e.label, c, target, at=n_ref if e.planner == "iterative" else None)
        for e, c in curves.items()
    }
    ref = next(r for e, r in reached.items() if e.planner == "iterative")

    print(
        f"target Ĵ = {target:.4g}, the iterative optimizer's at N={n_ref}; what each planner "
        f"needed to reach it first within {opts.iters} iterations (ratios to the iterative "
        "optimizer's N; never = not within the budget):"
    )
    rows = [
        {
            "planner": r.planner,
            "final_J": r.final,
            "best_J": r.best,
            "iters": "never" if r.iters is None else r.iters,
            "evals": "never" if r.evals is None else f"{r.evals:g}",
            "seconds": "never" if r.seconds is None else f"{r.seconds:.3g}",
            "iters_ratio": _ratio(r.iters, ref.iters),
            "evals_ratio": _ratio(r.evals, ref.evals),
        }
        for r in reached.values()
    ]
    print(format_table(rows))

    written = [write_csv(out_path(opts, STEM, ".csv"), csv_rows(curves), COLUMNS)]
    if sweeps:
        path = out_path(opts, f"{STEM}-sweep", ".csv")
        written.append(write_csv(path, sweep_rows(sweeps), SWEEP_COLUMNS))
    title = (
        f"{setup.config['env']}: {opts.objective} objective{horizon}, "
        f"{states.shape[0]} states, K={objective.n_samples}; dashed: tuned on held-out states"
    )
    written += save_figure(plot(curves, target, n_ref, title), opts, STEM)
    print(f"wrote {', '.join(map(str, written))}")


COMMAND = (
    "planners",
    "Ĵ vs iterations, evaluations and seconds: iterative vs adam vs cem (reference and tuned) "
    "vs direct (Fig. 4c)",
    PlannersOptions,
    run,
)
