"""The command line of ``gradwatch report``: arguments, reading, figures, output."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from gradwatch.pictures import MissingMatplotlib, require_matplotlib
from gradwatch.pictures._figure import SOFTWARE
from gradwatch.report.figures import FIGURES, run_figures
from gradwatch.report.html import HEAD, page
from gradwatch.report.output import ReportError, check_output, html_mark, png_mark, write_safely
from gradwatch.report.progress import ByteProgress
from gradwatch.report.reader import event_files, read_runs
from gradwatch.report.risk import at_risk

__all__ = ["NoData", "add_arguments", "main", "report"]

DEFAULT_HTML = "report.html"
DEFAULT_PNG_DIR = "gradwatch-report"
_OUTPUT = "-o/--output"
_HTML_MARK = html_mark(HEAD)
_PNG_MARK = png_mark("Software", SOFTWARE)


class NoData(ReportError):
    """The log directory holds no gradwatch data (exit status 1)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``gradwatch report``."""
    parser.add_argument("logdir", metavar="LOGDIR", help="directory of TensorBoard event files")
    parser.add_argument(
        "-o",
        "--output",
        help=f"the HTML file (default: {DEFAULT_HTML}), or with --format png the directory of "
        f"the PNG files (default: {DEFAULT_PNG_DIR}); a file is replaced only when gradwatch "
        "wrote it, and a symbolic link never (see --force)",
    )
    parser.add_argument(
        "--format", choices=("html", "png"), default="html", help="one HTML page, or PNG files"
    )
    parser.add_argument(
        "--steps",
        type=_steps,
        default=None,
        help="comma-separated steps for the depth profile (default: the last logged step); "
        "the nearest logged steps are drawn",
    )
    parser.add_argument(
        "--top",
        type=_positive,
        default=5,
        help="most groups listed as at risk of vanishing, and of exploding (default: 5)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an output file gradwatch did not write; where the output is a symbolic "
        "link, write to the file it points to (the link stays)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (warnings are still printed)"
    )


def _steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated steps >= 0, e.g. 0,500,1000. Received: {text!r}"
        )
    return steps


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return value


def report(
    log_dir: str | Path,
    output: str | Path | None = None,
    *,
    format: str = "html",
    steps: Sequence[int] | None = None,
    top: int = 5,
    quiet: bool = False,
    force: bool = False,
) -> list[Path]:
    """Write the report of every run with gradwatch data below ``log_dir``; return the files.

    Damaged or truncated records are skipped, with a warning on stderr per file.

    Raises:
        ReportError: a bad argument; an output path holding a file gradwatch did not write, or
            a symbolic link (unless ``force``); an output that cannot be written.
        NoData: no event file below ``log_dir`` holds gradwatch's per-group norms.
    """
    log_dir = Path(log_dir)
    if format not in ("html", "png"):
        raise ReportError(f"--format must be 'html' or 'png'. Received: {format!r}")
    if not log_dir.is_dir():
        raise ReportError(f"LOGDIR must be an existing directory. Received: {str(log_dir)!r}")
    require_matplotlib()
    if format == "html":  # before the reading, which can take minutes
        check_output(Path(output or DEFAULT_HTML), _HTML_MARK, _OUTPUT, force=force)
    files = event_files(log_dir)
    with ByteProgress(sum(f.stat().st_size for f in files), quiet=quiet) as progress:
        runs = read_runs(log_dir, progress)
    for run in runs:
        for file in run.damaged:
            print(f"gradwatch report: warning: {file.damage()}", file=sys.stderr)
    if not runs:
        raise NoData(_no_data_message(log_dir, len(files)))
    if format == "png":
        directory = Path(output or DEFAULT_PNG_DIR)
        paths = {run.name: _png_paths(directory, run.name) for run in runs}
        for run_paths in paths.values():  # before the drawing
            for path in run_paths.values():
                check_output(path, _PNG_MARK, _OUTPUT, force=force)
        return [
            write_safely(paths[run.name][name], png, _PNG_MARK, _OUTPUT, force=force)
            for run in runs
            for name, png in run_figures(run, steps).items()
        ]
    figures = {run.name: run_figures(run, steps) for run in runs}
    if not quiet:
        for run in runs:
            if run.stopped:
                print(f"gradwatch report: run {run.name!r} {run.stopped}", file=sys.stderr)
    risks = {run.name: at_risk(run.history.matrix(), top) for run in runs}
    text = page(str(log_dir), runs, figures, risks)
    path = Path(output or DEFAULT_HTML)
    return [write_safely(path, text.encode("utf-8"), _HTML_MARK, _OUTPUT, force=force)]


def _png_paths(directory: Path, run: str) -> dict[str, Path]:
    if directory.exists() and not directory.is_dir():
        raise ReportError(
            f"-o/--output must be a directory with --format png. Received: {str(directory)!r}"
        )
    prefix = "" if run == "." else re.sub(r"[^A-Za-z0-9_.-]+", "_", run) + "_"
    return {name: directory / f"{prefix}{name}.png" for name in FIGURES}


def _no_data_message(log_dir: Path, files: int) -> str:
    if files == 0:
        return f"No TensorBoard event files below {str(log_dir)!r}: nothing to report."
    return (
        f"No gradwatch data in {str(log_dir)!r}: {files} event file(s), but none holds "
        "gradwatch's per-group gradient norms (grad_norm/<group>). Point LOGDIR at the folder "
        "gradwatch wrote to (its `log_dir`)."
    )


def main(argv: Sequence[str] | None = None, prog: str = "gradwatch report") -> int:
    """Run ``gradwatch report``; return the exit status.

    0: done, also when damaged or truncated records were skipped (each file is named in a
    warning on stderr); 1: no gradwatch data; 2: a bad argument, an output it refuses to
    replace, or an output that cannot be written.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Pictures of gradient flow.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``gradwatch report`` command line."""
    try:
        written = report(
            args.logdir,
            args.output,
            format=args.format,
            steps=args.steps,
            top=args.top,
            quiet=args.quiet,
            force=args.force,
        )
    except NoData as error:
        print(f"gradwatch report: {error}", file=sys.stderr)
        return 1
    except (ReportError, MissingMatplotlib) as error:
        print(f"gradwatch report: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
