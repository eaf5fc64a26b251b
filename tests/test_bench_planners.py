"""``mbplan bench planners``, ``gap`` and ``iterations`` on the bundled default (subprocess)."""

import csv
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.mujoco, pytest.mark.slow]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SMOKE = {
    "planners": (["--states", 3, "--iters", 8, "--horizon", 2],
                 ["planner", "iteration", "n_evals", "seconds", "objective"]),
    "gap": (["--states", 3, "--max-iters", 20, "--patience", 10, "--eval-samples", 8],
            ["planner", "state", "objective_before", "objective_after", "gap", "iterations"]),
    "iterations": (["--episodes", 1, "--max-steps", 5, "--extra-adam", 3, "--extra-iters", 2],
                   ["contender", "episode", "return"]),
}  # fmt: skip


def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "osmesa"}
    return subprocess.run(
        [sys.executable, "-m", "mbplan.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def one_line_error(out):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in out.stderr, out.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``smoke(command)`` → (completed process, out folder); each command runs once."""
    cache = {}

    def get(command):
        if command not in cache:
            folder = tmp_path_factory.mktemp(command)
            cache[command] = run_cli("bench", command, *SMOKE[command][0], "--out", folder), folder
        return cache[command]

    return get


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("command", sorted(SMOKE))
def test_bench_writes_csv_and_png(command, smoke):
    out, folder = smoke(command)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(folder / f"bench-{command}.csv")
    assert rows and list(rows[0]) == SMOKE[command][1]
    png = (folder / f"bench-{command}.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert "wrote" in out.stdout


def test_planners_table_and_curves(smoke):
    out, folder = smoke("planners")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("iterative", "adam", "cem", "direct"):
        assert name in out.stdout
    per_planner = {}
    for row in read_csv(folder / "bench-planners.csv"):
        per_planner.setdefault(row["planner"], []).append(int(row["iteration"]))
    assert per_planner["direct"] == [1]  # a single point
    for name in ("iterative", "adam", "cem"):
        assert per_planner[name] == list(range(9))  # λ_0 … λ_8


def test_gap_rows_per_planner_and_state(smoke):
    out, folder = smoke("gap")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(folder / "bench-gap.csv")
    assert sorted((r["planner"], r["state"]) for r in rows) == [
        (p, str(i)) for p in ("direct", "iterative") for i in range(3)
    ]
    for r in rows:
        gap = float(r["objective_after"]) - float(r["objective_before"])
        assert abs(float(r["gap"]) - gap) < 1e-4 and 0 <= int(r["iterations"]) <= 20


def test_iterations_four_contenders(smoke):
    out, folder = smoke("iterations")
    assert out.returncode == 0, out.stderr[-3000:]
    names = [r["contender"] for r in read_csv(folder / "bench-iterations.csv")]
    assert len(names) == 4 and len(set(names)) == 4 and "direct" in names


BAD = [
    ["--checkpoint", "/nonexistent/run"],
    ["--objective", "newton"],
]


@pytest.mark.parametrize("command", sorted(SMOKE))
@pytest.mark.parametrize("bad", BAD)
def test_bench_bad_input(command, bad, tmp_path):
    one_line_error(run_cli("bench", command, *SMOKE[command][0], *bad, "--out", tmp_path))


@pytest.mark.parametrize(
    "command, bad",
    [
        ("planners", ["--states", 0]),
        ("gap", ["--states", 0]),
        ("planners", ["--planners", "newton"]),
        ("gap", ["--planners", "adam"]),
        ("iterations", ["--episodes", 0]),
    ],
)
def test_bench_bad_numbers_and_planners(command, bad, tmp_path):
    one_line_error(run_cli("bench", command, *SMOKE[command][0], *bad, "--out", tmp_path))
