"""Training loop: collect, update, evaluate, checkpoint, resume (DESIGN.md §5–§7).

The agent's value is model-free (the critics) or model-based (H-step rollouts, --value model).

A run folder holds ``config.json`` (every option and the mbplan version), ``metrics.jsonl`` (one
JSON object per line) and checkpoints (``ckpt-<step>/``: weights, optimizer state, replay buffer and
RNG state in safetensors, counters in JSON). ``resume`` continues from the newest completed one.

Each evaluation also logs ``policy_kl``, the rate of policy change (paper Fig. 3): the mean
KL(π_previous ‖ π_now) between the policies λ of successive evaluations on a fixed set of states
(the first :data:`POLICY_STATES` states of the replay at the first evaluation: the warm-up's,
the same after a resume). It is null at the first evaluation of a process (a resumed run has no
previous policy in memory).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mbplan
from mbplan.agent import Agent
from mbplan.checkpoint import (
    agent_tensors,
    atomic_write_text,
    check_env_spec,
    check_replay,
    check_rng,
    completed_checkpoints,
    find_checkpoint,
    is_empty_folder,
    load_agent,
    load_checkpoint,
    restore_agent,
    run_lock,
    save_checkpoint,
)
from mbplan.distributions import TanhNormal, kl_between
from mbplan.envs import check_env_matches, env_spec, make_env, render_frame, write_video
from mbplan.errors import UserError
from mbplan.fast.malloc import tune_malloc
from mbplan.options import TrainOptions
from mbplan.replay import ReplayBuffer

__all__ = [
    "DivergenceError",
    "TrainOptions",
    "Trainer",
    "check_memory",
    "eval_checkpoint",
    "evaluate",
]


class DivergenceError(UserError):
    """Training produced a non-finite loss or weight (nothing was saved from that point on)."""


def _newest_name(run_dir: Path) -> str:
    done = completed_checkpoints(run_dir)
    return done[-1].name if done else "none yet"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(opts: TrainOptions, S: int, A: int, available: int | None = None) -> None:
    """Refuse sizes that cannot be allocated here, with the estimate, before anything runs.

    Counts the replay buffer (B_max·(2S + A + 2) float32, once more while a checkpoint is
    written) and one update's activations (K·B rows through E critics of width H, N + 1 times for
    the iterative agent, a few copies for the backward pass).

    Raises:
        UserError: The estimate exceeds the available memory.
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    replay = 2 * opts.buffer_size * (2 * S + A + 2) * 4
    rows = opts.samples * opts.batch_size * ((opts.iters + 1) if opts.agent == "iterative" else 1)
    horizon = opts.horizon if opts.value == "model" else 1
    update = 8 * rows * horizon * (2 * 2 * 256 + S + A) * 4
    need = replay + update
    if need > 0.9 * available:
        raise UserError(
            f"these sizes need about {need / 2**30:.1f} GiB (replay {replay / 2**30:.1f} GiB for "
            f"--buffer-size {opts.buffer_size}, update {update / 2**30:.1f} GiB for --samples "
            f"{opts.samples} × --batch-size {opts.batch_size}); {available / 2**30:.1f} GiB is "
            "available"
        )


# -- evaluation ----------------------------------------------------------------------------------

#: States on which successive evaluations' policies are compared (``policy_kl``).
POLICY_STATES = 256


def evaluate(
    agent: Agent,
    env,
    episodes: int,
    seed: int,
    video_frames: list | None = None,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Deterministic (tanh μ) episodes; returns their undiscounted returns.

    If ``video_frames`` is a list, frames of the first episode are appended to it (the env must
    have been made with ``render=True``).
    """
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            if video_frames is not None and ep == 0:
                video_frames.append(render_frame(env))
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs, True, generator))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a blank or half-written one (a killed tail)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None


# -- the loop ------------------------------------------------------------------------------------


class Trainer:
    """Runs one training job in a run folder (fresh or resumed).

    Args:
        opts: :class:`TrainOptions`.
        resume: Continue from the newest completed checkpoint in ``opts.out``.
        on_progress: Called after every env step with (step, stats dict) — the CLI's progress bar.
        on_checkpoint: Called with the checkpoint folder after each one is written (sweeps).
    """

    def __init__(
        self,
        opts: TrainOptions,
        resume: bool = False,
        on_progress: Callable[[int, dict[str, Any]], None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
    ):
        opts.validate()
        self.opts, self.on_progress, self.on_checkpoint = opts, on_progress, on_checkpoint
        self.run_dir = Path(opts.out)
        self._lock: contextlib.AbstractContextManager | None = None
        self._stop_requested = False
        self._last_policy: TanhNormal | None = None  # λ on the fixed states at the last evaluation
        self._policy_states: torch.Tensor | None = None  # those states, [n, S]
        self._acquire()  # one writer per run folder, from here until run() ends or close()
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> None:
        if self._lock is None:
            lock = run_lock(self.run_dir, "train")
            lock.__enter__()
            self._lock = lock

    def close(self) -> None:
        """Release the run folder's lock (run() does so when it returns)."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def request_stop(self) -> None:
        """Ask :meth:`run` to write a checkpoint and return after the current env step.

        Safe to call from a signal handler (it only sets a flag): the CLI calls it on SIGINT and
        SIGTERM, so Ctrl-C never loses the steps since the last checkpoint.
        """
        self._stop_requested = True

    def _build(self, resume: bool) -> None:
        opts = self.opts
        if not resume and not is_empty_folder(self.run_dir):
            raise UserError(
                f"{self.run_dir} already holds a run: continue it with "
                f"`mbplan train --resume {self.run_dir}`, or pick another --out"
            )
        tune_malloc()
        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        self.device = torch.device(opts.device)
        torch.manual_seed(opts.seed)
        self.env = make_env(opts.env, seed=opts.seed)
        self.eval_env = make_env(opts.env, seed=opts.seed + 1)
        self.spec = env_spec(self.env)
        check_memory(opts, self.spec.state_dim, self.spec.action_dim)
        self.agent = Agent(self.spec.state_dim, self.spec.action_dim, opts.agent_config()).to(
            self.device
        )
        self.agent.compile_update = opts.compile
        self.buffer = ReplayBuffer(self.spec.state_dim, self.spec.action_dim, opts.buffer_size)
        self.generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        self.cpu_generator = torch.Generator().manual_seed(opts.seed + 7)
        self.step = 0
        self.episode = 0
        self.last_eval: float | None = None
        self.train_seconds = 0.0  # wall-clock spent in run(), summed over resumes
        if resume:
            self._resume()
        else:
            config = {**asdict(opts), "mbplan_version": mbplan.__version__}
            config["env_spec"] = asdict(self.spec)
            atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=1))
            (self.run_dir / "metrics.jsonl").write_text("")
        self._wandb = self._init_wandb() if opts.wandb else None

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of everything needed to continue (never one with non-finite weights).

        Raises:
            DivergenceError: A weight is NaN or infinite; the previous checkpoint is kept as it was.
        """
        if not self.agent.weights_finite():
            raise DivergenceError(
                f"training diverged at step {self.step}: non-finite weights; not saved, the last "
                f"good checkpoint is kept ({_newest_name(self.run_dir)})"
            )
        groups, optim_settings = agent_tensors(self.agent)
        groups["replay"] = self.buffer.state_dict()
        groups["rng"] = {
            "generator": self.generator.get_state(),
            "cpu_generator": self.cpu_generator.get_state(),
            "torch": torch.get_rng_state(),
        }
        meta = {
            "config": asdict(self.opts),
            "env_spec": asdict(self.spec),
            "mbplan_version": mbplan.__version__,
            "optimizers": optim_settings,
            "episode": self.episode,
            "last_eval": self.last_eval,
            "train_seconds": self.train_seconds,
        }
        return save_checkpoint(self.run_dir, self.step, groups, meta)

    def _resume(self) -> None:
        ckpt = find_checkpoint(self.run_dir)  # resolved once: a fallback warns once
        groups, meta = load_checkpoint(ckpt)
        where = f"checkpoint {ckpt}"
        check_env_matches(self.spec, check_env_spec(meta.get("env_spec"), where))
        for group in ("replay", "rng"):
            if group not in groups:
                raise UserError(f"cannot resume: {where} has no {group}.safetensors")
        counters = {k: meta.get(k) for k in ("step", "episode")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in counters.values()):  # fmt: skip
            raise UserError(f"corrupt {where}: step/episode counters {counters}")
        last_eval, seconds = meta.get("last_eval"), meta.get("train_seconds", 0.0)
        if not (last_eval is None or isinstance(last_eval, (int, float))) or not isinstance(
            seconds, (int, float)
        ):
            raise UserError(f"corrupt {where}: last_eval/train_seconds are not numbers")
        restore_agent(self.agent, groups, meta)
        check_replay(groups["replay"], self.spec.state_dim, self.spec.action_dim)
        check_rng(groups["rng"], ("generator", "cpu_generator", "torch"))
        self.buffer.load_state_dict(groups["replay"])
        self.generator.set_state(groups["rng"]["generator"])
        self.cpu_generator.set_state(groups["rng"]["cpu_generator"])
        torch.set_rng_state(groups["rng"]["torch"])
        self.step, self.episode = counters["step"], counters["episode"]
        self.last_eval = None if last_eval is None else float(last_eval)
        self.train_seconds = float(seconds)
        # Drop metric lines written after that checkpoint (the killed process's tail).
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if (step := _step_of(ln)) is not None and step <= self.step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        # config.json follows the resumed options (e.g. a new --steps)
        try:
            config = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if not isinstance(config, dict):
            config = {}
        config.update(asdict(self.opts), env_spec=asdict(self.spec))
        atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=1))

    # -- logging -------------------------------------------------------------------------------
    def _init_wandb(self):
        import os

        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        return wandb.init(
            project="mbplan", config=asdict(self.opts), dir=str(self.run_dir), resume="allow"
        )

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (and wandb when on)."""
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=record.get("step"))

    def policy_change(self) -> float | None:
        """Mean KL(π_previous ‖ π_now) on the fixed states since the last call (None at the first).

        The iterative agent's λ is its final iterate, planned with a fixed generator so that two
        evaluations differ only by the weights.
        """
        if self._policy_states is None:  # fixed at the process's first evaluation
            n = min(POLICY_STATES, len(self.buffer))
            self._policy_states = self.buffer.data["states"][:n].to(self.device)  # (n, S)
        generator = torch.Generator(device=self.device).manual_seed(0)
        policy = self.agent.policy(self._policy_states, generator)
        previous, self._last_policy = self._last_policy, policy
        if previous is None:
            return None
        return self._finite("policy_kl", kl_between(previous, policy).mean())

    def _model_warmup(self) -> None:
        opts, agent = self.opts, self.agent
        agent.fit_model_normalizers(self.buffer.ordered())
        totals: dict[str, float] = {}
        for _ in range(opts.model_warmup):
            batch = self.buffer.sample(opts.batch_size, self.cpu_generator).to(self.device)
            for k, v in agent.model_update(batch).items():
                totals[k] = totals.get(k, 0.0) + self._finite(k, v)
        n = max(opts.model_warmup, 1)
        self.log(
            {
                "step": self.step,
                "model_warmup": opts.model_warmup,
                **{f"warmup_{k}": v / n for k, v in totals.items()},
            }
        )

    def _finite(self, name: str, value: torch.Tensor | float) -> float:
        """``value`` as a float; :class:`DivergenceError` (nothing saved) if NaN or infinite."""
        x = float(value)
        if not math.isfinite(x):
            raise DivergenceError(
                f"training diverged at step {self.step}: {name} = {x}; stopped without saving, "
                f"the last good checkpoint is kept ({_newest_name(self.run_dir)})"
            )
        return x

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until ``opts.steps`` env steps (or :meth:`request_stop`); returns a summary.

        Raises:
            DivergenceError: A loss or weight became non-finite; the last good checkpoint is kept.
        """
        self._acquire()
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        opts, agent = self.opts, self.agent
        obs, _ = self.env.reset(seed=opts.seed * 100_003 + self.episode)
        ep_return, ep_len = 0.0, 0
        sums: dict[str, float] = {}
        n_updates, start, start_step = 0, time.perf_counter(), self.step
        seconds_before = self.train_seconds
        while self.step < opts.steps:
            # Act
            if self.step < opts.warmup:
                action = torch.rand(self.spec.action_dim, generator=self.cpu_generator) * 2 - 1
                action = action.numpy()
            else:
                action = agent.act(obs, deterministic=False, generator=self.generator)
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            self.buffer.add(obs, action, reward, next_obs, terminated)
            obs, ep_return, ep_len = next_obs, ep_return + float(reward), ep_len + 1
            self.step += 1
            self.train_seconds = seconds_before + time.perf_counter() - start
            if terminated or truncated:
                self.log(
                    {
                        "step": self.step,
                        "episode": self.episode,
                        "episode_return": ep_return,
                        "episode_length": ep_len,
                    }
                )
                self.episode += 1
                obs, _ = self.env.reset(seed=opts.seed * 100_003 + self.episode)
                ep_return, ep_len = 0.0, 0

            # Model warm-up: statistics from the random data, then model-only updates
            if self.step == opts.warmup + 1 and opts.value == "model":
                self._model_warmup()

            # Update
            if self.step > opts.warmup:
                batch = self.buffer.sample(opts.batch_size, self.cpu_generator).to(self.device)
                for k, v in agent.update(batch, self.generator).items():
                    sums[k] = sums.get(k, 0.0) + self._finite(k, v)
                n_updates += 1
                if self.step % opts.log_interval == 0:
                    record = {k: v / n_updates for k, v in sums.items()}
                    elapsed = time.perf_counter() - start
                    record.update(step=self.step, steps_per_s=(self.step - start_step) / elapsed)
                    self.log(record)
                    sums, n_updates = {}, 0

            # Evaluate and checkpoint
            if opts.eval_interval and self.step % opts.eval_interval == 0 and opts.eval_episodes:
                returns = evaluate(agent, self.eval_env, opts.eval_episodes, seed=10**6 + self.step)
                self.last_eval = float(np.mean(returns))
                std = float(np.std(returns))
                self.log(
                    {
                        "step": self.step,
                        "eval_return_mean": self.last_eval,
                        "eval_return_std": std,
                        "eval_returns": returns,
                        "policy_kl": self.policy_change(),
                        "train_seconds": self.train_seconds,
                    }
                )
            stop = self._stop_requested
            if self.step % opts.checkpoint_interval == 0 or self.step == opts.steps or stop:
                checkpoint = self.save()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(checkpoint)
            if self.on_progress is not None:
                self.on_progress(
                    self.step, {"eval": self.last_eval, "updating": self.step > opts.warmup}
                )
            if stop:
                break
        if self._wandb is not None:
            self._wandb.finish()
        elapsed = time.perf_counter() - start
        return {
            "steps": self.step,
            "episodes": self.episode,
            "last_eval": self.last_eval,
            "seconds": elapsed,
            "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9),
            "interrupted": self._stop_requested and self.step < opts.steps,
        }


def eval_checkpoint(
    checkpoint: str, episodes: int, seed: int, video: str | None, env_id: str | None = None
) -> list[float]:
    """Run deterministic episodes of a checkpoint's agent, optionally writing an MP4."""
    agent, config = load_agent(checkpoint)
    env = make_env(env_id or config["env"], seed=seed, render=video is not None)
    check_env_matches(env_spec(env), config["env_spec"])
    frames: list | None = [] if video else None
    returns = evaluate(agent, env, episodes, seed, frames)
    if video and frames:
        fps = round(1.0 / config["env_spec"]["dt"]) if config["env_spec"].get("dt") else 30
        write_video(frames, video, fps=fps)
    return returns
