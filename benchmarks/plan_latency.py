"""Planning latency per action on a HalfCheetah-sized setup (S=17, A=6), one state.

Random-weight twin critic, dynamics, reward and direct future policy (the cost does not depend on
the weights). Prints ms per action for each planner at the given horizon, and where the time goes
for the iterative optimizer: the same plan as one function (eager, and torch.compile'd as
``mbplan plan --compile`` runs it), objective evaluations with gradient vs the optimizer network,
each network of one rollout step (forward + input gradient on K rows), and the matrix products alone
(the floor an implementation that removed every other op would still pay).

    python benchmarks/plan_latency.py --horizon 5 --iters 5 --samples 10
"""

from __future__ import annotations

import argparse
import time

import torch
from planner_overhead import median_seconds  # benchmarks/ is on sys.path when run as a script

import mbplan
from mbplan.fast.fast_plan import FastIterativePlan
from mbplan.fast.malloc import tune_malloc
from mbplan.model_value import ModelValue
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--planners", nargs="+", default=["direct", "iterative", "adam", "cem"])
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the compiled iterative plan (it compiles for 1–3 minutes)",
    )
    args = p.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    S, A = 17, 6
    nets = [Dynamics(S, A), Reward(S, A), EnsembleQ(S, A)]
    policy = mbplan.make_planner("direct", state_dim=S, action_dim=A)
    for m in [*nets, policy]:
        m.requires_grad_(False).eval()

    def make(fused: bool):
        value = ModelValue(*nets, policy, args.horizon, beta=1.0, alpha=0.1, fused=fused)
        return mbplan.make_objective(value, alpha=0.1, n_samples=args.samples, state_dim=S,
                                     action_dim=A)  # fmt: skip

    objective, reference = make(True), make(False)
    state = torch.randn(1, S)
    print(f"S={S} A={A} H={args.horizon} K={args.samples}, one state, {args.threads} thread(s)")
    print("Ĵ_MB evaluated by the fused rollout (mbplan's default); in brackets the autograd one")
    for name in args.planners:
        planner = mbplan.make_planner(name, state_dim=S, action_dim=A)
        iters = 1 if name == "direct" else args.iters
        times = []
        for obj in (objective, reference):
            g = torch.Generator().manual_seed(0)

            def act(planner=planner, iters=iters, g=g, obj=obj):
                return planner.plan(obj, state, n_iters=iters, generator=g,
                                    record_objective=False).dist.mode()  # fmt: skip

            times.append(median_seconds(act, args.repeats))
        print(f"{name:9s} I={iters:<3d} {1e3 * times[0]:8.2f} ms/action (median) "
              f"[autograd {1e3 * times[1]:.2f} ms, {times[1] / times[0]:.2f}×]")  # fmt: skip
        if name == "iterative":
            fast_rows(planner, objective, state, times[0], args)

    # Where the iterative optimizer's time goes
    dist = mbplan.TanhNormal.initial(1, A)
    it = mbplan.make_planner("iterative", state_dim=S, action_dim=A)
    g = torch.Generator().manual_seed(0)
    t_eval, t_ref = (
        median_seconds(lambda obj=obj: it.value_and_grad(obj, state, dist, g), args.repeats)
        for obj in (objective, reference)
    )
    _, gl, gs = it.value_and_grad(objective, state, dist, g)
    with torch.no_grad():
        t_net = median_seconds(lambda: it.propose(state, dist, gl, gs), args.repeats)
    print(f"iterative: Ĵ_MB + gradient {1e3 * t_eval:.2f} ms [autograd {1e3 * t_ref:.2f} ms], "
          f"optimizer network {1e3 * t_net:.2f} ms per iteration")  # fmt: skip
    breakdown(nets, policy, args)


def fast_rows(planner, objective, state, t_loop: float, args) -> None:
    """The same plan as one function (mbplan.fast.fast_plan): eager, and compiled (--compile)."""
    variants = [("one function", False)] + ([] if args.no_compile else [("compiled", True)])
    for label, compile in variants:
        fast = FastIterativePlan(planner, compile=compile)
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        fast.plan(objective, state, n_iters=args.iters, generator=g)  # compiles when asked
        first = time.perf_counter() - start

        def act(fast=fast, g=g):
            return fast.plan(objective, state, n_iters=args.iters, generator=g).dist.mode()

        t = median_seconds(act, args.repeats)
        note = f"; first call {first:.1f} s (compiling)" if compile else ""
        print(f"  iterative as {label:12s} {1e3 * t:8.2f} ms/action (median), "
              f"{t_loop / t:.2f}× the planner loop{note}")  # fmt: skip


def breakdown(nets, policy, args) -> None:
    """Per rollout step: each network's forward + input gradient on K rows; then GEMMs alone."""
    dynamics, reward, critic = nets
    K, S, A = args.samples, 17, 6
    s0, a0 = torch.randn(K, S), torch.randn(K, A)

    def fwd_bwd(fn):
        def run():
            s, a = s0.clone().requires_grad_(), a0.clone().requires_grad_()
            torch.autograd.grad(fn(s, a).sum(), [s, a])

        return run

    parts = {
        "future policy + sample": lambda s, a: policy(s).rsample_log_prob(1)[2] + a.sum(),
        "dynamics": dynamics,
        "reward": reward,
        "critics + pessimism": lambda s, a: mbplan.pessimistic(critic(s, a), 1.0),
    }
    total = 0.0
    for name, fn in parts.items():
        t = median_seconds(fwd_bwd(fn), args.repeats)
        total += t
        print(f"  per rollout step, {name:24s} {1e3 * t:6.2f} ms (forward + gradient, {K} rows)")
    print(f"  one rollout step {1e3 * total:.2f} ms × H = {args.horizon}: "
          f"{1e3 * total * args.horizon:.1f} ms per evaluation")  # fmt: skip

    # The matrix products of one evaluation alone: forward of every linear layer at every step,
    # and one input-gradient product per layer (weights are frozen: no weight gradients)
    linears = [m for net in (policy.net, dynamics.net, reward.net) for m in net
               if isinstance(m, torch.nn.Linear)]  # fmt: skip
    shapes = [(m.in_features, m.out_features, 1) for m in linears]
    shapes += [(layer.weight.shape[1], layer.weight.shape[2], critic.n_members)
               for layer in [*critic.hidden, critic.head]]  # fmt: skip
    mats = [(torch.randn(E, K, i), torch.randn(E, i, o), torch.randn(E, K, o), torch.randn(E, o, i))
            for i, o, E in shapes]  # fmt: skip

    def gemms():
        for x, w, g, wt in mats:
            torch.bmm(x, w)
            torch.bmm(g, wt)

    t = median_seconds(gemms, args.repeats) * args.horizon
    print(f"  matrix products alone ({2 * len(mats) * args.horizon} per evaluation): "
          f"{1e3 * t:.2f} ms per evaluation, {1e3 * t * args.iters:.1f} ms per action")  # fmt: skip


if __name__ == "__main__":
    main()
