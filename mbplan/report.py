"""Shared reporting of ``mbplan bench``, ``mbplan viz`` and the CLI: states, objectives, outputs.

Every benchmark and figure runs on a planning setup (a run folder or the bundled default), on
states gathered by running the agent's direct policy in the real env, against either the
model-free objective (the run's pessimistic critics) or the model-based one (Ĵ_MB over H steps).
Results go to ``<out>/<stem>.csv`` (or ``.json``) and ``<out>/<stem>.png`` (``.svg`` on request).

Shapes: N states · S state dims · A action dims.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbplan.checkpoint import atomic_path, atomic_write_text, run_or_default
from mbplan.envs import make_env
from mbplan.errors import UserError
from mbplan.mpc import Setup, load_setup, model_free_objective, model_objective
from mbplan.objective import Objective
from mbplan.options import option

OBJECTIVE_KINDS = ("model-free", "model")
#: Episodes the benchmarks draw their on-policy states from (``--state-episodes``).
STATE_EPISODES = 5


@dataclass
class CommonOptions:
    """Options shared by every ``bench``/``viz`` subcommand (subclass and add your own)."""

    checkpoint: str = option("", "run folder or bundle (default: the bundled default)")
    out: str = option("mbplan-results", "folder for the data file and the figure")
    svg: bool = option(False, "also write the figure as SVG")
    seed: int = option(0, "seed of env resets and sampling noise")
    threads: int = option(1, "torch CPU threads (0 = one per core)")


@dataclass
class StateOptions(CommonOptions):
    """Common options plus where :func:`on_policy_states` draws the states from."""

    state_episodes: int = option(
        STATE_EPISODES, "episodes of the direct policy the on-policy states are spread over"
    )


def load(opts: CommonOptions) -> Setup:
    """The :class:`~mbplan.mpc.Setup` of ``opts.checkpoint`` (or the default); sets threads."""
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    return load_setup(run_or_default(opts.checkpoint))


def objective_for(
    setup, kind: str, horizon: int = 5, samples: int | None = None, lam: float = 0.9
) -> Objective:
    """Ĵ of ``kind`` ``"model-free"`` (the run's critics) or ``"model"`` (Ĵ_MB over H steps)."""
    if kind == "model-free":
        return model_free_objective(setup, samples)
    if kind == "model":
        return model_objective(setup, horizon, samples, lam)[0]
    raise UserError(f"unknown objective {kind!r}; choose from {', '.join(OBJECTIVE_KINDS)}")


@dataclass
class Trajectory:
    """Real states visited by the direct policy, one episode after another.

    Attributes:
        states: Observations [N, S] (float32).
        actions: Actions taken [N, A].
        rewards: Rewards received [N].
        episode: Episode index of each state [N].
        t: Step within its episode [N].
        sim_states: MuJoCo (qpos ‖ qvel) before each step [N, nq+nv], or None for non-MuJoCo envs.
    """

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    episode: torch.Tensor
    t: torch.Tensor
    sim_states: np.ndarray | None


def run_policy(
    setup,
    n_steps: int,
    seed: int = 0,
    stochastic: bool = False,
    env_id: str | None = None,
    episodes: int | None = None,
) -> Trajectory:
    """Run the direct policy (else the iterative agent) in the real env for ``n_steps`` steps.

    Args:
        setup: A loaded planning setup.
        n_steps: Steps to record.
        seed: Episode e is reset with seed + e; sampling (``stochastic``) is seeded too.
        stochastic: Act with samples of π instead of tanh(μ).
        env_id: Env to run (default: the run's).
        episodes: Stop earlier, once this many episodes have ended.
    """
    env = make_env(env_id or setup.config["env"], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    try:
        policy = setup.future_policy()
    except UserError:  # an iterative run with no direct network: act with the agent itself

        def policy(states: torch.Tensor):
            return setup.agent.policy(states, generator)

    mj = getattr(env.unwrapped, "data", None)
    rec: dict[str, list] = {k: [] for k in ("s", "a", "r", "ep", "t", "sim")}
    episode, (obs, _), t = 0, env.reset(seed=seed), 0
    while len(rec["s"]) < n_steps:
        state = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)  # (1, S)
        with torch.no_grad():
            dist = policy(state)
            action = dist.rsample(1, generator)[0][0] if stochastic else dist.mode()
        action = action.reshape(-1).numpy()
        if mj is not None:
            rec["sim"].append(np.concatenate([mj.qpos, mj.qvel]).copy())
        obs, reward, terminated, truncated, _ = env.step(action)
        for k, v in zip(("s", "a", "r", "ep", "t"), (state[0], action, reward, episode, t)):
            rec[k].append(v)
        t += 1
        if terminated or truncated:
            episode, t = episode + 1, 0
            if episodes is not None and episode >= episodes:
                break
            obs, _ = env.reset(seed=seed + episode)
    env.close()
    return Trajectory(
        states=torch.stack(rec["s"]),
        actions=torch.as_tensor(np.stack(rec["a"]), dtype=torch.float32),
        rewards=torch.as_tensor(rec["r"], dtype=torch.float32),
        episode=torch.as_tensor(rec["ep"]),
        t=torch.as_tensor(rec["t"]),
        sim_states=np.stack(rec["sim"]) if rec["sim"] else None,
    )


def spread_indices(lengths: Sequence[int], n: int) -> list[tuple[int, int]]:
    """``n`` (episode, t) pairs spread evenly over episodes of ``lengths`` steps and over time.

    Episodes take turns, so their counts differ by at most one (the first episodes take the
    extra ones) unless an episode is too short, whose share then goes to the others. Within an
    episode of T steps its n_e states sit at the centres of n_e equal stretches:
    t_j = ⌊(j + ½)·T / n_e⌋.

    Raises:
        UserError: The episodes hold fewer than ``n`` steps in all.
    """
    if sum(lengths) < n:
        raise UserError(f"{len(lengths)} episodes hold {sum(lengths)} states, fewer than {n}")
    E, counts, e = len(lengths), [0] * len(lengths), 0
    for _ in range(n):  # round robin over the episodes with steps left
        while counts[e] >= lengths[e]:
            e = (e + 1) % E
        counts[e], e = counts[e] + 1, (e + 1) % E
    return [
        (e, int((j + 0.5) * length / count))
        for e, (length, count) in enumerate(zip(lengths, counts))
        for j in range(count)
    ]


def on_policy_states(
    setup, n_states: int, seed: int = 0, episodes: int = STATE_EPISODES
) -> torch.Tensor:
    """``n_states`` real states [N, S] visited by the direct policy, from several whole episodes.

    Runs min(``episodes``, N) episodes to their end (episode e reset with seed + e) and picks the
    states by :func:`spread_indices`: evenly over the episodes and over time within each. The
    same arguments give the same states; sets drawn with seeds further apart than ``episodes``
    share no episode.

    Raises:
        UserError: ``n_states`` or ``episodes`` below 1, or episodes too short to hold N states.
    """
    if n_states < 1:
        raise UserError(f"--states must be >= 1, got {n_states}")
    if episodes < 1:
        raise UserError(f"--state-episodes must be >= 1, got {episodes}")
    E = min(episodes, n_states)
    limit = int(setup.config["env_spec"].get("max_episode_steps") or 1000)
    traj = run_policy(setup, E * limit, seed, episodes=E)
    lengths = torch.bincount(traj.episode, minlength=E)[:E]  # (E,) steps per episode
    starts = torch.cumsum(lengths, 0) - lengths  # (E,) index of each episode's first state
    index = [int(starts[e]) + t for e, t in spread_indices(lengths.tolist(), n_states)]
    return traj.states[index]  # (N, S)


def states_text(n_states: int, episodes: int, seed: int) -> str:
    """How :func:`on_policy_states` drew its states, for a report line."""
    E = min(episodes, n_states)
    seeds = f"seed {seed}" if E == 1 else f"seeds {seed}–{seed + E - 1}"
    return (
        f"{n_states} on-policy states from {E} episode{'s' if E > 1 else ''} "
        f"(resets {seeds}, spread evenly in time)"
    )


# -- outputs --------------------------------------------------------------------------------------


def out_path(opts: CommonOptions, stem: str, suffix: str) -> Path:
    """``<out>/<stem><suffix>``, creating the folder."""
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}{suffix}"


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with exactly ``columns`` as a CSV file (atomically)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _plain(v) for k, v in row.items()})
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` (tensors and arrays become lists) as indented JSON (atomically)."""
    atomic_write_text(path, json.dumps(_plain(data), indent=1))
    return path


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.2), **kw):
    """A matplotlib figure (Agg backend, no display needed) with ``nrows × ncols`` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(
        nrows,
        ncols,
        figsize=(size[0] * ncols, size[1] * nrows),
        squeeze=False,
        constrained_layout=True,
        **kw,
    )


def save_figure(fig, opts: CommonOptions, stem: str) -> list[Path]:
    """Save ``fig`` as ``<out>/<stem>.png`` (and ``.svg`` with ``--svg``); closes it."""
    import matplotlib.pyplot as plt

    paths = [out_path(opts, stem, ".png")]
    if opts.svg:
        paths.append(out_path(opts, stem, ".svg"))
    for p in paths:
        with atomic_path(p) as tmp:  # keeps the suffix matplotlib needs for the format
            fig.savefig(tmp, dpi=130)
    plt.close(fig)
    return paths


def format_table(rows: Sequence[Any]) -> str:
    """Left-aligned text table of dataclass rows (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    dicts = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    cols = list(dicts[0])

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(d[c]) for c in cols] for d in dicts]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
