"""Planner head-to-head on full HalfCheetah-v5 episodes: a single model vs an ensemble, η 0 and 1.

Each episode is receding-horizon control in the real env against Ĵ_MB at H = ``--horizon`` with
K = PLAN_SAMPLES samples, uncompiled, on ``--threads`` threads (``mbplan plan``'s loop without its
untimed Ĵ-improvement evaluation). Episodes are saved one JSON file each as they finish
(``OUT/episodes/<model>-<planner>-trust<η>-s<seed>-e<episode>.json``), so the script can be killed
and rerun; finished episodes are skipped. Each records how the iterative cells planned
(``iterative_plan``: ``one function``, MPC's default since 5d0b0c3, or ``loop``, before it or with
``MBPLAN_FAST=0``); a rerun that would mix the two in one folder stops (use another ``--out``).
The committed grid's iterative episodes all planned through the loop. Writes ``head_to_head.csv``,
``head_to_head.md`` and ``head_to_head.png`` from whatever episode files exist.

    python benchmarks/head_to_head.py                        # 3 seeds × 3 episodes × 1000 steps
    python benchmarks/head_to_head.py --only direct iterative mppi
    python benchmarks/head_to_head.py --models ens=RUN_A one=RUN_B --trust 1
    python benchmarks/head_to_head.py --report               # only rewrite the tables and figure

Two processes at one thread each share the grid (each takes every other work item):

    nohup python benchmarks/head_to_head.py --shard 0/2 > head_to_head-0.log 2>&1 &
    nohup python benchmarks/head_to_head.py --shard 1/2 > head_to_head-1.log 2>&1 &
    python benchmarks/head_to_head.py --report               # once both are done (or any time)

or, to join a grid that is already running, a second process from the other end (the two meet in
the middle; at most the item both reach last runs twice):

    nohup python benchmarks/head_to_head.py --reverse > head_to_head-r.log 2>&1 &

Planners (cost order): direct (the run's policy; one cell for every model and η, keyed ``any``,
η 0), iterative (the optimizer fitted on the model-based objective, from the policy's λ),
iterative-mf (the one fitted on the model-free objective, zero-shot on Ĵ_MB, from the policy's λ),
adam-5 (5 Adam steps from the policy's λ: the iterative planner's model transitions), cem (from
its own λ_0), mppi (policy-seeded, warm-started from its shifted previous sequence), adam (from its
own λ_0); each with its default iterations unless said. Work order: seed, then episode,
outermost; within one (seed, episode) the planners cheap first, then model, then η. Killed early,
every cell has its first episodes (up to the (seed, episode) in progress).

Model transitions per action = objective evaluations (``PlanTrace.n_evals``, record-keeping ones
not counted) × K × H: one evaluation is K rollouts of H model steps per state; mppi and cem count
their N (or P) candidates as N/K evaluations, so the unit is the same (direct: 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mbplan import fast
from mbplan.checkpoint import atomic_path, atomic_write_text, run_or_default
from mbplan.envs import make_env
from mbplan.errors import UserError
from mbplan.fast.malloc import tune_malloc
from mbplan.models.ensemble import PROPAGATIONS, EnsembleDynamics
from mbplan.mpc import (
    DEFAULT_KAPPA,
    DEFAULT_PROPAGATION,
    MPC,
    PLAN_SAMPLES,
    PlanSettings,
    Setup,
    check_kappa,
    check_trust,
    load_setup,
    model_objective,
    planner_for,
)
from mbplan.planners import Planner, PlanResult

#: Cells in cost order: label → (planner, where each plan starts (``PlanSettings.init``),
#: iterations (None = the planner's default)).
PLANNERS: dict[str, tuple[str, str, int | None]] = {
    "direct": ("direct", "prior", None),  # ignores the start (one network call)
    "iterative": ("iterative", "policy", None),
    "iterative-mf": ("iterative", "policy", None),  # the model-free optimizer, zero-shot
    "adam-5": ("adam", "policy", 5),  # the iterative planner's budget: 5 gradient steps
    "cem": ("cem", "prior", None),
    "mppi": ("mppi", "policy", None),  # step 0 at the policy's λ, then the shifted sequence
    "adam": ("adam", "prior", None),  # 250 gradient steps: ~15× the ms/action of cem or mppi
}
#: Model name of the one direct cell (the policy does not use the model).
ANY = "any"


def parse_models(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs to {name: path} (an empty PATH = the bundled default)."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.]+", name) or name == ANY:
            p.error(
                f"--models takes NAME=PATH with NAME of letters, digits, _ or . (not {ANY!r}), "
                f"got {spec!r}"
            )
        if name in models:
            p.error(f"--models: {name!r} given twice")
        models[name] = path
    return models


def load_models(
    p: argparse.ArgumentParser, models: dict[str, str]
) -> tuple[dict[str, Setup], dict[str, str]]:
    """({name: setup}, {name: resolved path}); a path that does not load is a one-line error."""
    setups, resolved = {}, {}
    for name, path in models.items():
        try:
            resolved[name] = str(run_or_default(path))
            setups[name] = load_setup(resolved[name])
        except (UserError, OSError, ValueError, KeyError) as exc:
            p.error(f"--models {name}={path or '(bundled default)'}: does not load: {exc}")
        if setups[name].dynamics is None:
            p.error(
                f"--models {name}={path}: this run has no model (fit one with mbplan fit-model)"
            )
    return setups, resolved


def build_planner(setup: Setup, label: str) -> Planner | None:
    """The planner of cell ``label`` on one setup; None for iterative-mf without its optimizer."""
    if label == "iterative-mf":
        return setup.optimizers.get("model-free")
    return planner_for(setup, PLANNERS[label][0], "model")


def plan_evals(result: PlanResult) -> float:
    """Objective evaluations the plan spent (``n_evals[-1]``); NaN for a trace without them."""
    n_evals = getattr(result.trace, "n_evals", None)
    if n_evals is None or n_evals.numel() == 0:
        return math.nan  # no planner here lacks it; the table then shows n/a
    return round(float(n_evals[-1]), 4)  # the trace's float32 sums: 295.2, not 295.20001


def run_episode(mpc: MPC, env_id: str, seed: int, max_steps: int | None, H: int) -> dict:
    """One episode: return, steps, mean ms/action (``act`` only), model transitions per action."""
    env = make_env(env_id, seed=seed)
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    mpc.reset()
    K = mpc.objective.n_samples
    total, times, transitions, done = 0.0, [], [], False
    while not done:
        state = torch.as_tensor(obs, dtype=torch.float32)  # (S,)
        # Plan and act (timed)
        tic = time.perf_counter()
        action, result = mpc.act(state)
        times.append(time.perf_counter() - tic)
        transitions.append(plan_evals(result) * K * H)

        # Step the real env
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done = terminated or truncated or (max_steps is not None and len(times) >= max_steps)
    env.close()
    return {
        "return": total,
        "steps": len(times),
        "ms_per_action": 1e3 * statistics.fmean(times),
        "transitions_per_action": statistics.fmean(transitions),
        "wall_seconds": time.perf_counter() - start,
    }


def work_items(args, models: list[str]) -> list[tuple[int, int, str, str, float]]:
    """(seed, episode, planner, model, η) in run order: seed/episode outermost, cheap first."""
    planners = [n for n in PLANNERS if args.only is None or n in args.only]
    trusts = list(dict.fromkeys(check_trust(eta) for eta in args.trust))  # unique, in order
    items = []
    for s in range(args.seeds):
        for e in range(args.episodes):
            for name in planners:
                if name == "direct":  # one cell: the policy ignores model and η
                    items.append((s, e, name, ANY, 0.0))
                    continue
                items += [(s, e, name, m, eta) for m in models for eta in trusts]
    return items


def episode_path(out: Path, model: str, planner: str, eta: float, s: int, e: int) -> Path:
    """``OUT/episodes/<model>-<planner>-trust<η:g>-s<seed>-e<ep>.json``."""
    return out / "episodes" / f"{model}-{planner}-trust{eta:g}-s{s}-e{e}.json"


def run_grid(p: argparse.ArgumentParser, args, out: Path) -> None:
    """Run this shard's unfinished episodes, one JSON file each."""
    setups, paths = load_models(p, parse_models(p, args.models))
    first = next(iter(setups))  # direct acts with this run's policy
    shard, n_shards = args.shard
    H, max_steps = args.horizon, args.max_steps or None
    settings = {
        "horizon": H,
        "samples": PLAN_SAMPLES,
        "propagation": args.propagation,
        "kappa": args.kappa,
        "max_steps": args.max_steps,
    }
    objectives = {
        m: model_objective(setup, H, propagation=args.propagation, kappa=args.kappa)[0]
        for m, setup in setups.items()
    }
    for m, setup in setups.items():
        if "model" not in setup.optimizers and (args.only is None or "iterative" in args.only):
            print(
                f"note: {m} has no model-based optimizer: its iterative is planner_for's "
                "fallback (the model-free optimizer or the agent's own planner)"
            )
    items = work_items(args, list(setups))
    mine = [(i, item) for i, item in enumerate(items) if i % n_shards == shard]
    if args.reverse:  # a second process from the other end (they meet in the middle)
        mine.reverse()
    done, skipped_mf = 0, set()
    for i, (s, e, name, m, eta) in mine:
        path = episode_path(out, m, name, eta, s, e)
        setup = setups[first if m == ANY else m]
        cell_settings = dict(settings)
        if m == ANY or not isinstance(setup.dynamics, EnsembleDynamics):
            cell_settings.update(propagation=None, kappa=None)  # no ensemble: they do not apply
        if PLANNERS[name][0] == "iterative":  # MPC's path: same plans to rounding, not episodes
            cell_settings["iterative_plan"] = "one function" if fast.enabled() else "loop"
        if path.exists():
            old = json.loads(path.read_text())
            old.setdefault("iterative_plan", "loop")  # episodes from before the fast plan was MPC's
            if any(old.get(k) != v for k, v in cell_settings.items()):
                theirs = {k: old.get(k) for k in cell_settings}
                p.error(f"{path} was run with other settings {theirs}: use another --out")
            done += 1
            continue
        planner = build_planner(setup, name)
        if planner is None:
            if m not in skipped_mf:
                print(f"note: {m} has no model-free optimizer: iterative-mf skipped")
                skipped_mf.add(m)
            continue
        seed = 1000 * s + e
        _, init, iters = PLANNERS[name]
        objective = objectives[first if m == ANY else m]
        mpc = MPC(setup, planner, objective, PlanSettings(iters, init, eta), seed=seed)
        row = run_episode(mpc, setup.config["env"], seed, max_steps, H)
        row = {
            "model": m,
            "model_path": paths[first if m == ANY else m],
            "planner": name,
            "init": init,
            "trust": eta,
            "iters": iters or planner.default_iters,
            "seed": s,
            "episode": e,
            "env_seed": seed,
            "threads": args.threads,
            **cell_settings,
            **row,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(row, indent=1))
        print(
            f"[{i + 1}/{len(items)}] {m:9s} {name:12s} η={eta:g} s{s} e{e}  return "
            f"{row['return']:8.1f}  {row['steps']} steps  {row['ms_per_action']:8.1f} ms/action  "
            f"{row['transitions_per_action']:9.0f} transitions/action  "
            f"{row['wall_seconds']:6.0f} s",
            flush=True,
        )
    if done:
        print(f"skipped {done} finished episodes (shard {shard}/{n_shards})")


def aggregate(out: Path) -> list[dict[str, Any]]:
    """One row per (model, trust, planner) over the episode files in ``OUT/episodes``."""
    cells: dict[tuple[str, float, str], list[dict]] = {}
    for path in sorted((out / "episodes").glob("*.json")):
        ep = json.loads(path.read_text())
        cells.setdefault((ep["model"], ep["trust"], ep["planner"]), []).append(ep)
    rows = []
    for (model, trust, planner), eps in cells.items():
        returns = [ep["return"] for ep in eps]
        rows.append(
            {
                "model": model,
                "trust": trust,
                "planner": planner,
                "propagation": eps[0].get("propagation"),
                "kappa": eps[0].get("kappa"),
                "init": eps[0]["init"],
                "iters": eps[0]["iters"],
                "horizon": eps[0]["horizon"],
                "episodes": len(eps),
                "steps": statistics.fmean(ep["steps"] for ep in eps),
                "return_mean": statistics.fmean(returns),
                "return_sd": statistics.stdev(returns) if len(returns) > 1 else math.nan,
                "return_worst": min(returns),
                "ms_per_action": statistics.fmean(ep["ms_per_action"] for ep in eps),
                "transitions_per_action": statistics.fmean(
                    ep["transitions_per_action"] for ep in eps
                ),
            }
        )
    order = list(PLANNERS)
    rows.sort(key=lambda r: (r["model"] != ANY, r["model"], r["trust"], order.index(r["planner"])))
    return rows


def fmt(x: float, spec: str) -> str:
    """``x`` formatted by ``spec``, or n/a for NaN (an SD of one episode, a missing count)."""
    return "n/a" if math.isnan(x) else format(x, spec)


def model_label(row: dict[str, Any]) -> str:
    """The model's name, with an ensemble's propagation and κ."""
    if row.get("propagation") is None:
        return row["model"]
    return f"{row['model']} ({row['propagation']}, κ={row['kappa']:g})"


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """``head_to_head.csv`` and ``head_to_head.md``."""
    with atomic_path(out / "head_to_head.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "Return: mean ± SD over episodes (sample SD, `statistics.stdev`, n − 1), and the worst "
        "episode. ms/action: mean over episodes of the mean planning time per action "
        "(uncompiled). Model transitions/action: objective evaluations × K × H (direct: 0).",
        "",
        "| model | trust η | planner | start | iters | H | episodes × steps | return (mean ± SD) "
        "| worst | ms/action | model transitions/action |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {model_label(r)} | {r['trust']:g} | {r['planner']} | {r['init']} | "
            f"{r['iters']} | {r['horizon']} | {r['episodes']} × {r['steps']:.0f} | "
            f"{r['return_mean']:.1f} ± {fmt(r['return_sd'], '.1f')} | {r['return_worst']:.1f} | "
            f"{r['ms_per_action']:.1f} | {fmt(r['transitions_per_action'], ',.0f')} |"
        )
    atomic_write_text(out / "head_to_head.md", "\n".join(lines) + "\n")


def write_figure(rows: list[dict[str, Any]], out: Path) -> None:
    """``head_to_head.png``: return vs model transitions/action and vs ms/action, ± SD."""
    from matplotlib.lines import Line2D

    from mbplan.report import new_figure

    fig, axes = new_figure(1, 2, size=(5.6, 4.2))
    colours = {name: f"C{i}" for i, name in enumerate(PLANNERS)}
    groups = sorted({(r["model"], r["trust"]) for r in rows})
    markers = {g: "osD^vP*Xph"[i % 10] for i, g in enumerate(groups)}
    for r in rows:
        x_transitions = r["transitions_per_action"] or 1.0  # direct (0 transitions) at x = 1
        for ax, x in zip(axes[0], (x_transitions, r["ms_per_action"])):
            ax.errorbar(
                x,
                r["return_mean"],
                yerr=0.0 if math.isnan(r["return_sd"]) else r["return_sd"],
                color=colours[r["planner"]],
                marker=markers[(r["model"], r["trust"])],
                capsize=3,
            )
    handles = [Line2D([], [], color=c, marker="o", ls="", label=n) for n, c in colours.items()]
    handles += [
        Line2D([], [], color="0.3", marker=markers[g], ls="", label=f"{g[0]} η={g[1]:g}")
        for g in groups
    ]
    for ax, label in zip(
        axes[0], ("model transitions / action (direct: 0, drawn at 1)", "ms / action (uncompiled)")
    ):
        ax.set(xscale="log", xlabel=label, ylabel="episode return (mean ± SD)")
        ax.grid(alpha=0.3)
    axes[0][1].legend(handles=handles, fontsize=7, loc="best")
    with atomic_path(out / "head_to_head.png") as tmp:
        fig.savefig(tmp, dpi=130)
    import matplotlib.pyplot as plt  # new_figure has chosen the Agg backend

    plt.close(fig)


def report(out: Path) -> None:
    """Aggregate the episode files into the tables and the figure, and print where they went."""
    rows = aggregate(out)
    if not rows:
        print(f"no episode files in {out / 'episodes'}: nothing to report")
        return
    write_tables(rows, out)
    write_figure(rows, out)
    print((out / "head_to_head.md").read_text(), end="")
    print(
        f"written {out / 'head_to_head.csv'}, {out / 'head_to_head.md'} and "
        f"{out / 'head_to_head.png'}"
    )


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return i, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=["single=benchmarks/results/head_to_head/bundle-single", "ensemble="],
        metavar="NAME=PATH",
        help="run folders or lean bundles to plan on (empty PATH = the bundled default)",
    )
    p.add_argument("--trust", type=float, nargs="+", default=[0.0, 1.0], help="trust-region η's")
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(PLANNERS),
        default=None,
        help="run only these planners (the tables list every finished episode)",
    )
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument(
        "--propagation",
        default=DEFAULT_PROPAGATION,
        choices=PROPAGATIONS,
        help="ensemble models (default: mbplan plan's)",
    )
    p.add_argument(
        "--kappa", type=float, default=DEFAULT_KAPPA, help="ensemble models: pessimism κ"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=3, help="episodes per seed")
    p.add_argument("--max-steps", type=int, default=1000, help="steps per episode (0 = env limit)")
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only the work items with index %% N == I",
    )
    p.add_argument(
        "--reverse",
        action="store_true",
        help="run the work items last first (a second process joining a running grid)",
    )
    p.add_argument("--report", action="store_true", help="only rewrite the tables and figure")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/head_to_head")
    args = p.parse_args()
    out = Path(args.out)
    if not args.report:
        try:
            check_kappa(args.kappa)
            for eta in args.trust:
                check_trust(eta)
        except UserError as exc:
            p.error(str(exc))
        if args.horizon < 1 or args.seeds < 0 or args.episodes < 0 or args.max_steps < 0:
            p.error("--horizon must be >= 1 and --seeds, --episodes, --max-steps >= 0")
        tune_malloc()
        torch.set_num_threads(args.threads)
        run_grid(p, args, out)
    report(out)


if __name__ == "__main__":
    main()
