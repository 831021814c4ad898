"""The depth profile: gradient norm and gradient/parameter norm per group at chosen steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.flow import FlowMatrix
from gradwatch.plots import _scale
from gradwatch.plots._figure import new_figure, short_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["depth_profile", "nearest_columns"]


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
    left, right = figure.subplots(1, 2, sharey=True)
    for axes, values, name in (
        (left, flow.norm, "gradient norm"),
        (right, flow.ratio, "gradient norm / parameter norm"),
    ):
        _panel(axes, values, columns, flow.steps)
        axes.set_xlabel(f"{name} (log scale)")
    every = _scale.label_every(rows)
    labelled = np.arange(0, rows, every)
    left.set_yticks(labelled, [short_label(flow.groups[i]) for i in labelled])
    left.tick_params(axis="y", labelsize=_scale.label_size(rows))
    left.set_ylim(rows - 0.5, -0.5)  # depth goes down, like the heatmap
    left.set_ylabel("group (input → output)")
    shown = ", ".join(str(int(flow.steps[c])) for c in columns) or "none logged"
    figure.suptitle(f"depth profile at step {shown}", fontsize=11)
    legend = {}
    for axes in (left, right):
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        figure.legend(
            legend.values(), legend.keys(), loc="outside lower center", ncols=6, fontsize=8
        )
    return figure


def _panel(axes: Axes, values: np.ndarray, columns: list[int], steps: np.ndarray) -> None:
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
    axes.set_xlim(left_edge / 2, right_edge * 2)
    axes.grid(True, which="major", alpha=0.3)
