"""CLI entry points run in a subprocess; bad input is one line on stderr and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

import mbplan


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mbplan.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and mbplan.__version__ in out.stdout
    out = subprocess.run(["mbplan", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and mbplan.__version__ in out.stdout
    out = run_cli("--help")
    assert out.returncode == 0 and "bench" in out.stdout


def test_planner_overhead_benchmark_smoke():
    """benchmarks/planner_overhead.py (formerly `mbplan bench overhead`) times every planner."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "planner_overhead.py"
    out = subprocess.run(
        [sys.executable, str(script), "--batch-sizes", "2", "--repeats", "1", "--iters", "2",
         "--planners", *sorted(mbplan.PLANNERS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for name in mbplan.PLANNERS:
        assert name in out.stdout
    assert "states_per_s" in out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "overhead"],  # moved to benchmarks/planner_overhead.py
        ["bench", "nonsense"],
        ["nonsense"],
    ],
)
def test_bad_input_one_line_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
