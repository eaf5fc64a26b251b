"""Planning latency per action on a HalfCheetah-sized setup (S=17, A=6), one state.

Random-weight twin critic, dynamics, reward and direct future policy (the cost does not depend on
the weights). Prints ms per action for each planner at the given horizon, and where the time goes
for the iterative optimizer (objective evaluations with gradient vs the optimizer network).

    python benchmarks/plan_latency.py --horizon 5 --iters 5 --samples 10
"""

from __future__ import annotations

import argparse

import torch

import mbplan
from mbplan.bench.overhead import median_seconds
from mbplan.model_value import ModelValue
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.perf import tune_malloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--planners", nargs="+", default=["direct", "iterative", "adam", "cem"])
    args = p.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    S, A = 17, 6
    nets = [Dynamics(S, A), Reward(S, A), EnsembleQ(S, A)]
    policy = mbplan.make_planner("direct", state_dim=S, action_dim=A)
    for m in [*nets, policy]:
        m.requires_grad_(False).eval()
    value = ModelValue(*nets, policy, args.horizon, beta=1.0, alpha=0.1)
    objective = mbplan.make_objective(value, alpha=0.1, n_samples=args.samples, state_dim=S,
                                      action_dim=A)  # fmt: skip
    state = torch.randn(1, S)
    print(f"S={S} A={A} H={args.horizon} K={args.samples}, one state, {args.threads} thread(s)")
    for name in args.planners:
        planner = mbplan.make_planner(name, state_dim=S, action_dim=A)
        iters = 1 if name == "direct" else args.iters
        g = torch.Generator().manual_seed(0)

        def act(planner=planner, iters=iters, g=g):
            return planner.plan(objective, state, n_iters=iters, generator=g,
                                record_objective=False).dist.mode()  # fmt: skip

        seconds = median_seconds(act, args.repeats)
        print(f"{name:9s} I={iters:<3d} {1e3 * seconds:8.2f} ms/action (median)")

    # Where the iterative optimizer's time goes
    dist = mbplan.TanhNormal.initial(1, A)
    it = mbplan.make_planner("iterative", state_dim=S, action_dim=A)
    g = torch.Generator().manual_seed(0)
    t_eval = median_seconds(lambda: it.value_and_grad(objective, state, dist, g), args.repeats)
    _, gl, gs = it.value_and_grad(objective, state, dist, g)
    with torch.no_grad():
        t_net = median_seconds(lambda: it.propose(state, dist, gl, gs), args.repeats)
    print(f"iterative: Ĵ_MB + gradient {1e3 * t_eval:.2f} ms, "
          f"optimizer network {1e3 * t_net:.2f} ms per iteration")  # fmt: skip


if __name__ == "__main__":
    main()
