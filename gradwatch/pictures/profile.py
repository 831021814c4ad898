"""The depth profile: the gradient/parameter norm ratio of every group at chosen steps; with
``track_signal``, the signal profile beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.pictures import _scale
from gradwatch.pictures.history import FlowMatrix

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["depth_profile", "nearest_columns", "signal_profile"]

_ROW_LINES: dict[str, Any] = {"colors": "#b0b0b0", "linewidths": 0.6, "alpha": 0.3, "zorder": 0.5}
_LEGEND_TOP = 0.45  # inches below the axes: tick labels and the axis label above it


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
    """:meth:`FlowMatrix.measure` (the gradient/parameter norm ratio) of every group (the first
    on top), one line per chosen step (default: the last logged step), on a log axis."""
    values, measure = flow.measure()
    columns = nearest_columns(flow.steps, steps)
    shown = ", ".join(str(int(flow.steps[c])) for c in columns) or "none logged"
    chosen = values[:, columns]
    entries = len(columns) + int((chosen == 0).any()) + int(np.isinf(chosen).any())
    legend_lines = -(-entries // 3)
    figure, axes = _scale.rows_figure(
        flow.groups,
        [f"{measure} per group", f"depth profile at step {shown}"],
        bottom=_LEGEND_TOP + legend_lines * _scale.LINE + 0.1,
    )
    _panel(axes, values, columns, flow.steps, list(_scale.row_labels(flow.groups)))
    _scale.place_xlabel(axes, f"{_scale.SYMBOLS[measure]} (log scale)")
    _legend_below(figure, axes, columns=3)
    return figure


def _legend_below(figure: Figure, axes: Axes, columns: int) -> None:
    """The lines' legend, centred :data:`_LEGEND_TOP` inches below ``axes``."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, _scale.below(axes, _LEGEND_TOP)),
            ncols=columns,
            fontsize=_scale.SMALL,
            frameon=False,
            handlelength=1.5,
            columnspacing=1.0,
            borderaxespad=0,
            borderpad=0,
        )


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
            markersize=2.5,
            linewidth=1.0,
            label=f"step {steps[column]}",
        )
    chosen = values[:, columns] if columns else values[:, :0]
    zero = (chosen == 0).any(axis=1)
    nonfinite = np.isinf(chosen).any(axis=1)
    if zero.any():
        axes.scatter(
            np.full(zero.sum(), left_edge),
            rows[zero],
            s=12,
            marker="x",
            color=_scale.ZERO,
            label="zero",
        )
    if nonfinite.any():
        axes.scatter(
            np.full(nonfinite.sum(), right_edge),
            rows[nonfinite],
            s=12,
            marker=">",
            color=_scale.NONFINITE,
            label="NaN / Inf",
        )
    axes.set_xscale("log")
    # Major ticks at most ~4 decades apart and no minor ticks: each tick is an object to build
    # and draw, and at 350 px more than four labels run into each other.
    decades = hi - lo + 1.2
    axes.xaxis.set_major_locator(LogLocator(numticks=5))
    axes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)) if decades < 4 else LogLocator())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlim(left_edge / 2, right_edge * 2)
    axes.grid(True, axis="x", which="major", alpha=0.3)
    # Row lines as one collection: a grid of 50 y ticks costs a tick object each.
    axes.hlines(labelled, 0, 1, transform=axes.get_yaxis_transform(), **_ROW_LINES)


SIGNAL_SERIES = (
    ("forward", "forward RMS (outputs)"),
    ("backward", "backward RMS (dL/dy)"),
    ("gain", "gain to the next group"),
)


def signal_profile(flow: FlowMatrix, steps: Sequence[int] | None = None) -> Figure:
    """With ``track_signal``: the forward RMS, the backward signal's RMS and its gain to the
    next group, of every group (the first on top), at the last of ``steps`` (default: the last
    logged step), on a log axis; a gain of 1 is marked."""
    from matplotlib.ticker import LogLocator, NullFormatter

    columns = nearest_columns(flow.steps, steps)[-1:]
    shown = str(int(flow.steps[columns[0]])) if columns else "none logged"
    series = [
        (label, getattr(flow, field)[:, columns[0]])
        for field, label in SIGNAL_SERIES
        if columns and getattr(flow, field) is not None
    ]
    figure, axes = _scale.rows_figure(
        flow.groups,
        ["signal through depth", f"signal profile at step {shown}"],
        bottom=_LEGEND_TOP + 2 * _scale.LINE + 0.1,
    )
    rows = np.arange(len(flow.groups))
    values = np.concatenate([v for _, v in series]) if series else np.array([1.0])
    lo, hi = _scale.log_limits(np.append(values, 1.0))
    for label, value in series:
        shown_values = np.where(np.isfinite(value) & (value > 0), value, np.nan)
        axes.plot(shown_values, rows, marker="o", markersize=2.5, linewidth=1.0, label=label)
    axes.axvline(1.0, color="#808080", linewidth=0.8, linestyle="--", label="gain 1", zorder=0)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(numticks=5))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlim(10 ** (lo - 0.5), 10 ** (hi + 0.5))
    axes.grid(True, axis="x", which="major", alpha=0.3)
    labelled = list(_scale.row_labels(flow.groups))
    axes.hlines(labelled, 0, 1, transform=axes.get_yaxis_transform(), **_ROW_LINES)
    _scale.place_xlabel(axes, "value (log scale)")
    _legend_below(figure, axes, columns=2)
    return figure
