"""Per-step diagnostics of full MPC episodes: where and why planning episodes collapse.

Runs the iterative planner from the policy's proposal (as ``mbplan plan --init policy``) and logs,
per env step: the reward, one watched observation dim (HalfCheetah's body pitch, obs[1], by
default: |pitch| > π/2 means the cheetah is on its back), the KL from the policy's λ to the plan,
and Ĵ_MB(plan) − Ĵ_MB(policy) with common noise (the gain the model promises). Writes JSONL and
prints per episode its return, the step the watched dim first passed ``--flip``, and the mean KL and
promised gain in the 50 steps up to it.

    python benchmarks/plan_diagnostics.py --seed 5 --episodes 5 --out plan-diag-s5.jsonl
    python benchmarks/plan_diagnostics.py --seed 10 --trust 1.0 --out plan-diag-s10-trust1.jsonl

Its loop equals ``mbplan plan``'s except that the extra diagnostic evaluations draw their own
noise, so episodes differ from ``mbplan plan --seed S`` (MPC episodes are chaotic in such changes).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from mbplan.checkpoint import run_or_default
from mbplan.distributions import kl_between
from mbplan.envs import make_env
from mbplan.fast.malloc import tune_malloc
from mbplan.mpc import load_setup, model_objective, planner_for
from mbplan.objective import AnchoredObjective


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="", help="run folder (default: the bundled default)")
    p.add_argument("--planner", default="iterative")
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--trust", type=float, default=0.0, help="η of the trust region (0 = none)")
    p.add_argument("--watch", type=int, default=1, help="observation dim to log (HC: pitch)")
    p.add_argument("--flip", type=float, default=math.pi / 2, help="|obs[watch]| threshold")
    p.add_argument("--max-steps", type=int, default=0, help="cap per episode (0 = the env's)")
    p.add_argument("--out", default="plan-diagnostics.jsonl")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    setup = load_setup(run_or_default(args.checkpoint))
    objective, _ = model_objective(setup, args.horizon)
    planner = planner_for(setup, args.planner, "model")
    policy = setup.future_policy()
    env = make_env(setup.config["env"], seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    with open(args.out, "w") as f:
        for ep in range(args.episodes):
            obs, _ = env.reset(seed=args.seed + ep)
            rows, done, t = [], False, 0
            while not done:
                state = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)  # (1, S)
                with torch.no_grad():
                    proposal = policy(state)
                target = (
                    AnchoredObjective(objective, proposal, args.trust) if args.trust else objective
                )
                dist = planner.plan(target, state, init=proposal, generator=generator,
                                    record_objective=False).dist  # fmt: skip
                with torch.no_grad():  # the promised gain, with common noise for both
                    j_plan, j_policy = (
                        objective(state, d, generator=torch.Generator().manual_seed(t)).value.item()
                        for d in (dist, proposal)
                    )
                    kl = kl_between(dist, proposal).item()
                obs, reward, terminated, truncated, _ = env.step(dist.mode().reshape(-1).numpy())
                t += 1
                row = {"episode": ep, "t": t, "reward": float(reward),
                       "watch": float(obs[args.watch]), "kl_to_policy": kl,
                       "promised_gain": j_plan - j_policy}  # fmt: skip
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                done = terminated or truncated or t == args.max_steps
            f.flush()
            summarize(ep, rows, args.flip)


def summarize(ep: int, rows: list[dict], flip: float) -> None:
    """Print an episode's return and, if the watched dim passed ``flip``, when and after what."""
    total = sum(r["reward"] for r in rows)
    kl = np.array([r["kl_to_policy"] for r in rows])
    gain = np.array([r["promised_gain"] for r in rows])
    line = (f"episode {ep}: return {total:.1f}; KL to policy median {np.median(kl):.1f}, "
            f"promised gain median {np.median(gain):.2f}")  # fmt: skip
    flipped = next((i for i, r in enumerate(rows) if abs(r["watch"]) > flip), None)
    if flipped is not None:
        before = slice(max(0, flipped - 50), flipped + 1)
        line += (f"; |obs| > {flip:.2f} at step {flipped + 1} (50 steps up to it: KL "
                 f"{kl[before].mean():.1f}, promised gain {gain[before].mean():.2f})")  # fmt: skip
    print(line, flush=True)


if __name__ == "__main__":
    main()
