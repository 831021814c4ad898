"""The run's global gradient norm over time, with the clip threshold and detections marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.pictures import _scale
from gradwatch.pictures._figure import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["EVENT_COLOURS", "timeline"]

Series = tuple[np.ndarray, np.ndarray]  # steps, values

EVENT_COLOURS = {"nonfinite": _scale.NONFINITE, "explosion": "#ff7f0e", "vanishing": "#7f3fbf"}
_STYLES: dict[str, dict[str, Any]] = {
    "global": {"color": "#1f77b4", "linewidth": 1.4},
    "max since last log": {"color": "#1f77b4", "linewidth": 0.8, "alpha": 0.45},
    "clipped": {"color": "#2ca02c", "linewidth": 1.2},
    "threshold": {"color": "#444444", "linewidth": 1.0, "linestyle": "--"},
}


def timeline(series: Mapping[str, Series], events: Sequence[dict] = ()) -> Figure:
    """Plot each named series on a log axis and mark every event's step by its kind.

    ``series`` keys are ``"global"``, ``"max since last log"``, ``"clipped"`` and
    ``"threshold"`` (each optional). Non-finite values are drawn as red ticks on the top edge.
    """
    figure = new_figure(10.0, 4.2, layout="constrained")  # drawn once, for the report
    axes = figure.add_subplot()
    finite = [v[np.isfinite(v) & (v > 0)] for _, v in series.values()]
    lo, hi = _scale.log_limits(np.concatenate(finite) if finite else np.array([]))
    for name, (steps, values) in series.items():
        style = _STYLES.get(name, {})
        shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
        axes.plot(steps, shown, label=name, **style)
        bad = ~np.isfinite(values)
        if name == "global" and bad.any():
            axes.plot(
                steps[bad],
                np.full(bad.sum(), 10 ** (hi + 0.4)),
                linestyle="none",
                marker="v",
                color=_scale.NONFINITE,
                label="global norm NaN / Inf",
            )
    for kind, colour in EVENT_COLOURS.items():
        at = sorted({int(e["step"]) for e in events if e.get("kind") == kind})
        for i, step in enumerate(at):
            axes.axvline(
                step,
                color=colour,
                alpha=0.5,
                linewidth=1.0,
                label=f"{kind} event" if i == 0 else None,
            )
    axes.set_yscale("log")
    axes.set_ylim(10 ** (lo - 0.3), 10 ** (hi + 0.6))
    axes.set_xlabel("step")
    axes.set_ylabel("gradient norm (log scale)")
    axes.set_title("global gradient norm", fontsize=11)
    axes.grid(True, which="major", alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)
    return figure
