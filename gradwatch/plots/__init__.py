"""Pictures of gradient flow, drawn with matplotlib (imported on first use, never pyplot)."""

from gradwatch.plots._figure import MissingMatplotlib, png_bytes, require_matplotlib
from gradwatch.plots.heatmap import heatmap
from gradwatch.plots.profile import depth_profile
from gradwatch.plots.timeline import timeline

__all__ = [
    "MissingMatplotlib",
    "depth_profile",
    "heatmap",
    "png_bytes",
    "require_matplotlib",
    "timeline",
]
