"""Pictures of gradient flow: the history they are drawn from, the drawings (matplotlib,
imported on first use, never pyplot), and :class:`FlowPictures`, which adds them to the
records an adapter writes."""

from gradwatch.pictures._figure import MissingMatplotlib, png_bytes, require_matplotlib
from gradwatch.pictures.drawing import FlowPictures
from gradwatch.pictures.heatmap import heatmap
from gradwatch.pictures.history import FlowHistory, FlowMatrix
from gradwatch.pictures.profile import depth_profile, signal_profile
from gradwatch.pictures.timeline import timeline

__all__ = [
    "FlowHistory",
    "FlowMatrix",
    "FlowPictures",
    "MissingMatplotlib",
    "depth_profile",
    "heatmap",
    "png_bytes",
    "require_matplotlib",
    "signal_profile",
    "timeline",
]
