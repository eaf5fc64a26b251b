"""``mbplan bench gap``: the amortization gap per state, direct vs iterative (Fig. 6, 17b).

From each amortized λ (direct: one network call; iterative: its N iterations) λ is optimized
further by gradient ascent on (μ, log σ) until Ĵ stops improving; the gap of a state is
Ĵ(λ after) − Ĵ(λ before) (Marino et al., NeurIPS 2021, §4.2; Cremer et al., 2018).

How it is measured:

* Refinement: each step takes a gradient of Ĵ with K fresh samples per state (K = 10 as in
  the reference). Every 10 steps Ĵ is measured on a fixed validation draw (``eval_samples``
  samples, the same noise each time, so a deterministic function of λ); each state stops on its
  own once that value has not risen by more than ``tol`` within ``patience`` steps (or at
  ``max_iters``), and λ after is its best checked iterate (the amortized λ included).
* Ĵ before and after are then measured on a third draw (``eval_samples`` samples, the same draw
  for before and after), so the gap is not inflated by selecting on the validation noise and the
  difference carries no noise between the two.
* Optimizing on one fixed draw of K = 10 samples instead overfits those samples: on the small
  HalfCheetah bundle the held-out Ĵ then drops (gap ≈ −0.7 for direct).
* States: ``--states`` on-policy states spread over ``--state-episodes`` episodes of the direct
  policy (:func:`mbplan.report.on_policy_states`).
* Fine-tuned direct policy (a fair control): the run's direct policy was trained against a critic
  that kept moving, while the iterative optimizer was fitted on the frozen objective. So a copy
  of the direct policy is first trained ``--finetune-steps`` Adam steps on the same frozen Ĵ
  (same K), on ``--finetune-states`` training states drawn the same way as the evaluation states
  from episodes reset with seed + :data:`FINETUNE_SEED_OFFSET` + e (so never the evaluation's),
  by :func:`mbplan.fit.finetune_direct`; its gap (``direct-finetuned``) is reported beside the
  as-trained ``direct`` and the ``iterative`` one.
* The reference used SGD with lr 1e-4 on (μ, σ). On the small HalfCheetah bundle that reaches
  about a third of the gain in 2000 steps without meeting the stopping rule, while Adam with
  lr 1e-3 (elementwise, so each state's λ is optimized on its own) converges in a median of
  ~800 steps to the gain that SGD with larger steps also finds. Adam lr 1e-3 is the default;
  ``--optimizer sgd --lr 1e-4`` gives the reference setting.

Shapes: B states · A action dims.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.errors import UserError
from mbplan.fit import finetune_direct
from mbplan.mpc import Setup, planner_for
from mbplan.objective import Objective
from mbplan.options import option
from mbplan.planners import Planner
from mbplan.planners.base import worst_if_nonfinite
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

AMORTIZED = ("direct", "iterative")
#: Name of the fine-tuned copy of the direct policy in the tables, the CSV and the figure.
FINETUNED = "direct-finetuned"
COLUMNS = ("planner", "state", "objective_before", "objective_after", "gap", "iterations")
STEM = "bench-gap"
#: The fine-tuning's training states come from episodes reset with seed + this + e.
FINETUNE_SEED_OFFSET = 20_000


@dataclass
class GapOptions(StateOptions):
    """Options of ``mbplan bench gap``."""

    objective: str = option("model-free", "objective Ĵ", choices=OBJECTIVE_KINDS)
    horizon: int = option(5, "model rollout horizon H (with --objective model)")
    states: int = option(100, "on-policy states (the run's direct policy in the real env)")
    planners: list[str] = option(
        None,
        f"amortized planners to measure (direct also adds {FINETUNED}: see --finetune-steps)",
        choices=AMORTIZED,
        default_factory=lambda: list(AMORTIZED),
    )
    optimizer: str = option(
        "adam",
        "refinement optimizer on (μ, log σ) (reference: sgd --lr 1e-4, which barely "
        "moves λ within a sane budget; adam --lr 1e-3 converges)",
        choices=("adam", "sgd"),
    )
    lr: float = option(1e-3, "refinement step size")
    patience: int = option(50, "a state stops when Ĵ has not risen by > --tol in this many steps")
    tol: float = option(1e-4, "smallest rise of the validation Ĵ that counts as an improvement")
    max_iters: int = option(2000, "cap on refinement steps")
    eval_samples: int = option(
        100, "samples per state of the fixed draws measuring Ĵ (stopping; before and after)"
    )
    finetune_steps: int = option(
        3000,
        "Adam steps fine-tuning a copy of the direct policy on the measured Ĵ before its gap "
        "is measured (0 = off; ~25 ms a step model-free, ~0.35 s model-based at H=5, one thread)",
    )
    finetune_states: int = option(
        1000,
        f"on-policy training states of the fine-tuning (episodes reset with seed + "
        f"{FINETUNE_SEED_OFFSET}, never the evaluation's)",
    )
    finetune_batch: int = option(256, "states per fine-tuning step")
    finetune_lr: float = option(3e-4, "Adam step size of the fine-tuning (the default's SAC lr)")


@dataclass
class Refined:
    """Result of :func:`refine`.

    Attributes:
        dist: The best λ found per state (by the validation draw), [B, A] each.
        iterations: Gradient steps taken per state before it stopped, [B].
        objective: Best validation Ĵ per state, [B].
    """

    dist: TanhNormal
    iterations: Tensor
    objective: Tensor


def refine(
    objective: Objective,
    states: Tensor,
    init: TanhNormal,
    *,
    optimizer: str = "adam",
    lr: float = 1e-3,
    patience: int = 50,
    tol: float = 1e-4,
    max_iters: int = 2000,
    check_every: int = 10,
    val_samples: int = 100,
    seed: int = 0,
) -> Refined:
    """Gradient ascent on λ = (μ, log σ) per state from ``init`` until Ĵ stops improving.

    Each step uses K fresh samples (the objective's K, from a generator seeded with ``seed``).
    Every ``check_every`` steps Ĵ is measured on a fixed validation draw of ``val_samples``
    samples (re-seeded with ``seed + 2`` each time, so it is a deterministic function of λ); a
    state stops when that value has not exceeded its best by more than ``tol`` for ``patience``
    steps, and its λ is the best checked iterate (``init`` included). All stop at ``max_iters``.
    NaN counts as the worst value.

    Args:
        objective: The frozen Ĵ.
        states: [B, S].
        init: The amortized λ, [B, A] each.
        optimizer: ``adam`` or ``sgd`` (both act elementwise: states do not interact).
        lr: Step size.
        patience: Steps without improvement before a state stops.
        tol: Smallest rise of the validation Ĵ that counts as an improvement.
        max_iters: Cap on steps.
        check_every: Steps between validation checks.
        val_samples: Samples per state of the validation draw.
        seed: Seed of the step noise (validation: ``seed + 2``).
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from adam, sgd")
    params = torch.cat([init.loc, init.log_scale], -1).detach().clone()  # (B, 2A)
    params.requires_grad_()
    optim_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    optim = optim_cls([params], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    B = states.shape[0]
    best = torch.full((B,), -torch.inf)  # best validation Ĵ that counted as an improvement
    best_value = torch.full((B,), -torch.inf)  # best validation Ĵ seen at all, and its λ
    best_params = params.detach().clone()
    last_improved = torch.zeros(B, dtype=torch.long)  # step of the last improvement
    running = torch.ones(B, dtype=torch.bool)
    iterations = torch.full((B,), max_iters, dtype=torch.long)
    for step in range(max_iters + 1):
        if step % check_every == 0 or step == max_iters:
            # Check on the validation draw; track the best iterate and the stopping rule
            loc, log_scale = params.detach().chunk(2, -1)  # (B, A) each
            value = evaluate(objective, states, TanhNormal(loc, log_scale), val_samples, seed + 2)
            better = running & (value > best_value)
            best_value = torch.where(better, value, best_value)
            best_params = torch.where(better.unsqueeze(-1), params.detach(), best_params)
            improved = running & (value > best + tol)
            best = torch.where(improved, value, best)
            last_improved = torch.where(improved, step, last_improved)
            stop = running & (step - last_improved >= patience)
            iterations = torch.where(stop, step, iterations)
            running &= ~stop
            if step == max_iters or not running.any():
                break

        # Gradient step on −Ĵ with fresh samples (stopped states keep moving, unread)
        loc, log_scale = params.chunk(2, -1)  # (B, A) each
        value = objective(states, TanhNormal(loc, log_scale), generator=generator).value  # (B,)
        optim.zero_grad(set_to_none=True)
        (-torch.where(torch.isfinite(value), value, 0.0).sum()).backward()
        optim.step()
    loc, log_scale = best_params.chunk(2, -1)
    return Refined(TanhNormal(loc, log_scale), iterations, best_value)


def evaluate(objective: Objective, states: Tensor, dist: TanhNormal, n: int, seed: int) -> Tensor:
    """Ĵ per state [B] on a fixed draw of ``n`` samples (the same draw for the same seed)."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        return worst_if_nonfinite(objective(states, dist, n, generator).value)


def amortization_gap(
    objective: Objective, states: Tensor, planner: Planner, opts: GapOptions
) -> dict[str, Tensor]:
    """Ĵ before and after refinement, the gap and the steps taken, per state ([B] each)."""
    generator = torch.Generator().manual_seed(opts.seed)
    before = planner.plan(objective, states, generator=generator, record_objective=False).dist
    refined = refine(
        objective,
        states,
        before,
        optimizer=opts.optimizer,
        lr=opts.lr,
        patience=opts.patience,
        tol=opts.tol,
        max_iters=opts.max_iters,
        val_samples=opts.eval_samples,
        seed=opts.seed,
    )
    eval_seed = opts.seed + 1  # a draw the refinement never saw
    j_before = evaluate(objective, states, before, opts.eval_samples, eval_seed)
    j_after = evaluate(objective, states, refined.dist, opts.eval_samples, eval_seed)
    return {
        "objective_before": j_before,
        "objective_after": j_after,
        "gap": j_after - j_before,
        "iterations": refined.iterations,
    }


def plot(gaps: dict[str, dict[str, Tensor]], title: str):
    """Per-state gap, box and points per planner; Ĵ after vs before per state."""
    fig, axes = new_figure(1, 2, size=(5.2, 4.2))
    ax = axes[0][0]
    names = list(gaps)
    data = [gaps[n]["gap"].double().numpy() for n in names]
    ax.boxplot(data, showfliers=False, widths=0.5, medianprops={"color": "k"})
    ax.set_xticks(range(1, len(names) + 1), names)
    generator = torch.Generator().manual_seed(0)
    for i, d in enumerate(data, start=1):
        jitter = 0.08 * torch.randn(len(d), generator=generator).numpy()
        ax.plot(i + jitter, d, "o", ms=3, alpha=0.5, color=f"C{i - 1}")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylabel("gap = Ĵ(λ after) − Ĵ(λ before) (reward units)")
    ax.set_title("amortization gap per state (box: quartiles, points: states)", fontsize="medium")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[0][1]
    for i, name in enumerate(names):
        g = gaps[name]
        ax.plot(
            g["objective_before"],
            g["objective_after"],
            "o",
            ms=3,
            alpha=0.6,
            color=f"C{i}",
            label=f"{name}: mean gap {float(g['gap'].mean()):.3g}",
        )
    lo = min(
        float(torch.cat([g["objective_before"], g["objective_after"]]).min()) for g in gaps.values()
    )
    hi = max(
        float(torch.cat([g["objective_before"], g["objective_after"]]).max()) for g in gaps.values()
    )
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="no gain (after = before)")
    ax.set_xlabel("Ĵ(λ before): amortized λ (reward units)")
    ax.set_ylabel("Ĵ(λ after): refined λ (reward units)")
    ax.set_title("Ĵ per state before and after refinement", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def finetuned(setup: Setup, objective: Objective, opts: GapOptions) -> tuple[Planner, str]:
    """The direct policy fine-tuned on ``objective`` (:func:`mbplan.fit.finetune_direct`).

    Returns:
        (the fine-tuned copy, a line saying how it was trained).
    """
    seed = opts.seed + FINETUNE_SEED_OFFSET
    train = on_policy_states(setup, opts.finetune_states, seed, opts.state_episodes)  # (N, S)
    start = time.perf_counter()
    policy, losses = finetune_direct(
        planner_for(setup, "direct", opts.objective),
        objective,
        train,
        opts.finetune_steps,
        opts.finetune_batch,
        opts.finetune_lr,
        seed,
    )
    n = min(50, len(losses))
    report = (
        f"{FINETUNED}: a copy of the direct policy trained {opts.finetune_steps} Adam steps "
        f"(lr {opts.finetune_lr:g}, batch {opts.finetune_batch}, K={objective.n_samples}) on "
        f"this Ĵ at {states_text(train.shape[0], opts.state_episodes, seed)}; loss (−Ĵ + "
        f"bound penalty) {statistics.fmean(losses[:n]):.4g} in the first {n} steps → "
        f"{statistics.fmean(losses[-n:]):.4g} in the last {n}; "
        f"{time.perf_counter() - start:.0f} s"
    )
    return policy, report


def _check(opts: GapOptions) -> None:
    sizes = (opts.states, opts.horizon, opts.patience, opts.max_iters, opts.eval_samples)
    if min(sizes) < 1 or opts.state_episodes < 1:
        raise UserError(
            "--states, --state-episodes, --horizon, --patience, --max-iters, --eval-samples "
            "must be >= 1"
        )
    if opts.lr <= 0 or opts.tol < 0:
        raise UserError("--lr must be > 0 and --tol >= 0")
    if opts.finetune_steps < 0 or min(opts.finetune_states, opts.finetune_batch) < 1:
        raise UserError(
            "--finetune-steps must be >= 0, --finetune-states and --finetune-batch >= 1"
        )
    if opts.finetune_lr <= 0:
        raise UserError("--finetune-lr must be > 0")


def run(opts: GapOptions) -> None:
    """Handler of ``mbplan bench gap``: prints mean ± std gap, writes the CSV and the figure."""
    _check(opts)
    setup = load(opts)
    objective = objective_for(setup, opts.objective, opts.horizon)
    states = on_policy_states(setup, opts.states, opts.seed, opts.state_episodes)  # (B, S)
    horizon = f", H={opts.horizon}" if opts.objective == "model" else ""
    refinement = (
        f"{opts.optimizer} lr {opts.lr:g}, patience {opts.patience}, tol {opts.tol:g}, "
        f"≤ {opts.max_iters} steps"
    )
    print(
        f"amortization gap on {setup.config['env']}: objective {opts.objective}{horizon}, "
        f"{states_text(states.shape[0], opts.state_episodes, opts.seed)}; refinement "
        f"{refinement}; Ĵ measured with {opts.eval_samples} samples per state",
        flush=True,
    )
    planners: dict[str, Planner] = {}
    for name in dict.fromkeys(opts.planners):
        planners[name] = planner_for(setup, name, opts.objective)
        if name == "direct" and opts.finetune_steps > 0:
            planners[FINETUNED], note = finetuned(setup, objective, opts)
            print(note, flush=True)
    gaps = {name: amortization_gap(objective, states, p, opts) for name, p in planners.items()}

    rows = []
    for name, g in gaps.items():
        gap = g["gap"].tolist()
        rows.append(
            {
                "planner": name,
                "J_before": statistics.fmean(g["objective_before"].tolist()),
                "J_after": statistics.fmean(g["objective_after"].tolist()),
                "gap_mean": statistics.fmean(gap),
                "gap_std": statistics.pstdev(gap),
                "gap_>_0": f"{sum(x > 0 for x in gap)}/{len(gap)}",
                "median_steps": int(g["iterations"].median()),
            }
        )
    print(format_table(rows))

    data = [
        {"planner": name, "state": i, **{k: v[i] for k, v in g.items()}}
        for name, g in gaps.items()
        for i in range(states.shape[0])
    ]
    csv = write_csv(out_path(opts, STEM, ".csv"), data, COLUMNS)
    tuned = f"; {FINETUNED}: {opts.finetune_steps} steps on this Ĵ" if FINETUNED in gaps else ""
    title = (
        f"{setup.config['env']}: amortization gap, {opts.objective} objective{horizon}, "
        f"{states.shape[0]} states\nrefinement: {refinement}{tuned}"
    )
    figures = save_figure(plot(gaps, title), opts, STEM)
    print(f"wrote {csv} and {', '.join(map(str, figures))}")


COMMAND = (
    "gap",
    "amortization gap per state: Ĵ after extra gradient steps − Ĵ of the amortized λ (Fig. 6)",
    GapOptions,
    run,
)
