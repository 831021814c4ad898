"""``gradwatch report LOGDIR``: one self-contained HTML page (or PNG files) from event files."""

from gradwatch.report.cli import main, report

__all__ = ["main", "report"]
