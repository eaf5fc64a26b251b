"""``mbplan viz plan``: planned trajectories over optimizer iterations (paper Fig. 8b, c).

One plan against Ĵ_MB, either read from a plans file of ``mbplan plan --save-plans FILE``
(``--step``: which recorded env step) or made live at an on-policy state (``--state-index``).
Every objective evaluation of the planner recorded one model rollout; the rollout of iterate λ_k is
drawn in the colour of k: chosen state dims, predicted rewards and Q̂ along the horizon (mean over
the K samples, band ± one std), beside Ĵ over the iterations. In black, the real trajectory that
followed: live, the real env continued from the state acting with tanh(μ_I) and then the future
policy's tanh(μ) (the deterministic counterpart of the rollout); from a file, the states recorded
at the following steps (the MPC's own actions; rewards and Q̂ are not in the file).

Outputs ``<out>/<stem>.json`` and ``<out>/<stem>.png``.

Shapes: I iterations · H horizon · K samples · S state dims · A action dims · T real steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from mbplan.checkpoint import load_plan_step
from mbplan.envs import check_env_matches, env_spec, make_env
from mbplan.errors import UserError
from mbplan.mpc import model_objective, planner_for
from mbplan.objective import pessimistic
from mbplan.options import option
from mbplan.planners import PLANNERS
from mbplan.report import CommonOptions, load, new_figure, out_path, save_figure, write_json
from mbplan.viz._shared import as_state, real_state, replay_to, state_names


@dataclass
class PlanVizOptions(CommonOptions):
    """Options of ``mbplan viz plan``."""

    plans: str = option("", "plans file of `mbplan plan --save-plans` (default: plan live)")
    step: int = option(0, "with --plans: which recorded env step")
    state_index: int = option(0, "live: on-policy state (every 5th step of the direct policy)")
    planner: str = option("iterative", "live: planner", choices=tuple(PLANNERS))
    horizon: int = option(5, "live: model rollout horizon H")
    iters: int = option(0, "live: planner iterations (0 = the planner's default)")
    samples: int = option(0, "live: samples K per state (0 = 10)")
    dims: list[int] = option(
        None, "state dims to plot (default: the two the plan changes most)", default_factory=list
    )
    stem: str = option("viz-plan", "file name stem of the outputs")


@dataclass
class PlanRecord:
    """One plan, iterate by iterate, and the real trajectory that followed.

    Attributes:
        states: Predicted s_0 … s_H of iterate k's rollout, [I+1, H+1, K, S].
        rewards: Predicted r̂_0 … r̂_{H−1}, [I+1, H, K].
        q: Q̂_β(s_t, a_t) along the rollout, [I+1, H+1, K].
        objective: Ĵ(s, λ_k), [I+1] (NaN where the planner did not evaluate it).
        loc: μ_k, [I+1, A].
        real_states: s_0 … s_{T−1} of the real env, [T, S].
        real_rewards: Real rewards r_0 … r_{T−2}, [T−1], or None (not recorded).
        real_q: Q̂_β at the real states and actions, [T], or None.
        where: Which state was planned at, for titles.
        names: Names of the state dims, where known.
    """

    states: Tensor
    rewards: Tensor
    q: Tensor
    objective: Tensor
    loc: Tensor
    real_states: Tensor
    real_rewards: Tensor | None
    real_q: Tensor | None
    where: str
    names: list[str] | None = None


def iterate_rollouts(n_rollouts: int, n_iters: int) -> list[tuple[int, int]]:
    """Pairs (iterate k, rollout j) for rollouts recorded in evaluation order.

    Every planner's k-th step evaluates λ_k (iterative, adam) or a population around it (cem),
    and the last evaluation is always at λ_I (the planner's or MPC's record-keeping one); the
    evaluations in between (e.g. the MPC's Ĵ(λ_0) for planners without one) are skipped.
    """
    if n_rollouts < 1:
        raise UserError("no model rollouts recorded (was the plan made against Ĵ_MB?)")
    first = min(n_iters, n_rollouts - 1)
    return [(k, k) for k in range(first)] + [(n_iters, n_rollouts - 1)]


def _stack(rollouts: list[dict[str, Tensor]], pairs: list[tuple[int, int]]) -> dict[str, Tensor]:
    """Rollout tensors of the listed iterates, batch element 0: states [I+1, H+1, K, S] etc.

    Where evaluations drew more samples (CEM's population), the first K of the smallest count
    are kept: they are i.i.d. draws from the same λ_k.
    """
    K = min(rollouts[j]["states"].shape[1] for _, j in pairs)
    return {
        name: torch.stack([rollouts[j][name][:, :K, 0] for _, j in pairs])
        for name in ("states", "rewards", "q")
    }


# -- from a plans file -----------------------------------------------------------------------------


def from_file(path: str, step: int) -> tuple[PlanRecord, str]:
    """Read recorded step ``step`` of a plans file (``mbplan plan --save-plans``).

    Returns:
        (the record, the planner's name from the file's metadata).

    Raises:
        UserError: Missing or corrupt file, or ``step`` out of range.
    """
    rec = load_plan_step(path, step)
    pairs = iterate_rollouts(len(rec.rollouts), rec.objective.shape[0] - 1)
    idx = [k for k, _ in pairs]
    record = PlanRecord(
        **_stack(rec.rollouts, pairs),
        objective=rec.objective[idx],
        loc=rec.loc[idx],
        real_states=rec.real_states,
        real_rewards=None,
        real_q=None,
        where=f"step {step} of {Path(path).name}",
    )
    return record, rec.planner


# -- live ------------------------------------------------------------------------------------------


def plan_live(opts: PlanVizOptions) -> tuple[PlanRecord, str]:
    """Plan at on-policy state ``--state-index`` against Ĵ_MB; continue the real env H steps.

    Returns:
        (the record, the planner's name).
    """
    if opts.horizon < 1 or opts.iters < 0 or opts.samples < 0:
        raise UserError("--horizon must be >= 1, --iters and --samples >= 0")
    setup = load(opts)
    objective, value = model_objective(setup, opts.horizon, opts.samples or None)
    planner = planner_for(setup, opts.planner, "model")
    rs = real_state(setup, opts.state_index, opts.seed)
    state = rs.state.unsqueeze(0)  # (1, S)

    # Plan, keeping one rollout per objective evaluation
    value.record = []
    generator = torch.Generator().manual_seed(opts.seed)
    result = planner.plan(objective, state, n_iters=opts.iters or None, generator=generator)
    rollouts = [{n: getattr(r, n) for n in ("states", "rewards", "q")} for r in value.record]
    value.record = None
    pairs = iterate_rollouts(len(rollouts), result.trace.n_iters)
    idx = [k for k, _ in pairs]

    # The real env from the same state: tanh(μ_I), then the future policy's tanh(μ)
    env = make_env(setup.config["env"], seed=opts.seed)
    check_env_matches(env_spec(env), setup.config["env_spec"])
    obs = replay_to(env, rs, opts.seed)
    policy = setup.future_policy()
    s_list, a_list, r_list = [as_state(obs)], [result.dist.mode()], []
    for _ in range(opts.horizon):
        obs, reward, terminated, _, _ = env.step(a_list[-1][0].numpy())
        r_list.append(float(reward))
        s_list.append(as_state(obs))
        with torch.no_grad():
            a_list.append(policy(s_list[-1]).mode())
        if terminated:
            break
    env.close()
    s, a = torch.cat(s_list), torch.cat(a_list)  # (T, S), (T, A)
    with torch.no_grad():
        real_q = pessimistic(setup.agent.target_critic(s, a), setup.agent.config.beta)  # (T,)
    record = PlanRecord(
        **_stack(rollouts, pairs),
        objective=result.trace.objective[idx, 0],
        loc=result.trace.loc[idx, 0],
        real_states=s,
        real_rewards=torch.tensor(r_list),
        real_q=real_q,
        where=f"on-policy state {opts.state_index} ({setup.config['env']})",
        names=state_names(env),
    )
    return record, opts.planner


# -- the figure ------------------------------------------------------------------------------------


def default_dims(states: Tensor, n: int = 2) -> list[int]:
    """The ``n`` state dims whose predictions vary most over iterations and samples.

    Args:
        states: Predicted states [I+1, H+1, K, S].
        n: How many dims.
    """
    _, H1, _, S = states.shape
    future = rearrange(states[:, 1:], "i h k s -> h (i k) s")  # (H, (I+1)·K, S)
    spread = future.std(1, unbiased=False).mean(0) if H1 > 1 else torch.zeros(S)  # (S,)
    return [int(i) for i in spread.argsort(descending=True)[: min(n, S)]]


def _band(ax, t: np.ndarray, values: Tensor, color, lw: float, band: bool) -> None:
    """Mean line over the samples (last axis), and a ± one std band if ``band``."""
    mean = values.mean(-1).numpy()
    if band:
        std = values.std(-1, unbiased=False).numpy()
        ax.fill_between(t, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
    ax.plot(t, mean, color=color, lw=lw)


def plot(record: PlanRecord, dims: list[int], planner: str):
    """The figure: one panel per state dim, rewards, Q̂, and Ĵ over the iterations."""
    import matplotlib as mpl

    I1, H1, K, _ = record.states.shape
    n_panels = len(dims) + 3
    ncols = 3
    nrows = -(-n_panels // ncols)
    fig, axes = new_figure(nrows, ncols, size=(4.6, 3.4))
    flat = list(axes.flat)
    colors = mpl.colormaps["viridis"](np.linspace(0.0, 0.9, I1))
    t_s, t_r = np.arange(H1), np.arange(H1 - 1)
    real_t = np.arange(record.real_states.shape[0])
    real_style = {"color": "black", "marker": "o", "ms": 3.5, "lw": 1.6, "label": "real"}

    # Predicted states, rewards and Q̂ along the horizon, one colour per iterate
    names = record.names or []
    series = [
        (
            f"state[{d}]" + (f": {names[d]}" if d < len(names) else ""),
            t_s,
            record.states[..., d],
            record.real_states[:, d],
        )
        for d in dims
    ]
    series.append(("reward r_t (model: r̂)", t_r, record.rewards, record.real_rewards))
    series.append(("Q̂_β(s_t, a_t)", t_s, record.q, record.real_q))
    for ax, (name, t, values, real) in zip(flat, series, strict=False):
        for k in range(I1):
            last = k == I1 - 1
            _band(ax, t, values[k], colors[k], lw=2.2 if last else 1.0, band=last or k == 0)
        if real is not None:
            ax.plot(real_t[: len(real)], real.numpy(), **real_style)
        ax.set_xlabel("steps ahead t")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(t_s)
        ax.grid(alpha=0.3)
    flat[0].legend(loc="best", fontsize=8)

    # Ĵ over the iterations
    ax = flat[n_panels - 1]
    k = np.arange(I1)
    j = record.objective.numpy()
    ok = np.isfinite(j)
    ax.plot(k[ok], j[ok], color="0.6", lw=1, zorder=1)
    ax.scatter(k[ok], j[ok], c=colors[ok], s=30, zorder=2, edgecolors="black", linewidths=0.4)
    ax.set_xlabel("iteration k")
    ax.set_title("Ĵ_MB(s, λ_k)", fontsize=10)
    ax.set_xticks(k if I1 <= 12 else k[:: -(-I1 // 10)])
    ax.grid(alpha=0.3)

    # Iteration colour scale
    cmap = mpl.colors.ListedColormap(colors)
    norm = mpl.colors.BoundaryNorm(np.arange(I1 + 1) - 0.5, I1)
    ticks = k if I1 <= 12 else k[:: -(-I1 // 10)]
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    if len(flat) > n_panels:  # in the first free grid cell
        for ax in flat[n_panels + 1 :]:
            ax.remove()
        spare = flat[n_panels]
        spare.axis("off")
        bar = fig.colorbar(mappable, cax=spare.inset_axes((0.05, 0.1, 0.07, 0.8)), ticks=ticks)
    else:
        bar = fig.colorbar(mappable, ax=flat, ticks=ticks, shrink=0.9)
    bar.set_label("optimizer iteration k (rollout of λ_k)", labelpad=8)
    real_note = "" if record.real_rewards is not None else "; real rewards and Q̂ not recorded"
    fig.suptitle(
        f"{planner} plans at {record.where}: H={H1 - 1}, K={K}; lines: mean over the samples, "
        f"bands ± std for λ_0 and λ_{I1 - 1}; black: real{real_note}",
        fontsize=10,
    )
    return fig


def _data(record: PlanRecord, dims: list[int], planner: str) -> dict:
    over_k = {"dim": 2, "unbiased": False}
    real = {"states": record.real_states, "rewards": record.real_rewards, "q": record.real_q}
    return {
        "where": record.where,
        "planner": planner,
        "dims": dims,
        "state_names": record.names,
        "iteration": list(range(record.states.shape[0])),
        "objective": record.objective,
        "loc": record.loc,
        "states_mean": record.states.mean(2),
        "states_std": record.states.std(**over_k),
        "rewards_mean": record.rewards.mean(2),
        "rewards_std": record.rewards.std(**over_k),
        "q_mean": record.q.mean(2),
        "q_std": record.q.std(**over_k),
        "real": real,
    }


def run(opts: PlanVizOptions) -> None:
    """Draw one plan's rollouts over the optimizer iterations; write the JSON and the figure."""
    if opts.plans:
        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        record, planner = from_file(opts.plans, opts.step)
    else:
        record, planner = plan_live(opts)
    S = record.states.shape[-1]
    dims = list(opts.dims) or default_dims(record.states)
    bad = [d for d in dims if not 0 <= d < S]
    if bad:
        raise UserError(f"--dims {bad} out of range: states have {S} dims")
    data = write_json(out_path(opts, opts.stem, ".json"), _data(record, dims, planner))
    figures = save_figure(plot(record, dims, planner), opts, opts.stem)
    j = record.objective.numpy()
    finite = j[np.isfinite(j)]
    rise = f"Ĵ {finite[0]:.3f} → {finite[-1]:.3f}" if finite.size else "Ĵ not recorded"
    print(
        f"{planner} plan at {record.where}: {record.states.shape[0] - 1} iterations, "
        f"H={record.states.shape[1] - 1}, K={record.states.shape[2]}; {rise}; "
        f"real trajectory of {record.real_states.shape[0] - 1} steps; state dims {dims}"
    )
    print(f"wrote {data} and {', '.join(map(str, figures))}")


COMMAND = (
    "plan",
    "planned trajectories and Ĵ over optimizer iterations (Fig. 8b, c)",
    PlanVizOptions,
    run,
)
