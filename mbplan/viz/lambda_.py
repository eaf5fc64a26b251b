"""The iterative optimizer's λ over its iterations along an episode, and ΔĴ per iteration (Fig. 4).

Receding-horizon control with the run's iterative optimizer: at each of ``--steps`` env steps it
plans from λ_0 = (μ = 0, σ = 0.5) for ``--iters`` iterations, every iterate λ_k = (μ_k, log σ_k)
is recorded, and the env takes tanh(μ_I). One action dim's pre-tanh μ_k and σ_k are drawn against
the env step, one line per iterate k (in two panels: a ±σ band would hide the moves of μ).

Ĵ(λ_k) is the planner's own trace (``record_objective=True``, K samples per evaluation) or, with
``--eval-samples M`` (the default), a re-evaluation of every iterate with M samples and the same
noise for all k of a step (common random numbers), so that ΔĴ_k = Ĵ(λ_{k+1}) − Ĵ(λ_k) is not
swamped by sampling noise.

Shapes: T env steps · I iterations (I + 1 iterates) · S state dims · A action dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mbplan.distributions import TanhNormal
from mbplan.envs import make_env
from mbplan.errors import UserError
from mbplan.mpc import planner_for
from mbplan.objective import Objective
from mbplan.options import option
from mbplan.planners import Planner
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

COLUMNS = ("step", "iteration", "loc", "scale", "objective")


@dataclass
class LambdaOptions(CommonOptions):
    """Options of ``mbplan viz lambda``."""

    objective: str = option("model-free", "objective Ĵ optimized", choices=OBJECTIVE_KINDS)
    steps: int = option(50, "env steps of the episode to plan and record")
    iters: int = option(0, "optimizer iterations per step (0 = its own N)")
    dim: int = option(0, "action dim whose λ is drawn")
    eval_samples: int = option(
        100, "samples M to re-evaluate Ĵ at every iterate (0 = the planner's own trace)"
    )
    samples: int = option(0, "samples K per state in Ĵ while planning (0 = 10)")
    horizon: int = option(2, "model rollout horizon H (--objective model)")


@dataclass
class LambdaTrace:
    """Every iterate of every planned step.

    Attributes:
        loc: μ_k [T, I+1, A].
        log_scale: log σ_k [T, I+1, A].
        objective: Ĵ(λ_k) [T, I+1].
        episode_return: Return of the recorded stretch.
    """

    loc: torch.Tensor
    log_scale: torch.Tensor
    objective: torch.Tensor
    episode_return: float


def iterate_values(
    objective: Objective,
    state: torch.Tensor,
    loc: torch.Tensor,
    log_scale: torch.Tensor,
    n_samples: int,
    seed: int,
) -> torch.Tensor:
    """Ĵ at each iterate λ_k [I+1, A] of one state [1, S], the same noise for every k; [I+1]."""
    values = []
    with torch.no_grad():
        for k in range(loc.shape[0]):
            generator = torch.Generator().manual_seed(seed)  # common random numbers across k
            dist = TanhNormal(loc[k : k + 1], log_scale[k : k + 1])  # (1, A)
            values.append(objective(state, dist, n_samples, generator).value[0])
    return torch.stack(values)


def record_episode(
    setup,
    planner: Planner,
    objective: Objective,
    steps: int,
    iters: int | None,
    eval_samples: int,
    seed: int,
) -> LambdaTrace:
    """Plan at each real state of one episode (up to ``steps``), act tanh(μ_I), keep the trace."""
    env = make_env(setup.config["env"], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    locs, log_scales, values, total = [], [], [], 0.0
    for t in range(steps):
        state = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)  # (1, S)
        # Plan, recording Ĵ at every iterate
        result = planner.plan(
            objective, state, n_iters=iters, generator=generator, record_objective=True
        )
        trace = result.trace
        loc, log_scale = trace.loc[:, 0], trace.log_scale[:, 0]  # (I+1, A)
        if eval_samples:
            value = iterate_values(objective, state, loc, log_scale, eval_samples, seed + 1 + t)
        else:
            value = trace.objective[:, 0]  # (I+1,)
        locs.append(loc)
        log_scales.append(log_scale)
        values.append(value)

        # Act with the final mean
        obs, reward, terminated, truncated, _ = env.step(result.dist.mode().reshape(-1).numpy())
        total += float(reward)
        if terminated or truncated:
            break
    env.close()
    return LambdaTrace(
        loc=torch.stack(locs),  # (T, I+1, A)
        log_scale=torch.stack(log_scales),  # (T, I+1, A)
        objective=torch.stack(values),  # (T, I+1)
        episode_return=total,
    )


@dataclass
class DeltaRow:
    """ΔĴ of one iteration over the recorded steps."""

    iteration: str
    mean: float
    std: float
    improved: float


def run(opts: LambdaOptions) -> None:
    """Record λ along an episode, write ``lambda.csv`` and ``lambda.png``, print ΔĴ per step."""
    if opts.steps < 1:
        raise UserError(f"--steps must be >= 1, got {opts.steps}")
    if opts.iters < 0 or opts.samples < 0 or opts.eval_samples < 0:
        raise UserError("--iters, --samples and --eval-samples must be >= 0")
    setup = load(opts)
    A = setup.action_dim
    if not 0 <= opts.dim < A:
        raise UserError(f"--dim {opts.dim} out of range: the action has {A} dims")
    planner = planner_for(setup, "iterative", opts.objective)
    source = next((k for k, p in setup.optimizers.items() if p is planner), "agent's own")
    objective = objective_for(setup, opts.objective, opts.horizon, opts.samples or None)
    rec = record_episode(
        setup, planner, objective, opts.steps, opts.iters or None, opts.eval_samples, opts.seed
    )
    T, I1, _ = rec.loc.shape
    loc = rec.loc[:, :, opts.dim].numpy()  # (T, I+1)
    scale = rec.log_scale[:, :, opts.dim].exp().numpy()  # (T, I+1)
    value = rec.objective.numpy()  # (T, I+1)
    rows = [
        {
            "step": t,
            "iteration": k,
            "loc": loc[t, k],
            "scale": scale[t, k],
            "objective": value[t, k],
        }
        for t in range(T)
        for k in range(I1)
    ]
    csv_path = write_csv(out_path(opts, "lambda", ".csv"), rows, COLUMNS)
    delta = np.diff(value, axis=1)  # (T, I)
    figures = _plot(opts, setup, loc, scale, delta, source)

    summary = [
        DeltaRow(f"{k}→{k + 1}", float(np.nanmean(d)), float(np.nanstd(d)), float(np.mean(d > 0)))
        for k, d in enumerate(delta.T)
    ]
    how = f"re-evaluated with {opts.eval_samples} samples" if opts.eval_samples else "planner trace"
    print(
        f"λ over iterations on {setup.config['env']}: iterative optimizer ({source}) on the "
        f"{opts.objective} objective, {T} env steps, {I1 - 1} iterations per step; "
        f"return of the stretch {rec.episode_return:.1f}"
    )
    print(f"ΔĴ = Ĵ(λ_k+1) − Ĵ(λ_k) per iteration over the steps ({how}; improved = fraction > 0)")
    print(format_table(summary))
    print(f"wrote {csv_path} and {', '.join(map(str, figures))}")


def _plot(
    opts: LambdaOptions, setup, loc: np.ndarray, scale: np.ndarray, delta: np.ndarray, source: str
) -> list:
    import matplotlib

    fig, axes = new_figure(1, 3, size=(5.4, 4.4))
    mu_ax, sigma_ax, dj = axes[0]
    T, I1 = loc.shape
    cmap = matplotlib.colormaps["viridis"]
    steps = np.arange(T)
    for k in range(I1):
        color = cmap(k / max(1, I1 - 1))
        width = 2.0 if k in (0, I1 - 1) else 1.0
        mu_ax.plot(steps, loc[:, k], color=color, lw=width, label=f"λ_{k}")
        sigma_ax.plot(steps, scale[:, k], color=color, lw=width, label=f"λ_{k}")
    for ax in (mu_ax, sigma_ax):
        ax.set_xlabel("env step")
    mu_ax.set_ylabel(f"pre-tanh mean μ_k, action dim {opts.dim}")
    sigma_ax.set_ylabel(f"pre-tanh std σ_k, action dim {opts.dim}")
    mu_ax.set_title(
        f"{setup.config['env']}: iterate λ_k = (μ_k, σ_k) at each step\n"
        f"iterative optimizer ({source}), {opts.objective} Ĵ; acts with tanh(μ_{I1 - 1})",
        fontsize="medium",
    )
    sigma_ax.set_title("σ_k (λ_0 starts at σ = 0.5)\none line per iterate k", fontsize="medium")
    mu_ax.legend(title="iterate", fontsize="x-small", ncol=2, loc="best")

    positions = np.arange(1, I1)
    dj.boxplot(
        [d[np.isfinite(d)] for d in delta.T],
        positions=positions,
        widths=0.5,
        showmeans=True,
        flierprops={"markersize": 2},
        meanprops={"marker": "^", "markerfacecolor": "k", "markeredgecolor": "k"},
        medianprops={"color": "k"},
    )
    dj.axhline(0.0, color="k", lw=0.8, ls="--")
    spread = np.nanpercentile(np.abs(delta), 90, axis=0)  # (I,)
    symlog = spread.max() > 20 * max(spread.min(), 1e-12)
    if symlog:  # the first iteration's jump would flatten the others
        dj.set_yscale("symlog", linthresh=max(float(np.nanmedian(np.abs(delta))), 1e-6))
        lo, hi = float(np.nanmin(delta)), float(np.nanmax(delta))
        dj.set_ylim(lo * 2 if lo < 0 else lo / 2, hi * 2 if hi > 0 else hi / 2)
    dj.set_xticks(positions, [f"{k}→{k + 1}" for k in range(I1 - 1)])
    dj.set_xlabel("iteration k → k+1")
    dj.set_ylabel("ΔĴ = Ĵ(λ_k+1) − Ĵ(λ_k)" + (" (symlog scale)" if symlog else ""))
    how = f"{opts.eval_samples} common-noise samples" if opts.eval_samples else "planner's trace"
    dj.set_title(
        f"ΔĴ per iteration over {T} steps (Ĵ from {how})\nbox: quartiles, ▲ mean",
        fontsize="medium",
    )
    return save_figure(fig, opts, "lambda")


COMMAND = (
    "lambda",
    "λ (μ ± σ of one action dim) over the iterative optimizer's iterations, ΔĴ (Fig. 4a, b)",
    LambdaOptions,
    run,
)
