"""The depth profile: gradient norm and gradient/parameter norm per group at chosen steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.flow import FlowMatrix
from gradwatch.plots import _scale
from gradwatch.plots._figure import axes_box, new_figure, text_width

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["depth_profile", "nearest_columns"]

_GAP = 0.5  # inches between the two panels: room for both edge tick labels
_ROW_LINES = {"colors": "#b0b0b0", "linewidths": 0.8, "alpha": 0.3, "zorder": 0.5}


def nearest_columns(logged: np.ndarray, steps: Sequence[int] | None) -> list[int]:
    """Column indices of the logged steps nearest to ``steps`` (default: the last one).

    Example:
        >>> nearest_columns(np.array([0, 49, 99]), [40, 1000])
        [1, 2]
    """
    if len(logged) == 0:
        return []
    if not steps:
        return [len(logged) - 1]
    columns = [int(np.abs(logged - s).argmin()) for s in steps]
    return list(dict.fromkeys(columns))


def depth_profile(flow: FlowMatrix, steps: Sequence[int] | None = None) -> Figure:
    """Two panels sharing the group axis (first group on top): gradient norm, and gradient
    norm / parameter norm, one line per chosen step (default: the last logged step)."""
    rows = len(flow.groups)
    columns = nearest_columns(flow.steps, steps)
    figure = new_figure(10.0, _scale.rows_height(rows))
    labels = _scale.row_labels(flow.groups)
    size = _scale.label_size(rows)
    label_width = text_width(figure, labels.values(), size)
    x, y, width, height = axes_box(
        figure,
        left=_scale.left_margin(label_width),
        right=0.25,
        top=_scale.TOP,
        bottom=_scale.BOTTOM,
    )
    gap = _GAP / figure.get_size_inches()[0]
    panel = (width - gap) / 2
    left = figure.add_axes((x, y, panel, height))
    right = figure.add_axes((x + panel + gap, y, panel, height))
    for axes, values, name in (
        (left, flow.norm, "gradient norm"),
        (right, flow.ratio, "gradient norm / parameter norm"),
    ):
        _panel(axes, values, columns, flow.steps, list(labels))
        axes.set_ylim(rows - 0.5, -0.5)  # depth goes down, like the heatmap
        axes.set_xlabel(f"{name} (log scale)")
    left.set_yticks(list(labels), list(labels.values()), fontsize=size)
    right.set_yticks([])
    _scale.place_axis_labels(left, label_width)
    right.xaxis.set_label_coords(*left.xaxis.label.get_position())
    shown = ", ".join(str(int(flow.steps[c])) for c in columns) or "none logged"
    figure.suptitle(f"depth profile at step {shown}", fontsize=11)
    legend = {}
    for axes in (left, right):
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        figure.legend(
            legend.values(),
            legend.keys(),
            loc="lower center",
            bbox_to_anchor=(x + width / 2, 0.0),
            ncols=6,
            fontsize=8,
        )
    return figure


def _panel(
    axes: Axes, values: np.ndarray, columns: list[int], steps: np.ndarray, labelled: list[int]
) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter

    rows = np.arange(values.shape[0])
    lo, hi = _scale.log_limits(values[:, columns] if columns else values)
    left_edge, right_edge = 10 ** (lo - 0.3), 10 ** (hi + 0.3)
    for column in columns:
        y = values[:, column]
        positive = np.isfinite(y) & (y > 0)
        axes.plot(
            np.where(positive, y, np.nan),
            rows,
            marker="o",
            markersize=3,
            label=f"step {steps[column]}",
        )
    chosen = values[:, columns] if columns else values[:, :0]
    zero = (chosen == 0).any(axis=1)
    nonfinite = np.isinf(chosen).any(axis=1)
    if zero.any():
        axes.scatter(
            np.full(zero.sum(), left_edge), rows[zero], marker="x", color=_scale.ZERO, label="zero"
        )
    if nonfinite.any():
        axes.scatter(
            np.full(nonfinite.sum(), right_edge),
            rows[nonfinite],
            marker=">",
            color=_scale.NONFINITE,
            label="NaN / Inf",
        )
    axes.set_xscale("log")
    # Minor ticks at 2 and 5 only: each tick is an object to build and draw, 8 a decade cost most
    # of the panel's time across many decades.
    axes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlim(left_edge / 2, right_edge * 2)
    axes.grid(True, axis="x", which="major", alpha=0.3)
    # Row lines as one collection: a grid of 50 y ticks per panel costs a tick object each.
    axes.hlines(labelled, 0, 1, transform=axes.get_yaxis_transform(), **_ROW_LINES)
