"""The gradient-flow heatmap: groups in depth order x logged steps, colour = log10 of the
gradient/parameter norm ratio."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.pictures import _scale
from gradwatch.pictures.history import FlowMatrix

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["bin_columns", "heatmap"]

MAX_COLUMNS = 400
_BAR = 0.09  # inches: the height of the colour bar under the step axis
# From the heatmap's bottom edge down, in inches: step tick labels and "step", the colour bar,
# its tick labels and name, and a line of legend.
_BAR_TOP = 0.42
_LEGEND_TOP = _BAR_TOP + _BAR + 0.07 + 2 * _scale.LINE


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


def heatmap(
    flow: FlowMatrix,
    *,
    title: str = "gradient flow",
    measure: tuple[np.ndarray, str] | None = None,
) -> Figure:
    """Draw :meth:`FlowMatrix.measure` (the gradient/parameter norm ratio), or ``measure``
    (values of ``flow``'s shape and their name, ``(flow.backward, BACKWARD)`` say): one row
    per group (the first group on top), one column per logged step.

    Zero gradients are black, non-finite ones red, steps where a group was not logged grey.
    Columns are merged (by their larger value) down to about one per pixel of the heatmap's
    width in TensorBoard.
    """
    values, name = measure or flow.measure()
    span = f"steps {flow.steps[0]} to {flow.steps[-1]}" if len(flow.steps) else "no steps"
    special = bool(_below(values).any() or np.isinf(values).any() or np.isnan(values).any())
    figure, axes = _scale.rows_figure(
        flow.groups,
        [f"{name} per group", f"{title}, {span}"],
        bottom=_LEGEND_TOP + (_scale.LINE + 0.1 if special else 0.05),
    )
    pixels = int(axes.get_position().width * _scale.WIDTH * 100)  # as TensorBoard shows it
    steps, values = bin_columns(flow.steps, values, min(MAX_COLUMNS, max(pixels, 2)))
    lo, hi = _scale.log_limits(values)
    with np.errstate(divide="ignore"):
        logs = np.log10(np.where(np.isfinite(values), values, np.nan))
    logs[values == 0] = lo - 1.0  # drawn in the "under" colour
    image = axes.imshow(
        np.ma.masked_invalid(logs),
        aspect="auto",
        interpolation="nearest",
        cmap=_colormap(),
        vmin=lo,
        vmax=hi,
    )
    nonfinite = np.isinf(values)
    if nonfinite.any():
        axes.imshow(
            np.ma.masked_where(~nonfinite, np.ones_like(values)),
            aspect="auto",
            interpolation="nearest",
            cmap=_single(_scale.NONFINITE),
        )
    _label_steps(axes, steps)
    _scale.place_xlabel(axes, "step")
    box = axes.get_position()
    height = figure.get_size_inches()[1]
    bar_axes = figure.add_axes(
        (box.x0, _scale.below(axes, _BAR_TOP + _BAR), box.width, _BAR / height)
    )
    under = bool((np.nan_to_num(logs, nan=np.inf) < lo).any())
    bar = figure.colorbar(
        image, cax=bar_axes, orientation="horizontal", extend="min" if under else "neither"
    )
    bar.ax.tick_params(labelsize=_scale.SMALL, length=2, pad=1)
    bar.set_label(f"log10 {_scale.SYMBOLS[name]}", fontsize=_scale.LABEL, labelpad=1)
    _legend(
        axes,
        _scale.below(axes, _LEGEND_TOP),
        zero=under,
        nonfinite=bool(nonfinite.any()),
        missing=bool(np.isnan(values).any()),
    )
    return figure


def _below(values: np.ndarray) -> np.ndarray:
    """Where ``values`` are zero or below the colour scale (:func:`_scale.log_limits`)."""
    lo, _ = _scale.log_limits(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (values == 0) | (np.log10(np.where(values > 0, values, np.nan)) < lo)


def _colormap():
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(under=_scale.ZERO, bad=_scale.MISSING)
    return cmap


def _single(colour: str):
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


def _label_steps(axes: Axes, steps: np.ndarray) -> None:
    from matplotlib.ticker import MaxNLocator

    count = len(steps)
    ticks = [int(t) for t in MaxNLocator(nbins=4, integer=True).tick_values(0, count - 1)]
    ticks = [t for t in ticks if 0 <= t < count]
    axes.set_xticks(ticks, [str(int(steps[t])) for t in ticks])


def _legend(axes: Axes, y: float, *, zero: bool, nonfinite: bool, missing: bool) -> None:
    from matplotlib.patches import Patch

    handles = []
    if zero:
        handles.append(Patch(color=_scale.ZERO, label="zero or far below"))
    if nonfinite:
        handles.append(Patch(color=_scale.NONFINITE, label="NaN / Inf"))
    if missing:
        handles.append(Patch(color=_scale.MISSING, label="not logged"))
    if handles:
        axes.figure.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, y),
            ncols=len(handles),
            fontsize=_scale.SMALL,
            frameon=False,
            handlelength=1.0,
            handletextpad=0.4,
            columnspacing=1.0,
            borderaxespad=0,
            borderpad=0,
        )
