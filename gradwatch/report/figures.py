"""The report's figures of one run, as PNG bytes, and captions that say what each one shows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradwatch import pictures, tags
from gradwatch.pictures.history import BACKWARD, RATIO
from gradwatch.pictures.timeline import EVENT_COLOURS
from gradwatch.report.reader import Run

__all__ = ["FIGURES", "captions", "run_figures"]

FIGURES = ("timeline", "heatmap", "depth_profile", "signal_heatmap", "signal_profile")
_SERIES = {
    "global": tags.total_tag(tags.GLOBAL),
    "max since last log": tags.total_tag(tags.MAX_SINCE_LAST_LOG),
    "clipped": tags.total_tag(tags.CLIPPED),
    "threshold": tags.clip_tag(tags.THRESHOLD),
}
_TIMELINE_EXTRAS = {  # what the caption says of each series the timeline draws
    "max since last log": "the largest norm between logged steps",
    "threshold": "the clip threshold",
    "clipped": "the norm after clipping",
}
_SIZE_FREE = {RATIO: " (unlike the gradient norm, it does not grow with a group's size)"}


def run_figures(run: Run, steps: Sequence[int] | None = None) -> dict[str, bytes]:
    """The global norm over time, the heatmap, the depth profile at ``steps``, and where the
    signal was measured (``track_signal``) the backward signal's heatmap and the signal
    profile."""
    flow = run.history.matrix()
    figures = {
        "timeline": pictures.png_bytes(pictures.timeline(_series(run), run.events)),
        "heatmap": pictures.png_bytes(pictures.heatmap(flow, title=f"gradient flow ({run.name})")),
        "depth_profile": pictures.png_bytes(pictures.depth_profile(flow, steps)),
    }
    if flow.backward is not None:
        title, measure = f"backward signal ({run.name})", (flow.backward, BACKWARD)
        figures["signal_heatmap"] = pictures.png_bytes(
            pictures.heatmap(flow, title=title, measure=measure)
        )
        figures["signal_profile"] = pictures.png_bytes(pictures.signal_profile(flow, steps))
    return figures


def captions(run: Run) -> dict[str, str]:
    """A caption per figure of :func:`run_figures` that names only what the figure draws.

    Example:
        >>> run = Run("run")
        >>> captions(run)["timeline"]
        'Global gradient norm over time.'
        >>> run.series[tags.clip_tag(tags.THRESHOLD)] = {0: 1.0}
        >>> run.events.append({"step": 0, "kind": "explosion"})
        >>> captions(run)["timeline"]
        'Global gradient norm over time, with the clip threshold and detections marked.'
    """
    drawn = _series(run)
    extras = [text for name, text in _TIMELINE_EXTRAS.items() if name in drawn]
    if any(event.get("kind") in EVENT_COLOURS for event in run.events):
        extras.append("detections marked")
    timeline = "Global gradient norm over time"
    if extras:
        timeline += ", with " + (
            extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1]
        )
    measure = run.history.matrix().measure()[1]
    return {
        "timeline": timeline + ".",
        "heatmap": f"Gradient flow: log10 {measure} of every group{_SIZE_FREE.get(measure, '')}"
        ", rows from input to output, at every logged step. Black: zero or far below the scale; "
        "red: NaN/Inf; grey: not logged.",
        "depth_profile": f"Depth profile: {measure} of every group, rows from input to output.",
        "signal_heatmap": "Signal propagation: log10 RMS of dL/d(output) at every group's"
        " module, rows from input to output, at every logged step: the backward signal itself,"
        " which vanishes where the rows darken toward the input. "
        + _backward_summary(run.history.matrix().backward),
        "signal_profile": "Signal profile: the forward RMS, the backward RMS and the gain to the"
        " next group of every group, rows from input to output; a gain left of the dashed line"
        " at 1 shrinks the backward signal on its way to the input.",
    }


def _backward_summary(backward: np.ndarray | None) -> str:
    """The backward signal at the first group over the last, at the last logged step.

    Example:
        >>> _backward_summary(np.array([[1e-9, 1e-8], [1.0, 1.0]]))
        'At the last logged step it is 1e-08 at the first group of its value at the last.'
    """
    if backward is None or backward.shape[1] == 0:
        return ""
    column = backward[:, -1]
    finite = column[np.isfinite(column)]
    if len(finite) < 2 or finite[-1] <= 0:
        return ""
    return (
        f"At the last logged step it is {finite[0] / finite[-1]:.0e} at the first group of its"
        " value at the last."
    )


def _series(run: Run) -> dict:
    series = {}
    for label, tag in _SERIES.items():
        logged, values = run.steps_and_values(tag)
        if len(logged):
            series[label] = (logged, values)
    return series
