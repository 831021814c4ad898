"""Shared choices of the pictures: log scale limits, row labels, sizes, special colours."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.pictures._figure import axes_box, new_figure, short_label, text_width
from gradwatch.pictures.history import BACKWARD, NORM, RATIO

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DECADES",
    "DPI",
    "LABEL",
    "LINE",
    "MISSING",
    "NONFINITE",
    "SMALL",
    "TITLE",
    "WIDTH",
    "ZERO",
    "below",
    "common_prefix",
    "label_every",
    "log_limits",
    "place_xlabel",
    "row_labels",
    "rows_figure",
    "rows_height",
]

DECADES = 14.0  # colour range: values more than this many decades below the largest are "under"
ZERO = "#000000"
NONFINITE = "#e4002b"
MISSING = "#e6e6e6"

# The pictures are laid out for TensorBoard's Images tab, which shows an image 350 px wide
# (scaled, pixel by pixel) unless "Show actual image size" is ticked: WIDTH inches at 100 px
# an inch, drawn at twice that resolution so that they stay sharp where shown larger.
WIDTH = 3.5
DPI = 200
TITLE = 9.0  # font sizes in points (at 100 px an inch, 12.5 px), for the title,
LABEL = 8.5  # axis labels,
SMALL = 8.0  # and tick labels, row labels and legends
LABEL_CHARS = 22  # longest row label, in characters (longer names lose their start)
# Fixed margins in inches (no layout engine: it measured every label on every draw).
_PAD = 0.08  # figure edge to text
_TICKS = 0.07  # tick length and the pad to its label
LINE = 0.16  # height of a line of SMALL or LABEL text
_TITLE_LINE = 0.17
_ROW_PITCH = 0.13  # inches from one labelled row to the next: SMALL text is ~0.11 in tall
_ROWS_MIN, _ROWS_MAX = 1.2, 4.0  # height of the rows, inches
SYMBOLS = {  # short names of measures
    RATIO: "‖grad‖ / ‖param‖",
    NORM: "‖grad‖, not size-free",
    BACKWARD: "RMS dL/dy",
}


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
    """Height in inches of ``rows`` rows: a labelled row each up to 30 groups, then 4 inches.

    Example:
        >>> rows_height(3), rows_height(20), rows_height(500)
        (1.2, 2.6, 4.0)
    """
    return float(min(max(_ROW_PITCH * rows, _ROWS_MIN), _ROWS_MAX))


def label_every(rows: int) -> int:
    """Label every ``k``-th row, so that labels are at least ``_ROW_PITCH`` inches apart.

    Example:
        >>> label_every(30), label_every(41), label_every(500)
        (1, 2, 17)
    """
    pitch = rows_height(rows) / max(rows, 1)
    return max(1, math.ceil(round(_ROW_PITCH / pitch, 6)))


def common_prefix(groups: tuple[str, ...]) -> str:
    """The dotted prefix every group name starts with (and none is), which labels can drop.

    Example:
        >>> common_prefix(("model.layers.0.attn", "model.layers.1.mlp", "model.norm"))
        'model.'
        >>> common_prefix(("conv1", "bn1")), common_prefix(("model",))
        ('', '')
    """
    if len(groups) < 2:
        return ""
    parts = [g.split(".") for g in groups]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return "".join(f"{part}." for part in parts[0][:shared])


def row_labels(groups: tuple[str, ...]) -> dict[int, str]:
    """The labelled rows (every :func:`label_every`-th) and their names, without the prefix
    they all share, shortened to :data:`LABEL_CHARS`."""
    every = label_every(len(groups))
    cut = len(common_prefix(groups))
    return {i: short_label(groups[i][cut:], LABEL_CHARS) for i in range(0, len(groups), every)}


def rows_figure(
    groups: tuple[str, ...], titles: list[str], *, bottom: float, right: float = 0.12
) -> tuple[Figure, Axes]:
    """A figure :data:`WIDTH` inches wide and an axes with one row per group (the first on
    top), its labelled rows named on the left, and ``titles`` above (the first line in bold)
    with a line that says which way the rows go.

    ``bottom`` is the height in inches the caller needs below the axes (tick labels, an axis
    label, a colour bar, a legend), ``right`` the width right of it.
    """
    prefix = common_prefix(groups)
    where = f" ({prefix}*)" if prefix else ""
    titles = [*titles, f"rows{where}: input (top) to output"]
    rows = len(groups)
    top = _PAD + _TITLE_LINE * len(titles) + 0.05
    height = top + rows_height(rows) + bottom
    figure = new_figure(WIDTH, height, dpi=DPI)
    labels = row_labels(groups)
    left = _PAD + text_width(figure, labels.values(), SMALL) + _TICKS + 0.02
    axes = figure.add_axes(axes_box(figure, left=left, right=right, top=top, bottom=bottom))
    axes.set_yticks(list(labels), list(labels.values()), fontsize=SMALL)
    axes.tick_params(labelsize=SMALL, length=3, pad=2)
    axes.set_ylim(rows - 0.5, -0.5)  # depth goes down
    for i, text in enumerate(titles):
        figure.text(
            0.5,
            1 - (_PAD + _TITLE_LINE * i) / height,
            text,
            ha="center",
            va="top",
            fontsize=TITLE if i == 0 else SMALL,
            fontweight="bold" if i == 0 else "normal",
        )
    return figure, axes


def place_xlabel(axes: Axes, text: str) -> None:
    """Name the x axis one line of tick labels below ``axes`` (at a fixed distance, so that
    matplotlib does not measure every tick label to place it)."""
    box = axes.get_position()
    height = _figure_height(axes)
    axes.set_xlabel(text, fontsize=LABEL, va="top")
    axes.xaxis.set_label_coords(0.5, -(_TICKS + LINE + 0.02) / (box.height * height))


def below(axes: Axes, inches: float) -> float:
    """The figure fraction ``inches`` below the bottom of ``axes``."""
    return axes.get_position().y0 - inches / _figure_height(axes)


def _figure_height(axes: Axes) -> float:
    """Height in inches of the figure that holds ``axes``."""
    figure = axes.figure  # typed Figure | SubFigure; both have a bbox (pixels) and a dpi
    return figure.bbox.height / figure.dpi
