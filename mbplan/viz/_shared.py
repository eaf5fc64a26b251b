"""What the ``viz`` commands share: an on-policy state by index, the real env continued from it.

The on-policy states here are every 5th state visited by the run's direct policy (tanh μ) from
``reset(seed)``, one episode after another (the benchmarks'
:func:`mbplan.report.on_policy_states` spread theirs over several episodes instead). State ``i`` is
reached again by replaying the recorded actions from the reset of its episode, so the real env
can continue from it.

Shapes: S state dims · A action dims · T steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mbplan.errors import UserError
from mbplan.report import run_policy

#: On-policy states are every STRIDE-th step.
STRIDE = 5


@dataclass
class RealState:
    """One on-policy state and the way back to it in the real env.

    Attributes:
        state: The observation s, [S].
        index: Its index among the on-policy states.
        episode: Episode of the direct policy's run it was visited in (reset with seed + episode).
        actions: Actions taken since that episode's reset, [T, A].
    """

    state: Tensor
    index: int
    episode: int
    actions: Tensor


def n_states(setup) -> int:
    """How many on-policy state indices are allowed: the env's time limit over the stride."""
    limit = setup.config["env_spec"].get("max_episode_steps") or 1000
    return max(1, int(limit) // STRIDE)


def real_state(setup, index: int, seed: int) -> RealState:
    """On-policy state ``index``: step ``index · STRIDE`` of the direct policy from ``reset(seed)``.

    Raises:
        UserError: ``index`` outside [0, :func:`n_states`).
    """
    n = n_states(setup)
    if not 0 <= index < n:
        raise UserError(
            f"--state-index must be in [0, {n}) (on-policy states: every {STRIDE}th step "
            "of the direct policy)"
        )
    traj = run_policy(setup, index * STRIDE + 1, seed)
    i = index * STRIDE
    episode = int(traj.episode[i])
    start = i - int(traj.t[i])
    return RealState(traj.states[i], index, episode, traj.actions[start:i])


def replay_to(env, rs: RealState, seed: int) -> np.ndarray:
    """Reset ``env`` and replay the direct policy's actions up to ``rs``; returns the observation.

    Raises:
        UserError: The env ended before reaching the state, or reached another state.
    """
    obs, _ = env.reset(seed=seed + rs.episode)
    for action in rs.actions.numpy():
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            raise UserError("the replayed episode ended before the chosen state")
    if not np.allclose(obs, rs.state.numpy(), atol=1e-4):
        raise UserError("replaying the direct policy did not reach the chosen state again")
    return obs


def as_state(obs: np.ndarray) -> Tensor:
    """An env observation as a float32 state batch [1, S]."""
    return torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)


def state_names(env) -> list[str] | None:
    """Names of the observation dims of a MuJoCo env whose observation is qpos ‖ qvel (+ extras).

    E.g. ``"bfoot angle"`` or ``"rootx velocity"`` for HalfCheetah; None when unknown.
    """
    import mujoco

    u = env.unwrapped
    structure = getattr(u, "observation_structure", None)
    model = getattr(u, "model", None)
    if not structure or model is None or "qpos" not in structure or "qvel" not in structure:
        return None
    skipped = int(structure.get("skipped_qpos", 0))

    def joint_of(address: int, kind: str) -> str:
        adr = model.jnt_qposadr if kind == "qpos" else model.jnt_dofadr
        j = max(i for i in range(model.njnt) if adr[i] <= address)
        name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j) or f"joint{j}"
        sizes = {0: 7 if kind == "qpos" else 6, 1: 4 if kind == "qpos" else 3}  # free, ball
        size = sizes.get(int(model.jnt_type[j]), 1)
        return name if size == 1 else f"{name}[{address - adr[j]}]"

    names = [f"{joint_of(skipped + i, 'qpos')} pos" for i in range(int(structure["qpos"]))]
    names += [f"{joint_of(i, 'qvel')} vel" for i in range(int(structure["qvel"]))]
    extra = int(env.observation_space.shape[0]) - len(names)
    return names + [f"extra[{i}]" for i in range(extra)] if extra >= 0 else None
