"""Reference training throughput of stable-baselines3 SAC, for comparison with mbplan.

Runs SB3 SAC with the settings mbplan's throughput benchmark uses (batch 256, one gradient update
per env step, uniformly random actions for the first ``warmup`` steps, 1e6 buffer, default 2x256
networks, CPU) and times only whole training steps after the warm-up: act + env step + replay
insert + one update.

    python benchmarks/sb3_reference.py --warmup 5000 --timed-updates 2000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time


def measure_sb3_sac(
    env_id: str = "HalfCheetah-v5",
    warmup: int = 5000,
    timed_updates: int = 2000,
    batch_size: int = 256,
    n_samples_hint: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> dict | None:
    """Measure stable-baselines3 SAC training steps per second after the random warm-up.

    SB3's loop for one env step ``n`` is: act, env step, ``callback.on_step`` (with
    ``num_timesteps == n``), then one gradient update if ``n > learning_starts``. The clock
    therefore runs from the callback at step ``warmup + 2`` to the callback at step
    ``warmup + 2 + timed_updates``, which covers exactly ``timed_updates`` updates and
    ``timed_updates`` acts + env steps, and leaves out the first policy act and the first update
    (one-off lazy setup), as mbplan's own measurement does. The run stops at the second mark.

    Args:
        env_id: Gymnasium environment id.
        warmup: Env steps with uniformly random actions before updates start (SB3's
            ``learning_starts``).
        timed_updates: Timed training steps, each with one env step and one update.
        batch_size: Replay batch size per update.
        n_samples_hint: mbplan's action-sample count K of the run being compared against; SB3
            SAC has no such setting (it is K = 1), so it is accepted for a uniform call signature
            and otherwise ignored.
        seed: Seed for SB3 (networks, env, action space).
        threads: If given, ``torch.set_num_threads(threads)`` before building the model.

    Returns:
        ``{"env_steps_per_s", "ms_per_step", "timed_steps", "warmup"}``, or None when
        stable-baselines3 is not importable.
    """
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError:
        return None
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if timed_updates < 1:
        raise ValueError(f"timed_updates must be >= 1, got {timed_updates}")

    start_step = warmup + 2
    end_step = start_step + timed_updates
    marks: dict[str, float] = {}

    class _Timer(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == start_step:
                marks["start"] = time.perf_counter()
            elif self.num_timesteps == end_step:
                marks["end"] = time.perf_counter()
                return False  # stop here: no untimed trailing update
            return True

    model = SAC(
        "MlpPolicy",
        env_id,
        learning_rate=3e-4,
        buffer_size=1_000_000,
        learning_starts=warmup,
        batch_size=batch_size,
        train_freq=1,
        gradient_steps=1,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    model.learn(total_timesteps=end_step, callback=_Timer())
    seconds = marks["end"] - marks["start"]
    return {
        "env_steps_per_s": timed_updates / seconds,
        "ms_per_step": 1e3 * seconds / timed_updates,
        "timed_steps": timed_updates,
        "warmup": warmup,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env-id", default="HalfCheetah-v5")
    p.add_argument("--warmup", type=int, default=5000, help="random steps before updates")
    p.add_argument("--timed-updates", type=int, default=2000, help="timed steps, one update each")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-samples-hint", type=int, default=1, help="ignored by SB3 (K = 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    result = measure_sb3_sac(
        args.env_id,
        args.warmup,
        args.timed_updates,
        args.batch_size,
        args.n_samples_hint,
        args.seed,
        args.threads,
    )
    if result is None:
        print("stable-baselines3 not installed (pip install stable-baselines3)")
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
