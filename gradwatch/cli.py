"""The ``gradwatch`` command: ``gradwatch report LOGDIR [-o report.html] [--format png]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command; return its exit status."""
    from gradwatch.report import cli as report

    parser = argparse.ArgumentParser(prog="gradwatch", description="Watch gradient flow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser(
        "report",
        help="an HTML page (or PNG files) of the gradient flow recorded in LOGDIR",
        description="Write one self-contained HTML page (or PNG files) from gradwatch's "
        "TensorBoard event files.",
    )
    report.add_arguments(add)
    args = parser.parse_args(argv)
    return report.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
