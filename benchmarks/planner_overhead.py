"""Planner overhead benchmark; same as ``mbplan bench overhead`` (flags are passed through).

python benchmarks/planner_overhead.py --batch-sizes 1 256 4096
"""

import sys

from mbplan.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overhead", *sys.argv[1:]]))
