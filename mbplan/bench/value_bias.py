"""Value overestimation bias: the agent's pessimistic Q̂ against Monte-Carlo soft returns (Fig. 3).

The agent's own policy (its final-iterate λ, sampled) is run in the real env. At every visited
state s_t with the action a_t it took, the Monte-Carlo soft return is the quantity the critic
regresses on (DESIGN.md §5, :meth:`mbplan.agent.Agent.critic_target`) unrolled to the end:

    G_t = r_t + Σ_{k≥1} γ^k (r_{t+k} − α·KL_{t+k}),   KL_j = log π(a_j|s_j) − log p(a_j)

(one-sample KL to the uniform prior p, α the run's learned value; the action a_t itself pays no KL
since Q is a function of it). It is compared with Q̂_β(s_t, a_t) = mean_E Q − β·std_E Q over the
run's target critics (the ones inside Ĵ), for each β of ``--betas``.

**Sign:** ``bias = Q̂ − G``; positive means the critic overestimates.

**Truncation:** the critic bootstraps through time limits, so its Q is an infinite-horizon value.
States are recorded for the first ``--episode-steps`` steps (default: the env's time limit), and
every episode is then run on for ``--min-remaining`` more steps past that point (ignoring the
time-limit flag; only a true termination stops it). Each recorded state therefore has at least
that many steps of future in G_t; the tail left out weighs γ^m of the rest (0.99³⁰⁰ ≈ 0.05).
States in an episode that terminates have the exact (untruncated) return.

Shapes: T steps of an episode · N recorded states · S state dims · A action dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mbplan.distributions import uniform_log_prob
from mbplan.envs import make_env
from mbplan.errors import UserError
from mbplan.objective import pessimistic
from mbplan.options import option
from mbplan.report import (
    CommonOptions,
    format_table,
    load,
    new_figure,
    out_path,
    save_figure,
    write_csv,
)

COLUMNS = ("beta", "state", "t", "q", "mc_return", "bias")


@dataclass
class ValueBiasOptions(CommonOptions):
    """Options of ``mbplan bench value-bias``."""

    betas: list[float] = option(
        None, "pessimism β values used to compute Q̂", default_factory=lambda: [0.0, 1.0, 2.5]
    )
    episodes: int = option(3, "episodes of the stochastic policy")
    episode_steps: int = option(0, "states recorded per episode (0 = the env's time limit)")
    min_remaining: int = option(
        300, "steps each episode runs past the recorded ones, so every return sees this many"
    )


@dataclass
class SoftRollout:
    """The recorded states of the policy's episodes with their Monte-Carlo soft returns.

    Attributes:
        states: s_t [N, S].
        actions: a_t taken [N, A] (in (−1, 1)).
        t: Step within the episode [N].
        mc_return: G_t [N].
        terminated: Episodes that ended by termination (exact returns).
    """

    states: torch.Tensor
    actions: torch.Tensor
    t: torch.Tensor
    mc_return: torch.Tensor
    terminated: int


def soft_returns(rewards: np.ndarray, kl: np.ndarray, gamma: float, alpha: float) -> np.ndarray:
    """G_t = r_t + γ(G_{t+1} − α·KL_{t+1}) backwards over one episode; G_{T−1} = r_{T−1}.

    Args:
        rewards: r_t [T].
        kl: One-sample KL_t = log π(a_t|s_t) − log p(a_t) [T].
        gamma: γ.
        alpha: α.

    Returns:
        G_t [T] (float64).
    """
    T = len(rewards)
    out = np.zeros(T)
    acc = 0.0  # G_{t+1} − α·KL_{t+1}, zero past the end
    for i in range(T - 1, -1, -1):
        out[i] = rewards[i] + gamma * acc
        acc = out[i] - alpha * kl[i]
    return out


def collect(setup, episodes: int, record_steps: int, extra_steps: int, seed: int) -> SoftRollout:
    """Run the agent's stochastic policy and compute G_t at the first ``record_steps`` states.

    Args:
        setup: A loaded planning setup.
        episodes: Episodes; episode e is reset with ``seed + e``.
        record_steps: States recorded per episode.
        extra_steps: Steps run past them (through the time limit) for the returns only.
        seed: Seeds resets and the policy's sampling noise.
    """
    agent = setup.agent
    gamma, alpha = float(agent.config.gamma), float(agent.alpha)
    log_prior = uniform_log_prob(setup.action_dim)
    env = make_env(setup.config["env"], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rec: dict[str, list] = {"s": [], "a": [], "t": [], "g": []}
    terminated_episodes = 0
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        states, actions, rewards, kls = [], [], [], []
        for _ in range(record_steps + extra_steps):
            state = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)  # (1, S)
            with torch.no_grad():
                dist = agent.policy(state, generator)
                action, _, log_prob = dist.rsample_log_prob(1, generator)  # (1, 1, A), (1, 1)
            obs, reward, terminated, _, _ = env.step(action.reshape(-1).numpy())
            states.append(state[0])
            actions.append(action[0, 0])
            rewards.append(float(reward))
            kls.append(float(log_prob) - log_prior)
            if terminated:  # a time-limit truncation is not an end: the critic bootstraps it
                terminated_episodes += 1
                break
        g = soft_returns(np.array(rewards), np.array(kls), gamma, alpha)
        n = min(record_steps, len(states))
        rec["s"] += states[:n]
        rec["a"] += actions[:n]
        rec["t"] += list(range(n))
        rec["g"] += g[:n].tolist()
    env.close()
    return SoftRollout(
        states=torch.stack(rec["s"]),  # (N, S)
        actions=torch.stack(rec["a"]),  # (N, A)
        t=torch.as_tensor(rec["t"]),
        mc_return=torch.as_tensor(rec["g"], dtype=torch.float64),
        terminated=terminated_episodes,
    )


def q_values(setup, states: torch.Tensor, actions: torch.Tensor, beta: float) -> torch.Tensor:
    """Q̂_β(s, a) over the run's target critics, [N]."""
    with torch.no_grad():
        return pessimistic(setup.agent.target_critic(states, actions), beta)  # (N,)


@dataclass
class BiasRow:
    """Summary of one β."""

    beta: float
    states: int
    mean_bias: float
    std_bias: float
    mean_q: float
    mean_mc: float


def run(opts: ValueBiasOptions) -> None:
    """Measure Q̂ − G per β, write ``value_bias.csv`` and ``value_bias.png``, print a summary."""
    if not opts.betas:
        raise UserError("--betas needs at least one value")
    if opts.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {opts.episodes}")
    if opts.episode_steps < 0 or opts.min_remaining < 0:
        raise UserError("--episode-steps and --min-remaining must be >= 0")
    setup = load(opts)
    limit = setup.config["env_spec"].get("max_episode_steps") or 1000
    record = opts.episode_steps or limit
    roll = collect(setup, opts.episodes, record, opts.min_remaining, opts.seed)

    rows, summary = [], []
    mc = roll.mc_return.numpy()
    for beta in dict.fromkeys(opts.betas):  # in order, without repeats
        q = q_values(setup, roll.states, roll.actions, beta).double().numpy()
        bias = q - mc
        rows += [
            {
                "beta": beta,
                "state": i,
                "t": int(roll.t[i]),
                "q": q[i],
                "mc_return": mc[i],
                "bias": bias[i],
            }
            for i in range(len(q))
        ]
        summary.append(
            BiasRow(
                beta,
                len(q),
                float(bias.mean()),
                float(bias.std()),
                float(q.mean()),
                float(mc.mean()),
            )
        )
    csv_path = write_csv(out_path(opts, "value_bias", ".csv"), rows, COLUMNS)
    figures = _plot(opts, rows, setup)

    alpha, gamma = float(setup.agent.alpha), setup.agent.config.gamma
    print(
        f"value bias Q̂ − MC soft return on {setup.config['env']} ({setup.agent.config.agent} "
        f"agent, trained with β={setup.agent.config.beta}); α={alpha:.3g}, γ={gamma}; "
        f"{len(mc)} states from {opts.episodes} episodes ({roll.terminated} terminated), "
        f"returns cover ≥ {opts.min_remaining} steps or reach termination "
        "(positive bias = overestimation)"
    )
    print(format_table(summary))
    for s in summary:
        print(f"β={s.beta:g}: bias {s.mean_bias:.3f} ± {s.std_bias:.3f}")
    print(f"wrote {csv_path} and {', '.join(map(str, figures))}")


def _plot(opts: ValueBiasOptions, rows: list[dict], setup) -> list:
    fig, axes = new_figure(1, 2)
    scatter, box = axes[0]
    betas = list(dict.fromkeys(r["beta"] for r in rows))
    colors = [f"C{i}" for i in range(len(betas))]
    mc = np.array([r["mc_return"] for r in rows if r["beta"] == betas[0]])
    biases = []
    for beta, color in zip(betas, colors):
        q = np.array([r["q"] for r in rows if r["beta"] == beta])
        scatter.scatter(mc, q, s=6, alpha=0.4, color=color, label=f"β = {beta:g}", linewidths=0)
        biases.append(q - mc)
    values = np.concatenate([mc, *(b + mc for b in biases)])
    lo, hi = float(values.min()), float(values.max())
    scatter.plot([lo, hi], [lo, hi], "k--", lw=1, label="Q̂ = MC (no bias)")
    scatter.set_xlabel("Monte-Carlo soft return G(s, a)")
    scatter.set_ylabel("pessimistic critic Q̂ = mean − β·std over critics")
    scatter.set_title(f"{setup.config['env']}: Q̂ vs Monte-Carlo, on-policy (s, a)")
    scatter.legend(markerscale=3, fontsize="small")

    parts = box.boxplot(
        biases,
        showmeans=True,
        patch_artist=True,
        widths=0.5,
        flierprops={"markersize": 2, "alpha": 0.4},
        meanprops={"marker": "^", "markerfacecolor": "k", "markeredgecolor": "k"},
        medianprops={"color": "k"},
    )
    for patch, color in zip(parts["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.6)
    box.axhline(0.0, color="k", lw=1, ls="--")
    box.set_xticks(range(1, len(betas) + 1), [f"{b:g}" for b in betas])
    box.set_xlabel("pessimism β used for Q̂")
    box.set_ylabel("bias Q̂ − MC  (> 0: overestimation)")
    box.set_title(
        f"bias per β (agent trained with β = {setup.agent.config.beta:g})\n"
        f"{len(mc)} states, returns over ≥ {opts.min_remaining} steps; box: quartiles, ▲ mean",
        fontsize="medium",
    )
    return save_figure(fig, opts, "value_bias")


COMMAND = (
    "value-bias",
    "pessimistic Q̂ − Monte-Carlo soft return on on-policy states, per β (Fig. 3)",
    ValueBiasOptions,
    run,
)
