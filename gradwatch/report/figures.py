"""The report's figures of one run, as PNG bytes."""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch import keys, plots
from gradwatch.report.reader import Run

__all__ = ["FIGURES", "run_figures"]

FIGURES = ("timeline", "heatmap", "depth_profile")
_SERIES = {
    "global": keys.total_tag(keys.GLOBAL),
    "max since last log": keys.total_tag(keys.MAX_SINCE_LAST_LOG),
    "clipped": keys.total_tag(keys.CLIPPED),
    "threshold": keys.clip_tag(keys.THRESHOLD),
}


def run_figures(run: Run, steps: Sequence[int] | None = None) -> dict[str, bytes]:
    """The global norm over time, the heatmap, and the depth profile at ``steps``."""
    series = {}
    for label, tag in _SERIES.items():
        logged, values = run.steps_and_values(tag)
        if len(logged):
            series[label] = (logged, values)
    flow = run.history.matrix()
    return {
        "timeline": plots.png_bytes(plots.timeline(series, run.events)),
        "heatmap": plots.png_bytes(plots.heatmap(flow, title=f"gradient flow ({run.name})")),
        "depth_profile": plots.png_bytes(plots.depth_profile(flow, steps)),
    }
