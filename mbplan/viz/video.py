"""``mbplan viz video``: an MPC episode beside the model's prediction of it, as an MP4.

One episode of receding-horizon control against Ĵ_MB (:func:`mbplan.mpc.run_mpc`), rendered
with MuJoCo offscreen. Left half: the real env at step t. Right half: the model's prediction of
that same step, made h = min(t, H) steps earlier by the plan at t − h (the mean over the K samples
of its final-iterate rollout), so the two halves show the same instant and their difference is the
h-step prediction error. The predicted pose is set from the predicted observation (qpos without
the root x/y ‖ qvel, as in the v5 locomotion envs); the root x/y, which the observation leaves out,
is the real one at t − h plus the predicted root velocities integrated over the h steps. Both
halves share one camera that follows the real robot, so a prediction running ahead shows as such.
Envs whose observation does not determine the pose get the real half only.

Outputs ``<out>/<stem>.mp4`` and ``<out>/<stem>.json`` (per step: reward, return, RMSE of the plan's
first predicted state against the real next state, and of the shown prediction).

Shapes: T steps · H horizon · K samples · S state dims.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mbplan.envs import check_env_matches, env_spec, make_env, render_frame, write_video
from mbplan.errors import UserError
from mbplan.mpc import (
    MPC,
    PlanSettings,
    check_trust,
    init_option,
    model_objective,
    planner_for,
    trust_option,
)
from mbplan.options import option
from mbplan.planners import PLANNERS
from mbplan.report import CommonOptions, load, out_path, write_json

#: Frames per second at most (envs with a small dt play slower than real time).
MAX_FPS = 60


@dataclass
class VideoOptions(CommonOptions):
    """Options of ``mbplan viz video``."""

    planner: str = option("iterative", "planner", choices=tuple(PLANNERS))
    horizon: int = option(5, "model rollout horizon H")
    max_steps: int = option(200, "steps of the episode")
    iters: int = option(0, "planner iterations per action (0 = the planner's default)")
    samples: int = option(0, "samples K per state (0 = 10)")
    init: str = init_option()
    trust: float = trust_option()
    stem: str = option("viz-video", "file name stem of the MP4 and the JSON")


# -- poses from observations -----------------------------------------------------------------------


@dataclass(frozen=True)
class PoseLayout:
    """Where the pose sits in an observation: obs = qpos[skipped:] ‖ qvel (‖ anything else).

    Attributes:
        skipped: Leading qpos entries left out of the observation (root x, or x and y).
        nq: Size of qpos.
        nv: Size of qvel.
    """

    skipped: int
    nq: int
    nv: int

    def root_velocity(self, obs: np.ndarray) -> np.ndarray:
        """Velocities of the skipped root coordinates (the first qvel entries), [skipped]."""
        n = self.nq - self.skipped
        return obs[n : n + self.skipped]

    def pose(self, obs: np.ndarray, root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(qpos [nq], qvel [nv]) of an observation, with the skipped coordinates ``root``."""
        n = self.nq - self.skipped
        return np.concatenate([root, obs[:n]]), obs[n : n + self.nv].copy()


def pose_layout(env, obs: np.ndarray) -> PoseLayout | None:
    """The :class:`PoseLayout` of a MuJoCo env, checked on its current state and observation.

    Returns:
        None when the observation does not hold qpos (less the root) and qvel in that order.
    """
    u = env.unwrapped
    structure = getattr(u, "observation_structure", None)
    model, data = getattr(u, "model", None), getattr(u, "data", None)
    if not structure or model is None or "qpos" not in structure or "qvel" not in structure:
        return None
    layout = PoseLayout(int(structure.get("skipped_qpos", 0)), int(model.nq), int(model.nv))
    n = layout.nq - layout.skipped
    if int(structure["qpos"]) != n or int(structure["qvel"]) != layout.nv:
        return None
    qpos, qvel = layout.pose(np.asarray(obs, dtype=np.float64), data.qpos[: layout.skipped])
    if not (np.allclose(qpos, data.qpos, atol=1e-5) and np.allclose(qvel, data.qvel, atol=1e-5)):
        return None
    return layout


# -- rendering -------------------------------------------------------------------------------------


def follow(env, lookat: np.ndarray | None = None) -> np.ndarray | None:
    """Point a MuJoCo env's free camera at ``lookat`` (x, y); default: its root body.

    Returns:
        The (x, y) looked at, or None for an env without a MuJoCo renderer.
    """
    u = env.unwrapped
    renderer = getattr(u, "mujoco_renderer", None)
    if renderer is None:
        return None
    if lookat is None:
        lookat = u.data.xpos[1][:2].copy()  # body 1: the root body
    if renderer.viewer is None:
        env.render()  # creates the viewer with the env's default camera
    renderer.viewer.cam.lookat[:2] = lookat
    return lookat


class _Recorder:
    """A transparent proxy of the real env that records what :func:`run_mpc` does with it."""

    def __init__(self, env):
        self.env = env
        self.obs: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.qpos: list[np.ndarray] = []  # before each step
        self.lookat: list[np.ndarray | None] = []  # of each rendered frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.obs, self.rewards, self.qpos, self.lookat = [obs], [], [], []
        return obs, info

    def step(self, action):
        data = getattr(self.env.unwrapped, "data", None)
        self.qpos.append(data.qpos.copy() if data is not None else np.zeros(0))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.obs.append(obs)
        self.rewards.append(float(reward))
        return obs, reward, terminated, truncated, info

    def render(self):
        self.lookat.append(follow(self.env))
        return self.env.render()


def label(frame: np.ndarray, lines: list[str]) -> np.ndarray:
    """``frame`` with ``lines`` of white text on a dark band at its top."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(image, "RGBA")
    size = max(12, frame.shape[0] // 30)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    draw.rectangle((0, 0, frame.shape[1], (size + 4) * len(lines) + 6), fill=(0, 0, 0, 150))
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * (size + 4)), line, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a - b))))


# -- the command -----------------------------------------------------------------------------------


def run(opts: VideoOptions) -> None:
    """Run one MPC episode; write it beside the model's predictions as an MP4, and a JSON."""
    if opts.horizon < 1 or opts.max_steps < 1 or opts.iters < 0 or opts.samples < 0:
        raise UserError("--horizon and --max-steps must be >= 1, --iters and --samples >= 0")
    trust = check_trust(opts.trust, opts.planner)
    setup = load(opts)
    H = opts.horizon
    objective, _ = model_objective(setup, H, opts.samples or None)
    planner = planner_for(setup, opts.planner, "model")
    env_id = setup.config["env"]

    # The episode, recorded
    env = make_env(env_id, seed=opts.seed, render=True)
    try:
        check_env_matches(env_spec(env), setup.config["env_spec"])
        rec = _Recorder(env)
        plans: list[dict] = []
        real_frames: list[np.ndarray] = []
        settings = PlanSettings(opts.iters or None, opts.init, trust)
        mpc = MPC(setup, planner, objective, settings, opts.seed)
        mpc.run(rec, 1, opts.max_steps, plans=plans, frames=real_frames)
        env.reset(seed=opts.seed)  # back to the first state, to check the pose layout on it
        layout = pose_layout(env, rec.obs[0])
    finally:
        env.close()
    dt = float(getattr(env.unwrapped, "dt", None) or setup.config["env_spec"].get("dt") or 1 / 30)

    # Predictions: the final-iterate rollout of each plan, mean over its K samples
    T = len(plans)
    pred = [p["rollouts"][-1].states[:, :, 0].mean(1).double().numpy() for p in plans]  # (H+1, S)
    obs = [np.asarray(o, dtype=np.float64) for o in rec.obs]
    returns = np.cumsum(rec.rewards)
    steps = []
    for t in range(T):
        t0 = max(0, t - H)
        steps.append(
            {
                "t": t,
                "reward": rec.rewards[t],
                "return": float(returns[t]),
                "one_step_rmse": _rmse(pred[t][1], obs[t + 1]),
                "shown_steps_ahead": t - t0,
                "shown_rmse": _rmse(pred[t0][t - t0], obs[t]),
            }
        )

    # Frames: real | predicted
    frames = []
    penv = make_env(env_id, seed=opts.seed, render=True) if layout else None
    try:
        if penv is not None:
            penv.reset(seed=opts.seed)
        for t, real in enumerate(real_frames):
            s = steps[t]
            left = label(real, [f"real  t={t}", f"return {s['return']:.1f}"])
            if penv is None:
                frames.append(left)
                continue
            t0, h = t - s["shown_steps_ahead"], s["shown_steps_ahead"]
            velocity = sum(
                (layout.root_velocity(pred[t0][j]) for j in range(1, h + 1)),
                np.zeros(layout.skipped),
            )
            qpos, qvel = layout.pose(pred[t0][h], rec.qpos[t0][: layout.skipped] + dt * velocity)
            if np.isfinite(qpos).all() and np.isfinite(qvel).all():
                penv.unwrapped.set_state(qpos, qvel)
                follow(penv, rec.lookat[t])
                right = render_frame(penv)
            else:
                right = np.zeros_like(real)
            right = label(
                right,
                [
                    f"model: t={t} predicted at t={t0} ({h} ahead)",
                    f"state RMSE vs real {s['shown_rmse']:.2f}",
                ],
            )
            gap = np.full((real.shape[0], 4, 3), 255, dtype=np.uint8)
            frames.append(np.concatenate([left, gap, right], axis=1))
    finally:
        if penv is not None:
            penv.close()

    fps = max(1, min(MAX_FPS, round(1 / dt)))
    video = out_path(opts, opts.stem, ".mp4")
    tmp = video.with_name(f".tmp-{video.name}")
    write_video(frames, str(tmp), fps=fps)
    os.replace(tmp, video)
    one_step = float(np.mean([s["one_step_rmse"] for s in steps]))
    data = write_json(
        out_path(opts, opts.stem, ".json"),
        {
            "env": env_id,
            "planner": opts.planner,
            "horizon": H,
            "steps": T,
            "return": float(returns[-1]),
            "fps": fps,
            "video": str(video),
            "right_half": (
                "model prediction of step t made by the plan at t - min(t, H) (mean over samples)"
                if layout
                else None
            ),
            "mean_one_step_rmse": one_step,
            "per_step": steps,
        },
    )
    print(
        f"{opts.planner} MPC on {env_id}, H={H}: {T} steps, return {returns[-1]:.1f}; "
        f"one-step state RMSE {one_step:.3f} (mean over steps)"
    )
    if not layout:
        print(f"note: {env_id}'s observation does not determine its pose; real episode only")
    print(f"wrote {video} ({len(frames)} frames at {fps} fps) and {data}")


COMMAND = ("video", "MP4 of an MPC episode beside the model's predicted rollout", VideoOptions, run)
