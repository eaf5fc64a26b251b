"""The direct agent's update through each of its paths, interleaved in one process.

Times ``Agent.update`` (median ms over blocks of updates, HalfCheetah sizes: S = 17, A = 6,
batch 256, random replay data) with autograd, with the hand-written gradients of
``mbplan/fast/fused_sac.py``, and with those through ``torch.compile``; blocks alternate so that the
machine's drift hits every path alike. ``--shapes`` also times the matrix shapes that
``models/critic.py`` chooses between (MKL runs one-column products far below its peak).

    python benchmarks/update_paths.py --samples 1
    python benchmarks/update_paths.py --samples 10 --shapes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mbplan.agent import Agent, AgentConfig
from mbplan.fast.malloc import tune_malloc
from mbplan.replay import ReplayBuffer

PATHS = {"autograd": (False, False), "hand-written": (True, False), "compiled": (True, True)}


def time_paths(K: int, blocks: int, per_block: int, seed: int) -> dict[str, list[float]]:
    """Median ms per update of each path, per block."""
    torch.manual_seed(seed)
    S, A, B = 17, 6, 256
    agent = Agent(S, A, AgentConfig(agent="direct", n_samples=K))
    buffer = ReplayBuffer(S, A, 20_000)
    g = torch.Generator().manual_seed(seed)
    for _ in range(20_000):
        s = torch.randn(S, generator=g)
        a = torch.rand(A, generator=g) * 2 - 1
        buffer.add(s, a, float(torch.randn((), generator=g)), torch.randn(S, generator=g), False)

    def block(path: str, n: int) -> float:
        agent.fused_update, agent.compile_update = PATHS[path]
        times = []
        for _ in range(n):
            batch = buffer.sample(B, g)
            start = time.perf_counter()
            metrics = agent.update(batch, g)
            torch.stack(list(metrics.values())).tolist()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    for path in PATHS:  # warm up (and compile) outside the timing
        block(path, 20)
    results: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(blocks):
        for path in PATHS:
            results[path].append(block(path, per_block))
    return results


def _us(fn, n: int = 1000) -> float:
    """Mean µs per call of ``fn`` after a warm-up."""
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - start) / n


def shape_timings(N: int) -> dict[str, tuple[float, float]]:
    """(the shape avoided, the shape used) in µs, for the critic's one-column products at N rows."""
    h, w, b = torch.randn(2, N, 256), torch.randn(2, 256, 1), torch.randn(2, 1, 1)
    g, g_h, w_a = torch.randn(2, N, 1), torch.randn(2, N, 256), torch.randn(2, 6, 256)
    return {
        "head forward: baddbmm vs multiply-and-sum": (
            _us(lambda: torch.baddbmm(b, h, w)),
            _us(lambda: (h * w.transpose(1, 2)).sum(-1)),
        ),
        "head weight grad: xᵀg vs (gᵀx)ᵀ": (
            _us(lambda: torch.bmm(h.transpose(1, 2), g)),
            _us(lambda: torch.bmm(g.transpose(1, 2), h)),
        ),
        "action Jacobian: g·W_aᵀ vs W_a·gᵀ": (
            _us(lambda: torch.bmm(g_h, w_a.transpose(1, 2))),
            _us(lambda: torch.bmm(w_a, g_h.transpose(1, 2))),
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=1, help="K, action samples per state")
    p.add_argument("--blocks", type=int, default=3, help="alternating blocks per path")
    p.add_argument("--per-block", type=int, default=200, help="updates per block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapes", action="store_true", help="also time the critic's matrix shapes")
    args = p.parse_args()
    tune_malloc()
    print(f"direct agent, K={args.samples}, batch 256, {torch.get_num_threads()} threads: "
          f"median ms/update per block")  # fmt: skip
    results = time_paths(args.samples, args.blocks, args.per_block, args.seed)
    for path, ms in results.items():
        print(f"  {path:12s} {'  '.join(f'{x:6.2f}' for x in ms)}")
    if args.shapes:
        for N in (256, 2560):
            for name, (avoided, used) in shape_timings(N).items():
                print(f"  N={N:5d} {name:42s} {avoided:8.1f} → {used:7.1f} µs")


if __name__ == "__main__":
    main()
