"""Speed of this tree against an earlier commit, in one run: train_throughput and plan_latency.

Prepares the baseline once: ``git archive`` of the commit into a cache folder (default
``~/.cache/mbplan-compare/<sha>/tree``) and a virtual environment beside it (``venv/``: the same
torch build as this interpreter's, then ``pip install -e tree``). Later runs reuse both. The
current side is this working tree (uncommitted changes included) run by this interpreter, or
with ``--current REV`` that commit, prepared like the baseline (edits made to the working tree
while the comparison runs then cannot leak into it).

Then, for each round, every benchmark runs on the baseline and then on the current tree, one
process at a time, each side running its *own* copy of the script from its own tree with its own
interpreter (a script that imports a module that has since moved still runs on its own side):

* ``benchmarks/train_throughput.py --skip-sb3 --json ...``: direct K=1, direct K=10 and iterative
  ms/update (and per whole step), the fraction of the measured GEMM peak, and the peak itself
  (a machine check: its ratio should be near 1);
* ``benchmarks/plan_latency.py``: ms/action per planner (fused and autograd objective), the
  iterative plan as one function (eager and compiled), and the breakdown rows, parsed from the
  printed text.

Only flags that both sides' ``--help`` list are passed, identically to both. Threads: ``--threads``
goes to scripts that take it, and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` to every process.

The summary gives, per metric, the median over rounds of each side and the ratio
current / baseline (for times, < 1 means faster now; for % of peak, > 1 means better now), then
the per-round values. ``--json`` writes all of it, and the raw output of every run, atomically
after every round.

    python benchmarks/compare_commits.py --baseline 42399a1 --rounds 2 \\
        --json benchmarks/results/compare_42399a1.json
    python benchmarks/compare_commits.py --baseline 42399a1 --rounds 1 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = "benchmarks/train_throughput.py"
PLAN = "benchmarks/plan_latency.py"

# Benchmark flags wanted, full and --quick; each goes to a side only if both sides' --help list it.
TRAIN_FLAGS = {
    "--skip-sb3": None,
    "--warmup": "2000",
    "--updates": "1000",
    "--iter-updates": "100",
    "--rounds": "1",
}
TRAIN_FLAGS_QUICK = {**TRAIN_FLAGS, "--warmup": "300", "--updates": "20", "--iter-updates": "5"}
PLAN_FLAGS: dict[str, str | None] = {}
PLAN_FLAGS_QUICK = {"--repeats": "3", "--no-compile": None}

# train_throughput.py's JSON: (metric name, section, key, scale, better)
TRAIN_METRICS = [
    ("train direct K=1 ms/update", "mbplan_direct_k1", "ms_per_update", 1.0, "lower"),
    ("train direct K=1 ms/step", "mbplan_direct_k1", "ms_per_step", 1.0, "lower"),
    ("train direct K=10 ms/update", "mbplan_direct_k10", "ms_per_update", 1.0, "lower"),
    ("train direct K=10 ms/step", "mbplan_direct_k10", "ms_per_step", 1.0, "lower"),
    ("train direct K=10 % of peak", "mbplan_direct_k10", "peak_fraction", 100.0, "higher"),
    ("train iterative ms/update", "mbplan_iterative_k10", "ms_per_update", 1.0, "lower"),
    ("train iterative ms/step", "mbplan_iterative_k10", "ms_per_step", 1.0, "lower"),
    ("train iterative % of peak", "mbplan_iterative_k10", "peak_fraction", 100.0, "higher"),
    ("train GEMM peak GMAC/s (machine)", None, "gemm_peak_gmacs", 1.0, "higher"),
]

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
PLAN_HEADER = re.compile(r"one state, (\d+) thread")
PLAN_ROW = re.compile(
    rf"^(\w+)\s+I=\d+\s+{_NUM} ms/action \(median\)(?:\s+\[autograd {_NUM} ms)?", re.M
)
PLAN_FAST_ROW = re.compile(rf"^\s+iterative as (.+?)\s+{_NUM} ms/action", re.M)
PLAN_EVAL = re.compile(
    rf"^iterative: \S+ \+ gradient {_NUM} ms \[autograd {_NUM} ms\], "
    rf"optimizer network {_NUM} ms",
    re.M,
)
PLAN_STEP = re.compile(rf"^\s+per rollout step, (.+?)\s+{_NUM} ms", re.M)
PLAN_ROLLOUT = re.compile(rf"^\s+one rollout step {_NUM} ms", re.M)
PLAN_GEMMS = re.compile(rf"^\s+matrix products alone .*?: {_NUM} ms per evaluation", re.M)


@dataclass
class Side:
    """One side of the comparison: a source tree and the interpreter that runs it.

    Attributes:
        name: ``"baseline"`` or ``"current"``.
        tree: Root of the source tree (its benchmarks/ scripts are the ones run).
        python: Interpreter whose ``import mbplan`` resolves into ``tree``.
        info: Commit and environment facts, for the JSON.
        flags: Long options each benchmark script's ``--help`` lists, by script.
    """

    name: str
    tree: Path
    python: str
    info: dict = field(default_factory=dict)
    flags: dict[str, set[str]] = field(default_factory=dict)


def log(msg: str) -> None:
    """Print one progress line, flushed, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git(*args: str) -> str:
    """Run git in this repository and return its stripped stdout.

    Args:
        *args: git's arguments.

    Returns:
        The command's standard output, stripped.
    """
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def child_env(threads: int) -> dict[str, str]:
    """Environment of every benchmark process: same threads, nothing that redirects imports.

    ``PYTHONPATH`` would let one side import the other's ``mbplan``, and ``MBPLAN_*`` (e.g.
    ``MBPLAN_FAST=0``) would change which code paths run.

    Args:
        threads: Value for ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (0: leave as is).

    Returns:
        A copy of this process's environment with those changes.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MBPLAN_")}
    env.pop("VIRTUAL_ENV", None)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (two comparisons never build one cache at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def import_check(python: str, tree: Path, env: dict[str, str]) -> dict:
    """Check that ``python`` imports ``mbplan`` from ``tree``; return the versions it sees.

    Args:
        python: Interpreter to ask.
        tree: Source tree its ``mbplan`` must come from.
        env: Environment to run it in.

    Returns:
        ``{"mbplan_file": ..., "torch": ..., "python": ...}``.

    Raises:
        SystemExit: If ``mbplan`` does not import, or imports from elsewhere.
    """
    code = (
        "import json, sys, mbplan, torch; print(json.dumps({'mbplan_file': mbplan.__file__, "
        "'torch': torch.__version__, 'python': sys.version.split()[0]}))"
    )
    proc = subprocess.run(
        [python, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"{python} cannot import mbplan:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(info["mbplan_file"]).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{python} imports mbplan from {info['mbplan_file']}, not from {tree}")
    return info


def pip_install(python: str, args: list[str]) -> None:
    """``python -m pip install --quiet ARGS``; its output is shown only if it fails.

    Args:
        python: The virtual environment's interpreter.
        args: Requirements and options for ``pip install``.
    """
    proc = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(
            f"pip install {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
        )


def prepare_commit(name: str, rev: str, cache_root: Path, torch_spec: str, rebuild: bool) -> Side:
    """Extract a commit and build its virtual environment, or reuse them.

    The cache folder is ``cache_root/<sha>`` with ``tree/`` (``git archive`` of the commit),
    ``venv/`` and ``ready.json``, written last: a folder without it (an interrupted build) is
    deleted and built again.

    Args:
        name: The side it will be (``"baseline"`` or ``"current"``).
        rev: Any git revision naming the commit.
        cache_root: Folder holding one cache folder per commit.
        torch_spec: pip requirement for torch, installed before the project.
        rebuild: Delete and rebuild the cache folder even if it is ready.

    Returns:
        The side, run from the extracted tree by the venv's interpreter.
    """
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    root = cache_root / sha
    tree, venv, ready = root / "tree", root / "venv", root / "ready.json"
    python = str(venv / "bin" / "python")
    with locked(cache_root / f"{sha}.lock"):
        if ready.exists() and not rebuild:
            log(f"{name} {sha[:10]}: reusing {root}")
        else:
            if root.exists():
                shutil.rmtree(root)
            tree.mkdir(parents=True)
            log(f"{name} {sha[:10]}: extracting into {tree}")
            archive = subprocess.run(
                ["git", "archive", "--format=tar", sha], cwd=REPO, check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            log(f"{name} {sha[:10]}: creating {venv}")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            log(f"{name} {sha[:10]}: pip install {torch_spec}")
            pip_install(python, [torch_spec])
            log(f"{name} {sha[:10]}: pip install -e {tree}")
            pip_install(python, ["-e", str(tree)])
            info = import_check(python, tree, child_env(0))
            ready.write_text(json.dumps({"sha": sha, "rev": rev, **info}, indent=1))
            log(f"{name} {sha[:10]}: ready (torch {info['torch']})")
    info = import_check(python, tree, child_env(0))
    info.update(rev=rev, sha=sha, dirty=False, changed=[])
    return Side(name, tree, python, info)


def current_side() -> Side:
    """This working tree, run by this interpreter (its editable install must point here)."""
    info = import_check(sys.executable, REPO, child_env(0))
    dirty = git("status", "--porcelain", "--untracked-files=no")
    info.update(rev="working tree", sha=git("rev-parse", "HEAD"), dirty=bool(dirty))
    info.update(changed=dirty.splitlines())
    return Side("current", REPO, sys.executable, info)


def script_flags(side: Side, script: str, env: dict[str, str]) -> set[str]:
    """Long options that ``script --help`` lists on this side.

    Args:
        side: Whose copy of the script and interpreter to ask.
        script: Path of the script relative to the tree.
        env: Environment to run it in.

    Returns:
        The set of ``--option`` names found in the help text.
    """
    proc = subprocess.run(
        [side.python, script, "--help"],
        cwd=side.tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"{side.name}: {script} --help failed:\n{proc.stderr[-3000:]}")
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", proc.stdout))


def common_args(sides: list[Side], script: str, wanted: dict[str, str | None]) -> list[str]:
    """The wanted flags that every side's copy of ``script`` accepts, as an argument list.

    Args:
        sides: Both sides, with ``flags`` filled in.
        script: Which script's flags to use.
        wanted: Flag to value (``None``: a switch).

    Returns:
        The argument list, the same for every side.
    """
    args: list[str] = []
    for flag, value in wanted.items():
        missing = [s.name for s in sides if flag not in s.flags[script]]
        if missing:
            log(f"note: {script} {flag} not accepted by {', '.join(missing)}: left out for both")
            continue
        args += [flag] if value is None else [flag, value]
    return args


def run_script(side: Side, script: str, args: list[str], env: dict[str, str]) -> tuple[str, float]:
    """Run one benchmark process to the end; exit with its output if it fails.

    Args:
        side: Which tree and interpreter.
        script: Script path relative to the tree.
        args: Its arguments.
        env: Its environment.

    Returns:
        Its standard output and the wall-clock seconds it took.
    """
    start = time.perf_counter()
    proc = subprocess.run(
        [side.python, script, *args],
        cwd=side.tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        sys.exit(f"{side.name}: {script} {' '.join(args)} exited with {proc.returncode}")
    return proc.stdout, seconds


def train_metrics(results: dict) -> dict[str, float]:
    """The compared figures of one ``train_throughput.py --json`` file.

    Args:
        results: The parsed JSON.

    Returns:
        Metric name to value; figures missing from the file are left out.
    """
    out = {}
    for name, section, key, scale, _ in TRAIN_METRICS:
        source = results.get(section, {}) if section else results
        if isinstance(source, dict) and isinstance(source.get(key), int | float):
            out[name] = scale * source[key]
    return out


def plan_metrics(text: str) -> dict[str, float]:
    """The compared figures of ``plan_latency.py``'s printed report.

    Args:
        text: Its standard output.

    Returns:
        Metric name to milliseconds.

    Raises:
        ValueError: If no planner row is found (the report's format changed).
    """
    out = {}
    for name, ms, autograd in PLAN_ROW.findall(text):
        out[f"plan {name} ms/action"] = float(ms)
        if autograd:
            out[f"plan {name} ms/action (autograd objective)"] = float(autograd)
    if not out:
        raise ValueError("no planner row ('NAME I=... ms/action (median)') in plan_latency output")
    for label, ms in PLAN_FAST_ROW.findall(text):
        out[f"plan iterative as {label.strip()} ms/action"] = float(ms)
    for fused, autograd, net in PLAN_EVAL.findall(text):
        out["plan iterative: J + gradient ms"] = float(fused)
        out["plan iterative: J + gradient ms (autograd)"] = float(autograd)
        out["plan iterative: optimizer network ms"] = float(net)
    for label, ms in PLAN_STEP.findall(text):
        out[f"plan per rollout step, {label.strip()} ms"] = float(ms)
    for ms in PLAN_ROLLOUT.findall(text):
        out["plan one rollout step ms"] = float(ms)
    for ms in PLAN_GEMMS.findall(text):
        out["plan matrix products alone ms/evaluation"] = float(ms)
    return out


def better_of(metric: str) -> str:
    """``"higher"`` for % of peak and the GEMM peak, else ``"lower"`` (times)."""
    for name, *_, better in TRAIN_METRICS:
        if name == metric:
            return better
    return "lower"


def summarize(runs: list[dict], tolerance: float) -> dict[str, dict]:
    """Per metric: both sides' per-round values, their medians and the ratio current / baseline.

    Args:
        runs: One record per benchmark process, with ``side`` and ``metrics``.
        tolerance: Relative change beyond which a metric counts as worse.

    Returns:
        Metric name to its summary, in first-seen order.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for name, value in run["metrics"].items():
            values.setdefault(name, {"baseline": [], "current": []})[run["side"]].append(value)
    out = {}
    for name, v in values.items():
        b = statistics.median(v["baseline"]) if v["baseline"] else None
        c = statistics.median(v["current"]) if v["current"] else None
        ratio = c / b if b and c is not None else None
        better = better_of(name)
        worse = ratio is not None and (
            ratio > 1 + tolerance if better == "lower" else ratio < 1 - tolerance
        )
        out[name] = {
            "better": better,
            "baseline_median": b,
            "current_median": c,
            "ratio": ratio,
            "worse": worse,
            "baseline": v["baseline"],
            "current": v["current"],
        }
    return out


def print_summary(summary: dict[str, dict], tolerance: float) -> None:
    """Print the comparison table (medians, ratio, per-round values)."""
    width = max(len(n) for n in summary) + 2
    print()
    print(
        f"{'metric':{width}s}{'better':>7s}{'baseline':>10s}{'current':>10s}{'ratio':>8s}"
        f"   per round: baseline | current"
    )
    for name, s in summary.items():
        b, c, r = s["baseline_median"], s["current_median"], s["ratio"]
        cells = [f"{x:10.3f}" if x is not None else f"{'—':>10s}" for x in (b, c)]
        ratio = f"{r:8.3f}" if r is not None else f"{'—':>8s}"
        flag = " !" if s["worse"] else "  "
        rounds = (
            ", ".join(f"{x:.3f}" for x in s["baseline"])
            + " | "
            + ", ".join(f"{x:.3f}" for x in s["current"])
        )
        print(f"{name:{width}s}{s['better']:>7s}{cells[0]}{cells[1]}{ratio}{flag} {rounds}")
    print(
        f"ratio = current / baseline medians (lower-is-better: < 1 is faster now); "
        f"! = worse by more than {100 * tolerance:.0f}%"
    )


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file in the folder + os.replace).

    Args:
        path: Destination; its folder is created if missing.
        data: JSON-serializable object.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600; give it a plain file's mode
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", required=True, help="git revision to compare against")
    p.add_argument(
        "--current",
        default="",
        help="git revision to measure instead of this working tree (extracted and cached like\n"
        "the baseline: immune to edits made in the working tree during the run)",
    )
    p.add_argument("--rounds", type=int, default=2, help="baseline/current rounds (default 2)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (atomically)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "mbplan-compare",
        help="where baseline trees and venvs are kept (default ~/.cache/mbplan-compare)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: default)")
    p.add_argument(
        "--quick", action="store_true", help="tiny benchmark sizes, no compiled plan: smoke test"
    )
    p.add_argument(
        "--no-plan-compile",
        action="store_true",
        help="skip plan_latency's compiled iterative plan (1–3 min of compiling per run)",
    )
    p.add_argument("--skip-train", action="store_true", help="do not run train_throughput.py")
    p.add_argument("--skip-plan", action="store_true", help="do not run plan_latency.py")
    p.add_argument(
        "--torch",
        default=f"torch=={importlib.metadata.version('torch')}",
        help="pip requirement for the baseline venv's torch (default: this interpreter's)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the baseline's cached venv")
    p.add_argument(
        "--tolerance", type=float, default=0.05, help="flag metrics worse by more than this"
    )
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 0:
        p.error("--rounds must be >= 1 and --threads >= 0")
    if args.skip_train and args.skip_plan:
        p.error("nothing to run: both --skip-train and --skip-plan")
    return args


def main() -> None:
    """Prepare both sides, run the alternating rounds, print and write the comparison."""
    args = parse_args()
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    env = child_env(args.threads)
    for var in ("PYTHONPATH", "MBPLAN_FAST"):
        if var in os.environ:
            log(f"note: {var} is set here; benchmark processes run without it")

    baseline = prepare_commit("baseline", args.baseline, args.cache_dir, args.torch, args.rebuild)
    if args.current:
        current = prepare_commit("current", args.current, args.cache_dir, args.torch, args.rebuild)
    else:
        current = current_side()
    for side in (baseline, current):
        side.info["subject"] = git("log", "-1", "--format=%s", side.info["sha"])[:120]
    sides = [baseline, current]
    if baseline.info["torch"] != current.info["torch"]:
        log(
            f"warning: torch differs: baseline {baseline.info['torch']}, "
            f"current {current.info['torch']}"
        )
    log(f"baseline {baseline.info['sha'][:10]} ({baseline.info['subject'][:60]})")
    dirty = " + uncommitted changes" if current.info["dirty"] else ""
    log(f"current  {current.info['sha'][:10]}{dirty} ({current.info['subject'][:60]})")

    scripts = ([] if args.skip_train else [TRAIN]) + ([] if args.skip_plan else [PLAN])
    for side in sides:
        for script in scripts:
            if not (side.tree / script).exists():
                sys.exit(f"{side.name}: {script} does not exist in {side.tree}")
            side.flags[script] = script_flags(side, script, env)

    wanted = {
        TRAIN: dict(TRAIN_FLAGS_QUICK if args.quick else TRAIN_FLAGS),
        PLAN: dict(PLAN_FLAGS_QUICK if args.quick else PLAN_FLAGS),
    }
    if args.no_plan_compile:
        wanted[PLAN]["--no-compile"] = None
    for script in scripts:
        if args.threads > 0:
            wanted[script]["--threads"] = str(args.threads)
    script_args = {script: common_args(sides, script, wanted[script]) for script in scripts}
    for script in scripts:
        log(f"{script} {' '.join(script_args[script])}")

    runs: list[dict] = []
    record = {
        "started": started,
        "baseline": baseline.info | {"tree": str(baseline.tree), "python": baseline.python},
        "current": current.info | {"tree": str(current.tree), "python": current.python},
        "settings": {
            "rounds": args.rounds,
            "threads": args.threads,
            "quick": args.quick,
            "tolerance": args.tolerance,
            "args": script_args,
            "order": "per round and benchmark: baseline, then current",
        },
    }
    with tempfile.TemporaryDirectory(prefix="mbplan-compare-") as tmp:
        for r in range(args.rounds):
            for script in scripts:
                for side in sides:
                    extra: list[str] = []
                    out_json = Path(tmp) / f"{side.name}-{r}.json"
                    if script == TRAIN:
                        extra = ["--json", str(out_json)]
                    log(f"round {r + 1}/{args.rounds}: {side.name:8s} {script} ...")
                    stdout, seconds = run_script(side, script, script_args[script] + extra, env)
                    run: dict = {"round": r, "side": side.name, "script": script}
                    if script == TRAIN:
                        results = json.loads(out_json.read_text())
                        metrics = train_metrics(results)
                        if args.threads and results.get("threads") not in (None, args.threads):
                            log(f"warning: {side.name} trained with {results['threads']} threads")
                        run["results"] = results
                    else:
                        try:
                            metrics = plan_metrics(stdout)
                        except ValueError as e:
                            print(stdout, file=sys.stderr)
                            sys.exit(f"{side.name}: {e}")
                        header = PLAN_HEADER.search(stdout)
                        if args.threads and header and int(header.group(1)) != args.threads:
                            log(f"warning: {side.name} planned with {header.group(1)} threads")
                    run |= {"seconds": seconds, "metrics": metrics, "stdout": stdout}
                    runs.append(run)
                    log(
                        f"round {r + 1}/{args.rounds}: {side.name:8s} {script} done in "
                        f"{seconds:.0f} s, {len(metrics)} figures"
                    )
            if args.json:
                summary = summarize(runs, args.tolerance)
                partial = {"partial": r + 1 < args.rounds, "rounds_done": r + 1}
                write_json(args.json, record | partial | {"metrics": summary, "runs": runs})

    summary = summarize(runs, args.tolerance)
    print_summary(summary, args.tolerance)
    elapsed = time.perf_counter() - t0
    print(
        f"{args.rounds} round(s) in {elapsed / 60:.1f} min; baseline {baseline.info['sha'][:10]}"
        f", current {current.info['sha'][:10]}{dirty}"
    )
    if args.json:
        record |= {"partial": False, "rounds_done": args.rounds, "elapsed_s": elapsed}
        write_json(args.json, record | {"metrics": summary, "runs": runs})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
