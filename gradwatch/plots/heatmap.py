"""The gradient-flow heatmap: groups in depth order x logged steps, colour = log10 norm."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.flow import FlowMatrix
from gradwatch.plots import _scale
from gradwatch.plots._figure import axes_box, new_figure, text_width

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["bin_columns", "heatmap"]

MAX_COLUMNS = 400  # about two pixels per column at the figure's width
_BAR_WIDTH = 0.25  # inches: the colour bar
_BAR_MARGIN = 1.2  # inches right of the heatmap: gap, colour bar, its ticks and label


def bin_columns(
    steps: np.ndarray, values: np.ndarray, max_columns: int = MAX_COLUMNS
) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent columns until at most ``max_columns`` remain, keeping each group's largest
    value (so a spike or a non-finite gradient stays visible) at the bin's last step.

    Example:
        >>> steps, values = bin_columns(np.arange(6), np.array([[1.0, 5, 2, 2, np.nan, 3]]), 3)
        >>> steps.tolist(), values.tolist()
        ([1, 3, 5], [[5.0, 2.0, 3.0]])
    """
    columns = values.shape[1]
    if columns <= max_columns:
        return steps, values
    edges = np.linspace(0, columns, max_columns + 1).round().astype(int)
    binned = np.stack([_nanmax(values[:, a:b]) for a, b in itertools.pairwise(edges)], axis=1)
    return steps[edges[1:] - 1], binned


def _nanmax(block: np.ndarray) -> np.ndarray:
    """Row maxima ignoring NaN (not logged); NaN where a row has no value at all."""
    out = np.full(block.shape[0], np.nan)
    logged = ~np.isnan(block)
    rows = logged.any(axis=1)
    out[rows] = np.where(logged[rows], block[rows], -np.inf).max(axis=1)
    return out


def heatmap(flow: FlowMatrix, *, title: str = "gradient flow") -> Figure:
    """Draw ``flow.norm``: one row per group (the first group on top), one column per step.

    Zero gradients are black, non-finite ones red, steps where a group was not logged grey.
    """
    steps, norm = bin_columns(flow.steps, flow.norm)
    rows = len(flow.groups)
    lo, hi = _scale.log_limits(norm)
    figure = new_figure(10.0, _scale.rows_height(rows))
    labels = _scale.row_labels(flow.groups)
    size = _scale.label_size(rows)
    label_width = text_width(figure, labels.values(), size)
    left = _scale.left_margin(label_width)
    x, y, width, height = axes_box(
        figure, left=left, right=_BAR_MARGIN, top=_scale.TOP, bottom=_scale.BOTTOM
    )
    axes = figure.add_axes((x, y, width, height))
    with np.errstate(divide="ignore"):
        logs = np.log10(np.where(np.isfinite(norm), norm, np.nan))
    logs[norm == 0] = lo - 1.0  # drawn in the "under" colour
    image = axes.imshow(
        np.ma.masked_invalid(logs),
        aspect="auto",
        interpolation="nearest",
        cmap=_colormap(),
        vmin=lo,
        vmax=hi,
    )
    nonfinite = np.isinf(norm)
    if nonfinite.any():
        axes.imshow(
            np.ma.masked_where(~nonfinite, np.ones_like(norm)),
            aspect="auto",
            interpolation="nearest",
            cmap=_single(_scale.NONFINITE),
        )
    axes.set_yticks(list(labels), list(labels.values()), fontsize=size)
    _label_steps(axes, steps)
    inch = figure.get_size_inches()
    bar_axes = figure.add_axes((x + width + 0.1 / inch[0], y, _BAR_WIDTH / inch[0], height))
    below = bool((np.nan_to_num(logs, nan=np.inf) < lo).any())
    bar = figure.colorbar(image, cax=bar_axes, extend="min" if below else "neither")
    bar.set_label("log10 gradient norm")
    _legend(
        axes,
        x,
        zero=bool((norm == 0).any()),
        nonfinite=bool(nonfinite.any()),
        missing=bool(np.isnan(norm).any()),
    )
    span = f"steps {steps[0]} to {steps[-1]}" if len(steps) else "no steps"
    axes.set_title(f"{title}: log10 gradient norm per group ({span})", fontsize=11)
    axes.set_xlabel("step")
    _scale.place_axis_labels(axes, label_width)
    return figure


def _colormap():
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(under=_scale.ZERO, bad=_scale.MISSING)
    return cmap


def _single(colour: str):
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


def _label_steps(axes, steps: np.ndarray) -> None:
    from matplotlib.ticker import MaxNLocator

    count = len(steps)
    ticks = [int(t) for t in MaxNLocator(nbins=8, integer=True).tick_values(0, count - 1)]
    ticks = [t for t in ticks if 0 <= t < count]
    axes.set_xticks(ticks, [str(int(steps[t])) for t in ticks])


def _legend(axes, x: float, *, zero: bool, nonfinite: bool, missing: bool) -> None:
    from matplotlib.patches import Patch

    handles = []
    if zero:
        handles.append(Patch(color=_scale.ZERO, label="zero (or far below the scale)"))
    if nonfinite:
        handles.append(Patch(color=_scale.NONFINITE, label="NaN / Inf"))
    if missing:
        handles.append(Patch(color=_scale.MISSING, label="not logged"))
    if handles:
        axes.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(x, 0.0),
            bbox_transform=axes.figure.transFigure,
            ncols=len(handles),
            fontsize=8,
            frameon=False,
        )
