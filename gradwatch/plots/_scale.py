"""Shared choices of the pictures: log scale limits, row labels, sizes, special colours."""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DECADES",
    "MISSING",
    "NONFINITE",
    "ZERO",
    "label_every",
    "log_limits",
    "rows_height",
]

DECADES = 14.0  # colour range: values more than this many decades below the largest are "under"
ZERO = "#000000"
NONFINITE = "#e4002b"
MISSING = "#e6e6e6"
_MAX_LABELS = 80


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
