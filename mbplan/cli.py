"""The ``mbplan`` command line. Owns all output; library code never prints.

Errors a user can cause end as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import mbplan
from mbplan.bench.overhead import OverheadOptions, run_overhead
from mbplan.cli_args import add_dataclass_args, from_namespace
from mbplan.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as a single line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def format_table(rows: Sequence[Any]) -> str:
    """Left-aligned text table of dataclass rows (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    dicts = [asdict(r) if is_dataclass(r) else dict(r) for r in rows]
    cols = list(dicts[0])

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(d[c]) for c in cols] for d in dicts]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _bench_overhead(opts: OverheadOptions) -> None:
    print(
        f"planner overhead: S={opts.state_dim} A={opts.action_dim} K={opts.samples}, "
        "twin-Q critic 2x256, CPU; overhead = ms/eval / bare objective+gradient ms"
    )
    print(format_table(run_overhead(opts)))


# name → (help, options dataclass, handler)
Command = tuple[str, type, Callable[[Any], None]]
COMMANDS: dict[str, dict[str, Command]] = {
    "bench": {
        "overhead": (
            "time per iteration / objective evaluation and states/s of every planner",
            OverheadOptions,
            _bench_overhead,
        ),
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser: ``mbplan GROUP COMMAND [options]``."""
    parser = _Parser(
        prog="mbplan",
        description="Model-based planning with iterative amortized policy optimization.",
    )
    parser.add_argument("--version", action="version", version=f"mbplan {mbplan.__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    groups.required = True
    for group, commands in COMMANDS.items():
        gp = groups.add_parser(group, help=f"{group} commands: {', '.join(commands)}")
        sub = gp.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
        sub.required = True
        for name, (help_text, opts_cls, handler) in commands.items():
            cp = sub.add_parser(
                name,
                help=help_text,
                description=help_text,
            )
            add_dataclass_args(cp, opts_cls)
            cp.set_defaults(_opts_cls=opts_cls, _handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbplan`` console script."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    opts = from_namespace(ns._opts_cls, ns)
    try:
        ns._handler(opts)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"mbplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbplan: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
