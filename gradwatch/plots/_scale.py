"""Shared choices of the pictures: log scale limits, row labels, sizes, special colours."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.plots._figure import short_label

__all__ = [
    "BOTTOM",
    "DECADES",
    "MISSING",
    "NONFINITE",
    "TOP",
    "ZERO",
    "label_every",
    "left_margin",
    "log_limits",
    "place_axis_labels",
    "row_labels",
    "rows_height",
]

DECADES = 14.0  # colour range: values more than this many decades below the largest are "under"
ZERO = "#000000"
NONFINITE = "#e4002b"
MISSING = "#e6e6e6"
_MAX_LABELS = 80

# Fixed margins in inches (no layout engine: it measured every label on every draw).
TOP = 0.45  # the title
BOTTOM = 0.95  # tick labels, the axis label, one row of legend
_TICKS = 0.1  # tick length and the pad to its label
_YLABEL = 0.2  # the rotated y label's height, and the gap to the tick labels
_XLABEL = 0.32  # from the axes' bottom edge to the top of the x label


def log_limits(values: np.ndarray) -> tuple[float, float]:
    """Colour (or axis) limits in log10 units for positive finite ``values``.

    The range spans the data, at most :data:`DECADES` decades below the largest value, and at
    least one decade so that a flat history is not all one extreme colour.

    Example:
        >>> log_limits(np.array([1e-3, 1.0, 0.0, np.inf]))
        (-3.0, 0.0)
        >>> [round(x, 3) for x in log_limits(np.array([2.0, 2.0]))]
        [-0.199, 0.801]
    """
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return -1.0, 1.0
    logs = np.log10(positive)
    lo, hi = float(logs.min()), float(logs.max())
    lo = max(lo, hi - DECADES)
    if hi - lo < 1.0:
        middle = (hi + lo) / 2
        lo, hi = middle - 0.5, middle + 0.5
    return lo, hi


def rows_height(rows: int) -> float:
    """Figure height in inches for ``rows`` labelled rows, readable from 3 to 200 groups."""
    return float(min(max(1.6 + 0.17 * rows, 3.2), 18.0))


def label_every(rows: int) -> int:
    """Label every ``k``-th row so that at most ~80 labels are drawn."""
    return max(1, math.ceil(rows / _MAX_LABELS))


def label_size(rows: int) -> float:
    """Font size of row labels."""
    return 9.0 if rows <= 24 else 7.5


def row_labels(groups: tuple[str, ...]) -> dict[int, str]:
    """The labelled rows (every :func:`label_every`-th) and their shortened group names."""
    return {i: short_label(groups[i]) for i in range(0, len(groups), label_every(len(groups)))}


def left_margin(label_width: float) -> float:
    """Inches left of an axes whose row labels are ``label_width`` inches wide."""
    return label_width + _TICKS + 2 * _YLABEL + 0.05


def place_axis_labels(axes, label_width: float) -> None:
    """Place the axis labels at fixed distances (in inches) from ``axes``, so that matplotlib
    does not measure every tick label to place them; the y label names the groups."""
    box = axes.get_position()
    width, height = axes.figure.get_size_inches()
    axes.xaxis.set_label_coords(0.5, -_XLABEL / (box.height * height))
    axes.set_ylabel("group (input → output)")
    axes.yaxis.set_label_coords(-(label_width + _TICKS + 0.08) / (box.width * width), 0.5)
