"""Helpers shared by the tests that run ``python -m mbplan.cli`` in a subprocess."""

import csv
import os
import subprocess
import sys

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, timeout=600):
    """Run ``mbplan ARGS`` on one thread; the CompletedProcess (mbplan picks a headless GL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mbplan.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def ok(out):
    """Assert exit 0; the stdout."""
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def one_line_error(out):
    """Assert the CLI's bad-input contract: exit 2, one line on stderr, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in out.stderr, out.stderr


def read_csv(path, columns=None):
    """Rows of a CSV (with exactly ``columns`` when given); asserts it is not empty."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert columns is None or reader.fieldnames == list(columns)
    assert rows
    return rows


def valid_png(path):
    """Assert ``path`` is a PNG of real content (> 10 kB)."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
