"""Planner overhead on a small critic: time per iteration, per objective evaluation, states/s.

python benchmarks/planner_overhead.py --batch-sizes 1 256 4096

Every planner is run against the same frozen twin-Q objective (S=17, A=6, K=10 by default) and
compared with the cost of one bare objective evaluation with its gradient, so the planner's own
bookkeeping shows as the ratio ``overhead``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import mbplan
from mbplan.distributions import TanhNormal
from mbplan.models.critic import EnsembleQ
from mbplan.options import add_dataclass_args, from_namespace, option
from mbplan.report import format_table


@dataclass
class OverheadOptions:
    """Options of ``benchmarks/planner_overhead.py``."""

    batch_sizes: list[int] = option(
        None, "state batch sizes B", default_factory=lambda: [1, 256, 4096]
    )
    planners: list[str] = option(
        None, "planners to time", default_factory=lambda: ["direct", "iterative", "adam", "cem"]
    )
    iters: int = option(10, "iterations for adam and cem (direct 1, iterative 5)")
    state_dim: int = option(17, "state size S (17 = HalfCheetah)")
    action_dim: int = option(6, "action size A")
    samples: int = option(10, "samples per state K")
    repeats: int = option(3, "timed repeats per setting (the median is reported)")
    threads: int = option(0, "torch threads (0 = torch's default)")
    seed: int = option(0, "seed for weights and sampling noise")


@dataclass
class OverheadRow:
    """One (planner, B) measurement."""

    planner: str
    batch: int
    iters: int
    evals: float
    ms_per_iter: float
    ms_per_eval: float
    states_per_s: float
    overhead: float


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_overhead(opts: OverheadOptions) -> list[OverheadRow]:
    """Time each planner at each batch size; see :class:`OverheadOptions`."""
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    S, A = opts.state_dim, opts.action_dim
    critic = EnsembleQ(S, A).requires_grad_(False)
    objective = mbplan.make_objective(
        lambda s, a: mbplan.pessimistic(critic(s, a), beta=1.0),
        alpha=0.2,
        n_samples=opts.samples,
        state_dim=S,
        action_dim=A,
    )
    rows = []
    for B in opts.batch_sizes:
        states = torch.randn(B, S)
        generator = torch.Generator().manual_seed(opts.seed)

        def bare_eval(states=states, generator=generator, B=B):
            dist = TanhNormal.initial(B, A)
            dist.loc.requires_grad_()
            torch.autograd.grad(objective(states, dist, generator=generator).value.sum(), dist.loc)

        t_eval = median_seconds(bare_eval, opts.repeats)
        for name in opts.planners:
            planner = mbplan.make_planner(name, state_dim=S, action_dim=A)
            iters = planner.default_iters if name in ("direct", "iterative") else opts.iters

            def run(planner=planner, iters=iters, states=states, generator=generator):
                with torch.no_grad():
                    return planner.plan(
                        objective,
                        states,
                        n_iters=iters,
                        generator=generator,
                        record_objective=False,
                    )

            seconds = median_seconds(run, opts.repeats)
            evals = float(run().trace.n_evals[-1])
            ms_per_eval = 1e3 * seconds / evals if evals else float("nan")
            rows.append(
                OverheadRow(
                    planner=name,
                    batch=B,
                    iters=iters,
                    evals=evals,
                    ms_per_iter=1e3 * seconds / iters,
                    ms_per_eval=ms_per_eval,
                    states_per_s=B / seconds,
                    overhead=ms_per_eval / (1e3 * t_eval) if evals else float("nan"),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(parser, OverheadOptions)
    opts = from_namespace(OverheadOptions, parser.parse_args(argv))
    print(
        f"planner overhead: S={opts.state_dim} A={opts.action_dim} K={opts.samples}, "
        "twin-Q critic 2x256, CPU; overhead = ms/eval / bare objective+gradient ms"
    )
    print(format_table(run_overhead(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
