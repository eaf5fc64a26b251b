"""Training throughput on HalfCheetah-v5: mbplan against stable-baselines3 SAC, side by side.

Measures whole training steps (act + env step + replay + one update of batch 256) after the random
warm-up, for:
  * mbplan direct with K = 1 (SAC's own setting) vs SB3 SAC (same settings) -> env steps/s, ratio,
    in alternating rounds so that both see this VM's speed drift alike. mbplan runs as
    ``mbplan train`` does by default, with the update through ``torch.compile``; the first update,
    which compiles (one-off, ~20 s), is left out of the timing and printed beside it;
  * mbplan direct and iterative at the paper's settings (K = 10, N = 5): ms per update (the update
    alone, timed around ``Agent.update``; the whole step is printed beside it) and the fraction of
    this CPU's measured GEMM peak it reaches (multiply-adds per update / time / peak).

    python benchmarks/train_throughput.py                 # everything (~8 minutes on 2 cores)
    python benchmarks/train_throughput.py --skip-sb3 --updates 500
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mbplan.fast.malloc import tune_malloc
from mbplan.train import Trainer, TrainOptions

sys.path.insert(0, str(Path(__file__).parent))


def gemm_peak(seconds: float = 2.0) -> float:
    """Best sustained float32 GEMM rate of this machine, in multiply-adds per second."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            reps += 1
        best = max(best, reps * n**3 / (time.perf_counter() - start))
    return best


def mlp_macs(sizes: list[int]) -> int:
    """Multiply-adds of one forward pass of an MLP with these layer widths, per input row."""
    return sum(a * b for a, b in itertools.pairwise(sizes))


def mlp_backward_macs(sizes: list[int], weight_grads: bool, input_grad: int) -> int:
    """Multiply-adds of one backward pass per input row.

    Args:
        sizes: Layer widths.
        weight_grads: Whether the weights' gradients are formed (trainable network).
        input_grad: How many of the first layer's inputs get a gradient (0: none).
    """
    pairs = list(itertools.pairwise(sizes))
    macs = mlp_macs(sizes) if weight_grads else 0
    # Gradients to the hidden activations; a one-output head's is an outer product, not a matmul.
    macs += sum(a * b for a, b in pairs[1:] if b > 1)
    return macs + input_grad * pairs[0][1]


def update_macs(S: int, A: int, B: int, K: int, N: int, agent: str, H: int = 256) -> float:
    """Multiply-adds of one update as mbplan runs it, counting matrix products only.

    Critic: 2 trainable nets on B pairs (forward, weight gradients, hidden gradients).
    Ĵ evaluations: 2 frozen target nets on K·B pairs, forward + gradient to the A action inputs
    only (``models/critic.py``'s fused path). Critic target: the policy at s' (direct: one forward;
    iterative: N Ĵ evaluations and N optimizer-network forwards) and 2 target nets on B pairs.
    Direct actor: policy forward + backward on B, one Ĵ evaluation. Iterative actor: N+1 Ĵ
    evaluations (the loss reuses their gradients: no second pass through the critics) and the
    optimizer network N times on B rows, forward + backward (its inputs are detached).
    """
    q_sizes = [S + A, H, H, 1]
    q = 2 * mlp_macs(q_sizes)  # twin critic forward, per pair
    j_eval = K * B * (q + 2 * mlp_backward_macs(q_sizes, weight_grads=False, input_grad=A))
    pol = [S, H, H, 2 * A]
    opt = [S + 4 * A, H, H, 4 * A]
    critic = B * (q + 2 * mlp_backward_macs(q_sizes, weight_grads=True, input_grad=0))
    if agent == "direct":
        target = B * (mlp_macs(pol) + q)
        actor = B * (mlp_macs(pol) + mlp_backward_macs(pol, True, 0)) + j_eval
    else:
        target = N * (j_eval + B * mlp_macs(opt)) + B * q
        actor = (N + 1) * j_eval + N * B * (mlp_macs(opt) + mlp_backward_macs(opt, True, 0))
    return float(critic + target + actor)


def update_macs_model(
    S: int, A: int, B: int, K: int, N: int, agent: str, horizon: int, H: int = 256
) -> float:
    """Multiply-adds of one ``--value model`` update (one model, or an ensemble with ``fixed``
    propagation: each rollout row uses one member), counting matrix products only.

    One Ĵ_MB evaluation on K·B rows: at each of the H steps the twin target critics, reward,
    dynamics and future policy forward, and their input gradients backward (weights frozen), plus
    the critics at s_H (the plain path evaluates them at every step). Models: dynamics and reward
    trained on B real transitions. The critic, its target and the actor are counted as in
    :func:`update_macs`, with Ĵ_MB in place of Ĵ; the iterative agent also distils its direct
    future policy (forward of both, backward of the student).
    """
    q, d, r, pol = [S + A, H, H, 1], [S + A, H, H, S], [S + A, H, H, 1], [S, H, H, 2 * A]
    fwd = 2 * mlp_macs(q) + mlp_macs(r) + mlp_macs(d) + mlp_macs(pol)
    bwd = (2 * mlp_backward_macs(q, False, S + A) + mlp_backward_macs(r, False, S + A)
           + mlp_backward_macs(d, False, S + A) + mlp_backward_macs(pol, False, S))  # fmt: skip
    j_eval = K * B * (horizon * (fwd + bwd) + 2 * mlp_macs(q) + 2 * mlp_backward_macs(q, False, A))
    qf = 2 * mlp_macs(q)
    critic = B * (qf + 2 * mlp_backward_macs(q, weight_grads=True, input_grad=0))
    models = B * sum(mlp_macs(x) + mlp_backward_macs(x, True, 0) for x in (d, r))
    opt = [S + 4 * A, H, H, 4 * A]
    if agent == "direct":
        target = B * (mlp_macs(pol) + qf)
        actor = B * (mlp_macs(pol) + mlp_backward_macs(pol, True, 0)) + j_eval
        distill = 0
    else:
        target = N * (j_eval + B * mlp_macs(opt)) + B * qf
        actor = (N + 1) * j_eval + N * B * (mlp_macs(opt) + mlp_backward_macs(opt, True, 0))
        distill = B * (mlp_macs(pol) + mlp_backward_macs(pol, True, 0))
    return float(critic + models + target + actor + distill)


def measure_mbplan(
    agent: str, K: int, N: int, warmup: int, updates: int, seed: int, **options
) -> dict:
    """Whole training steps per second of mbplan after the warm-up (no eval, no checkpoints), and
    the time of the update alone (``Agent.update``: sampling and acting excluded)."""
    marks: dict[str, float] = {}
    update_seconds: list[float] = []
    total = warmup + updates + 1

    def on_progress(step: int, info: dict) -> None:
        if step == warmup + 1:
            marks["start"] = time.perf_counter()  # first update done: excludes one-off setup
        if step == total - 1:
            marks["end"] = time.perf_counter()  # before the final checkpoint

    with tempfile.TemporaryDirectory() as out:
        opts = TrainOptions(
            env="HalfCheetah-v5", agent=agent, steps=total, seed=seed, out=out, samples=K,
            iters=N, warmup=warmup, eval_interval=0, checkpoint_interval=10**9,
            buffer_size=100_000, **options,
        )  # fmt: skip
        trainer = Trainer(opts, on_progress=on_progress)
        update = trainer.agent.update

        def timed_update(*args, **kwargs):
            start = time.perf_counter()
            out = update(*args, **kwargs)
            update_seconds.append(time.perf_counter() - start)
            return out

        trainer.agent.update = timed_update
        trainer.run()
    steps = total - 1 - (warmup + 1)
    seconds = marks["end"] - marks["start"]
    timed = update_seconds[1:]  # the first update builds caches
    return {
        "env_steps_per_s": steps / seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "ms_per_update": 1e3 * statistics.fmean(timed),
        "ms_per_update_median": 1e3 * statistics.median(timed),
        "first_update_s": update_seconds[0],  # includes the one-off torch.compile, if any
        "steps": steps,
    }


def compare_with_sb3(
    rounds: int, warmup: int, updates: int, seed: int, skip_sb3: bool, batch_size: int
) -> dict:
    """Direct K = 1 against SB3 SAC, in alternating rounds (mbplan, SB3, mbplan, SB3, ...).

    This VM's speed drifts by ±15% over minutes; alternating whole measurements lets both sides
    see the same drift. Each round is a full measurement (fresh run, ``warmup`` random steps, then
    ``updates`` timed steps). The summary is the ratio of pooled rates (total timed steps over total
    seconds) and the median of the per-round ratios.
    """
    sb3_reference = None
    if not skip_sb3:
        import sb3_reference  # optional peer: imported only when compared

    ours_rounds: list[dict] = []
    sb3_rounds: list[dict] = []
    for r in range(rounds):
        ours = measure_mbplan("direct", 1, 1, warmup, updates, seed + r)
        ours_rounds.append(ours)
        line = (f"round {r + 1}/{rounds}: mbplan direct K=1 {ours['env_steps_per_s']:6.1f} "
                f"env steps/s ({ours['ms_per_step']:.2f} ms/step; first update "
                f"{ours['first_update_s']:.1f} s)")  # fmt: skip
        if sb3_reference is not None:
            sb3 = sb3_reference.measure_sb3_sac(
                "HalfCheetah-v5", warmup, updates, batch_size, seed=seed + r
            )
            if sb3 is None:
                print("stable-baselines3 not installed (pip install stable-baselines3): no ratio")
                sb3_reference = None
            else:
                sb3_rounds.append(sb3)
                ratio = ours["env_steps_per_s"] / sb3["env_steps_per_s"]
                line += (f"  SB3 SAC {sb3['env_steps_per_s']:6.1f} ({sb3['ms_per_step']:.2f} "
                         f"ms/step)  ratio {ratio:.2f}x")  # fmt: skip
        print(line, flush=True)

    def pooled(rs: list[dict], key: str) -> float:
        return sum(x[key] for x in rs) / sum(x[key] / x["env_steps_per_s"] for x in rs)

    rate = pooled(ours_rounds, "steps")
    out: dict = {"mbplan_direct_k1": {
        "env_steps_per_s": rate,
        "ms_per_step": 1e3 / rate,
        "ms_per_update": statistics.fmean(x["ms_per_update"] for x in ours_rounds),
        "rounds": ours_rounds,
    }}  # fmt: skip
    print(f"mbplan direct K=1      {rate:7.1f} env steps/s  ({1e3 / rate:.2f} ms/step, "
          f"{rounds} rounds pooled)")  # fmt: skip
    if sb3_rounds:
        sb3_rate = pooled(sb3_rounds, "timed_steps")
        per_round = [
            o["env_steps_per_s"] / s["env_steps_per_s"]
            for o, s in zip(ours_rounds, sb3_rounds, strict=True)
        ]
        out["sb3_sac"] = {"env_steps_per_s": sb3_rate, "ms_per_step": 1e3 / sb3_rate,
                          "rounds": sb3_rounds}  # fmt: skip
        out["ratio_vs_sb3"] = rate / sb3_rate
        out["ratio_vs_sb3_per_round"] = per_round
        print(f"SB3 SAC                {sb3_rate:7.1f} env steps/s  ({1e3 / sb3_rate:.2f} ms/step)")
        print(f"ratio mbplan / SB3     {rate / sb3_rate:7.2f}x   (target >= 1.5x; per round "
              f"{', '.join(f'{x:.2f}' for x in per_round)}, median "
              f"{statistics.median(per_round):.2f})")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--warmup", type=int, default=5000, help="random steps before updates")
    p.add_argument("--updates", type=int, default=2000, help="timed steps with one update each")
    p.add_argument("--iter-updates", type=int, default=200, help="timed steps for iterative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sb3", action="store_true", help="do not run stable-baselines3")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating mbplan/SB3 rounds (K=1)",
    )
    p.add_argument("--mb-updates", type=int, default=60, help="timed steps, model-based direct")
    p.add_argument(
        "--mb-iter-updates", type=int, default=20, help="timed steps, model-based iterative"
    )
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    if min(args.updates, args.iter_updates) < 3:
        p.error("--updates and --iter-updates must be >= 3")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    tune_malloc()
    S, A, B = 17, 6, 256
    results: dict = {"threads": torch.get_num_threads()}

    print(
        f"HalfCheetah-v5, batch {B}, one update per env step, "
        f"timed after {args.warmup} random steps"
    )
    k1 = compare_with_sb3(args.rounds, args.warmup, args.updates, args.seed, args.skip_sb3, B)
    results.update(k1)

    peak = gemm_peak()
    results["gemm_peak_gmacs"] = peak / 1e9
    print(f"measured GEMM peak     {peak / 1e9:7.1f} G multiply-adds/s")
    for agent, updates in (("direct", args.updates), ("iterative", args.iter_updates)):
        K, N = 10, 5
        r = measure_mbplan(agent, K, N, args.warmup, updates, args.seed)
        macs = update_macs(S, A, B, K, N, agent)
        frac = macs / (r["ms_per_update"] / 1e3) / peak
        results[f"mbplan_{agent}_k10"] = {
            **r,
            "gmacs_per_update": macs / 1e9,
            "peak_fraction": frac,
            "peak_fraction_whole_step": macs / (r["ms_per_step"] / 1e3) / peak,
        }
        print(f"mbplan {agent:9s} K=10 N=5: {r['ms_per_update']:7.1f} ms/update "
              f"(median {r['ms_per_update_median']:.1f}; whole step {r['ms_per_step']:.1f} ms), "
              f"{macs / 1e9:.2f} G MAC/update, {100 * frac:.0f}% of peak "
              f"(target >= 50%)")  # fmt: skip
    # Model-based agents (--value model, H = 2): what a sweep of such runs costs per update
    for agent, updates in (("direct", args.mb_updates), ("iterative", args.mb_iter_updates)):
        K, N, horizon = 10, 5, 2
        if updates < 3:
            continue
        for ensemble in (1, 5):
            r = measure_mbplan(agent, K, N, args.warmup, updates, args.seed, value="model",
                               horizon=horizon, model_warmup=10, ensemble=ensemble)  # fmt: skip
            macs = update_macs_model(S, A, B, K, N, agent, horizon)
            frac = macs / (r["ms_per_update"] / 1e3) / peak
            key = f"mbplan_{agent}_k10_model_h2_e{ensemble}"
            results[key] = {**r, "gmacs_per_update": macs / 1e9, "peak_fraction": frac}
            print(f"mbplan {agent:9s} K=10 N=5 --value model H=2 ensemble {ensemble}: "
                  f"{r['ms_per_update']:7.1f} ms/update (median {r['ms_per_update_median']:.1f}), "
                  f"{macs / 1e9:.2f} G MAC/update, {100 * frac:.0f}% of peak")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
