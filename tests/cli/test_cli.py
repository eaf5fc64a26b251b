"""CLI entry points run in a subprocess; bad input is one line on stderr and exit code 2."""

import subprocess
import sys

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


def test_bench_overhead_smoke():
    out = run_cli("bench", "overhead", "--batch-sizes", "2", "--repeats", "1", "--iters", "2")
    assert out.returncode == 0, out.stderr
    for name in mbplan.PLANNERS:
        assert name in out.stdout
    assert "states_per_s" in out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "overhead", "--planners", "newton", "--batch-sizes", "1"],
        ["bench", "overhead", "--batch-sizes", "x"],
        ["nonsense"],
    ],
)
def test_bad_input_one_line_exit_2(args):
    out = run_cli(*args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
