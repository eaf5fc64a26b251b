"""Environment handling, all in one place: gymnasium env creation, action rescaling, rendering.

Agents see actions in (−1, 1)^A; :func:`make_env` maps them linearly to the env's bounds.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mbplan.errors import UserError

#: Headless GL backends in order of preference, with the shared library each needs.
_HEADLESS_GL = (("osmesa", "OSMesa"), ("egl", "EGL"))

#: Why offscreen rendering is off in this process ("" = it is not), for :func:`render_frame`.
_GL_MISSING = ""


def choose_gl(
    environ: Mapping[str, str], find_library: Callable[[str], str | None]
) -> tuple[str, str]:
    """The ``MUJOCO_GL`` backend to use, and why rendering is off ("" if it is not).

    Keeps the user's ``MUJOCO_GL`` (if its library is installed) or display ("" = leave as is).
    Otherwise OSMesa, else EGL; with neither installed, ``"disable"``: physics (training, planning)
    still runs and only rendering fails, with a one-line error, instead of ``import mujoco``.
    """
    chosen = environ.get("MUJOCO_GL", "").lower().strip()
    libs = dict(_HEADLESS_GL)
    if chosen in libs and find_library(libs[chosen]) is None:
        return "disable", f"MUJOCO_GL={chosen} but lib{libs[chosen]} is not installed"
    if chosen or environ.get("DISPLAY"):
        return "", ""
    for backend, lib in _HEADLESS_GL:
        if find_library(lib) is not None:
            return backend, ""
    return "disable", "no headless GL library found (install libosmesa6 or libegl1)"


def _default_gl() -> None:
    """Set ``MUJOCO_GL`` by :func:`choose_gl`, once, before MuJoCo is first imported."""
    global _GL_MISSING
    from ctypes.util import find_library

    if "mujoco" in sys.modules:
        return  # MuJoCo reads MUJOCO_GL once, at import
    backend, _GL_MISSING = choose_gl(os.environ, find_library)
    if backend == "disable":
        os.environ["MUJOCO_GL"] = backend
        os.environ.pop("PYOPENGL_PLATFORM", None)
    elif backend:
        os.environ["MUJOCO_GL"] = backend
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)


@dataclass(frozen=True)
class EnvSpec:
    """What an agent needs to know about an env.

    Attributes:
        env_id: Gymnasium id, e.g. ``HalfCheetah-v5``.
        state_dim: S.
        action_dim: A.
        dt: Simulation time per env step (seconds), or None if unknown.
        max_episode_steps: Time limit, or None.
    """

    env_id: str
    state_dim: int
    action_dim: int
    dt: float | None
    max_episode_steps: int | None


#: MuJoCo's own warnings (e.g. deprecated XML attributes of the stock models), kept here instead of
#: being printed on stderr, where they would break the CLI's one-line errors.
MUJOCO_WARNINGS: list[str] = []


def _quiet_mujoco() -> None:
    try:
        import mujoco
    except ImportError:
        return
    mujoco.set_mju_user_warning(lambda message: MUJOCO_WARNINGS.append(str(message).strip()))


def make_env(env_id: str, seed: int | None = None, render: bool = False):
    """Create a continuous-action gymnasium env with actions rescaled to (−1, 1).

    Args:
        env_id: Gymnasium id.
        seed: Seeds the action space (the first ``reset`` takes its own seed).
        render: Create it with ``render_mode="rgb_array"`` for offscreen frames.

    Returns:
        The wrapped env.

    Raises:
        UserError: Unknown id, or an env whose actions or observations are not 1-D boxes.
    """
    _default_gl()
    _quiet_mujoco()
    import gymnasium as gym

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            env = gym.make(env_id, render_mode="rgb_array" if render else None)
    except gym.error.Error as exc:
        raise UserError(f"unknown or unavailable env {env_id!r}: {exc}") from None
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"env {env_id!r} needs a missing dependency: {exc}") from None
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        env.close()
        raise UserError(f"env {env_id!r} does not have continuous (Box) actions; mbplan needs them")
    if (
        not isinstance(env.observation_space, gym.spaces.Box)
        or len(env.observation_space.shape) != 1
    ):
        env.close()
        raise UserError(f"env {env_id!r} needs a flat Box observation space")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def env_spec(env) -> EnvSpec:
    """The :class:`EnvSpec` of an env made by :func:`make_env`."""
    dt = getattr(env.unwrapped, "dt", None)
    spec = env.spec
    return EnvSpec(
        env_id=spec.id if spec is not None else "unknown",
        state_dim=int(env.observation_space.shape[0]),
        action_dim=int(env.action_space.shape[0]),
        dt=float(dt) if dt is not None else None,
        max_episode_steps=spec.max_episode_steps if spec is not None else None,
    )


def _is_mujoco(env) -> bool:
    """Whether ``env`` renders through MuJoCo (and so needs a GL backend)."""
    try:
        from gymnasium.envs.mujoco import MujocoEnv
    except ImportError:
        return False
    return isinstance(env.unwrapped, MujocoEnv)


def render_frame(env) -> np.ndarray:
    """One RGB frame [H, W, 3] of an env made with ``render=True``.

    Raises:
        UserError: Rendering is unavailable (e.g. a missing optional dependency or GL backend).
    """
    import gymnasium as gym

    if _GL_MISSING and _is_mujoco(env):
        raise UserError(f"cannot render {env.spec.id if env.spec else 'env'}: {_GL_MISSING}")
    try:
        return env.render()
    except (gym.error.Error, ImportError, RuntimeError) as exc:
        raise UserError(f"cannot render {env.spec.id if env.spec else 'env'}: {exc}") from None


def write_video(frames: list[np.ndarray], path: str, fps: int = 30) -> None:
    """Write RGB frames [H, W, 3] as an MP4 (imageio + ffmpeg)."""
    import imageio.v2 as imageio

    imageio.mimsave(path, frames, fps=fps, macro_block_size=1)


def check_env_matches(spec: EnvSpec, saved: dict[str, Any]) -> None:
    """Raise :class:`UserError` if an env's sizes differ from a checkpoint's."""
    if (spec.state_dim, spec.action_dim) != (saved["state_dim"], saved["action_dim"]):
        raise UserError(
            f"checkpoint was trained on S={saved['state_dim']}, A={saved['action_dim']} "
            f"({saved.get('env_id')}); {spec.env_id} has S={spec.state_dim}, A={spec.action_dim}"
        )
