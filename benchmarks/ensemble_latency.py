"""Planning latency of an ensemble model vs one model at the same K, side by side (issue 17).

HalfCheetah-sized random-weight networks (S = 17, A = 6; the cost does not depend on the weights):
twin critic, direct future policy, and either one dynamics/reward model or an ensemble of E
members, at the same K samples and horizon H. Each round times every variant once, in turn (this
VM drifts by 10–30 %, so the sides alternate); the table gives the median over rounds of each
variant's median ms per plan (per action at B = 1 state) and its ratio to the single model.
``--states 1 64`` also plans 64 states at once, where the matmuls have rows enough to be bound by
arithmetic rather than by reading the weights (an ensemble has E× the model weights).

Variants: the iterative planner's loop through the fused rollout (``MBPLAN_FAST=0`` aside, the
path of scripts that call ``planner.plan``), the same plan as one function (``FastIterativePlan``,
``mbplan plan``'s default path; ``--compile`` adds the torch.compile'd one, as
``mbplan plan --compile``), and mppi (its own batched scoring, no fused rollout); each for the
single model and the ensemble with ``fixed`` propagation (member e runs the K/E·B rows of its
samples), ``mean`` propagation, and ``fixed`` with pessimism κ > 0 (every member on every row).

    python benchmarks/ensemble_latency.py --threads 1 --rounds 5
    python benchmarks/ensemble_latency.py --threads 1 --rounds 3 --compile --states 1 64 \
        --json benchmarks/results/ensemble_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from planner_overhead import median_seconds  # benchmarks/ is on sys.path when run as a script

import mbplan
from mbplan.checkpoint import atomic_write_text
from mbplan.fast.fast_plan import FastIterativePlan
from mbplan.fast.malloc import tune_malloc
from mbplan.model_value import ModelValue
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward

S, A = 17, 6
#: (label, ensemble members (0 = one model), propagation, κ)
MODELS = [
    ("single", 0, "fixed", 0.0),
    ("ensemble fixed", None, "fixed", 0.0),
    ("ensemble mean", None, "mean", 0.0),
    ("ensemble fixed κ=1", None, "fixed", 1.0),
]


def objectives(args) -> dict[str, mbplan.Objective]:
    """One Ĵ_MB per model variant, sharing the critic and future policy."""
    torch.manual_seed(0)
    critic = EnsembleQ(S, A).requires_grad_(False)
    policy = mbplan.make_planner("direct", state_dim=S, action_dim=A).requires_grad_(False)
    out = {}
    for label, members, propagation, kappa in MODELS:
        E = args.members if members is None else members
        if E:
            dyn, rew = EnsembleDynamics(S, A, E), EnsembleReward(S, A, E)
        else:
            dyn, rew = Dynamics(S, A), Reward(S, A)
        value = ModelValue(dyn.requires_grad_(False), rew.requires_grad_(False), critic, policy,
                           args.horizon, beta=1.0, alpha=0.1, propagation=propagation,
                           kappa=kappa)  # fmt: skip
        out[label] = mbplan.make_objective(
            value, alpha=0.1, n_samples=args.samples, state_dim=S, action_dim=A
        )
    return out


def variants(args, objs: dict) -> dict[tuple[str, str], object]:
    """(planner path, model) → a function that plans one action."""
    state = torch.randn(args.states, S)  # (B, S)
    iterative = mbplan.make_planner("iterative", state_dim=S, action_dim=A).requires_grad_(False)
    mppi = mbplan.make_planner("mppi", state_dim=S, action_dim=A)
    policy = next(iter(objs.values())).q_fn.future_policy
    fns = {}
    for label, obj in objs.items():
        g = torch.Generator().manual_seed(0)

        def loop(obj=obj, g=g):
            return iterative.plan(obj, state, n_iters=args.iters, generator=g,
                                  record_objective=False).dist.mode()  # fmt: skip

        fns[("iterative", label)] = loop
        for path, compile in [("iterative one function", False)] + (
            [("iterative compiled", True)] if args.compile else []
        ):
            fast = FastIterativePlan(iterative, compile=compile)
            fns[(path, label)] = lambda fast=fast, obj=obj, g=g: fast.plan(
                obj, state, n_iters=args.iters, generator=g
            ).dist.mode()
        if "mppi" in args.planners:
            fns[("mppi", label)] = lambda obj=obj, g=g: mppi.plan(
                obj, state, init=policy(state), generator=g, record_objective=False
            ).dist.mode()
    return fns


def time_variants(args, B: int) -> list[dict]:
    """Every variant planning B states at once: the table rows (ms per plan of B states)."""
    args.states = B
    fns = variants(args, objectives(args))
    for fn in fns.values():  # compile and warm up outside the timed rounds
        fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for r in range(args.rounds):
        for key, fn in fns.items():  # every variant once per round, in turn
            times[key].append(median_seconds(fn, args.repeats))
        print(f"B={B}: round {r + 1}/{args.rounds} done", flush=True)
    print(f"S={S} A={A} H={args.horizon} K={args.samples} E={args.members} I={args.iters}, "
          f"B={B} state(s) per plan, {args.threads} thread(s); median over {args.rounds} "
          f"alternating rounds of the median over {args.repeats} calls")  # fmt: skip
    rows = []
    for (path, label), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        single = 1e3 * statistics.median(times[(path, "single")])
        rows.append({"states": B, "path": path, "model": label, "ms_per_plan": ms,
                     "vs_single": ms / single, "rounds_ms": [1e3 * t for t in ts]})  # fmt: skip
        print(f"{path:24s} {label:20s} {ms:8.2f} ms/plan  {ms / single:5.2f}× single")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--states", type=int, nargs="+", default=[1], help="states B planned at once")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--planners", nargs="+", default=["iterative", "mppi"])
    p.add_argument("--compile", action="store_true", help="also the torch.compile'd plan")
    p.add_argument("--json", default="", help="write the table here as JSON")
    args = p.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    rows, states = [], args.states
    for B in states:
        rows += time_variants(args, B)

    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"} | {"states": states}
        atomic_write_text(Path(args.json), json.dumps({"settings": meta, "rows": rows}, indent=1))
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
